"""Budget check: ResNet-20 with GroupNorm trained by plain SGD for one epoch of CIFAR-10.

Reports test accuracy after the epoch and training throughput (samples/s):

* the epoch itself runs at ``--batch-size`` (default 128, the reference recipe's batch) through
  ``pipeprop.build_simulator(method="sgd")`` (delays 0 = plain SGD with momentum), with the standard
  augmentation (4-pixel pad + random crop + flip), linear warm-up then cosine decay of the learning rate;
* batch-size-one throughput is measured on ``--b1-samples`` samples for plain PyTorch SGD, the simulator
  with ``method="sgd"`` and with ``method="pb"`` (20 stages, stale forward weights), interleaved in chunks
  of 10 samples on one thread, so the ratios are comparable even on a busy machine.

Run (about half an hour on 2 CPU cores; ``--epochs 0`` measures only batch size one)::

    python benchmarks/bench_cifar_resnet20.py --data-dir ../shared/data --out benchmarks/results/cifar_resnet20.json
    python benchmarks/bench_cifar_resnet20.py --data-dir ../shared/data --epochs 0 --b1-samples 510
    python benchmarks/bench_cifar_resnet20.py --data-dir ../shared/data --batch-size 1 --lr 0.00078125 --threads 1 --b1-samples 0
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import pipeprop
from pipeprop import models
from pipeprop.data import MicroBatchStream, augment, load_dataset


def evaluate(model: torch.nn.Module, dataset, batch: int = 500) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(dataset.test), batch):
            x = dataset.normalize(dataset.test.images[i : i + batch])
            correct += int((model(x).argmax(1) == dataset.test.labels[i : i + batch]).sum())
    model.train()
    return correct / len(dataset.test)


def b1_throughput(dataset, n: int, seed: int, chunk: int = 10) -> dict:
    """Samples/s at batch size one: plain PyTorch SGD vs the simulator (sgd and pb), same samples.

    The three run interleaved, ``chunk`` samples at a time, so a change in machine load affects all alike.
    """
    torch.manual_seed(seed)
    base = models.get("resnet20", norm="gn")
    batches = list(MicroBatchStream(dataset, batch_size=1, epochs=n / len(dataset.train), seed=seed, augment=augment))
    warm, timed = batches[:10], batches[10:]

    plain = copy.deepcopy(base)
    opt = torch.optim.SGD(plain.parameters(), lr=1e-3, momentum=0.9)

    def plain_step(x, y):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(plain(x), y).backward()
        opt.step()

    steppers = {"plain_torch_sgd": plain_step}
    for method in ("sgd", "pb"):
        sim = pipeprop.build_simulator(copy.deepcopy(base), F.cross_entropy, method=method, lr=1e-3, momentum=0.9)
        steppers[f"simulator_{method}"] = sim.step
    seconds = dict.fromkeys(steppers, 0.0)
    for name, step in steppers.items():
        for x, y in warm:
            step(x, y)
    for i in range(0, len(timed), chunk):
        for name, step in steppers.items():
            start = time.perf_counter()
            for x, y in timed[i : i + chunk]:
                step(x, y)
            seconds[name] += time.perf_counter() - start
    out = {name: len(timed) / sec for name, sec in seconds.items()}
    out["simulator_sgd_over_plain_time"] = seconds["simulator_sgd"] / seconds["plain_torch_sgd"]
    out["simulator_pb_over_plain_time"] = seconds["simulator_pb"] / seconds["plain_torch_sgd"]
    out["samples_timed"] = len(timed)
    return out


def train_epoch(dataset, args) -> dict:
    torch.manual_seed(args.seed)
    model = models.get("resnet20", norm="gn")
    sim = pipeprop.build_simulator(
        model, F.cross_entropy, method=args.method, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )
    stream = MicroBatchStream(dataset, batch_size=args.batch_size, epochs=args.epochs, seed=args.seed, augment=augment)
    total = len(stream)
    warmup = max(1, int(0.05 * total))

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return 0.5 * args.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=total, desc=f"resnet20-gn {args.method} b={args.batch_size}", unit="step", mininterval=5) if tqdm else None
    losses, start = [], time.perf_counter()
    for step, (x, y) in enumerate(stream):
        for group in sim.optimizer.param_groups:
            group["lr"] = lr_at(step)
        losses.append(sim.step(x, y))
        if bar is not None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        if args.max_minutes and time.perf_counter() - start > 60 * args.max_minutes:
            print(f"stopping after {step + 1} of {total} steps: --max-minutes {args.max_minutes} reached")
            break
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    samples = len(losses) * args.batch_size
    return {
        "method": args.method,
        "batch_size": args.batch_size,
        "steps": len(losses),
        "samples": samples,
        "epochs_done": samples / len(dataset.train),
        "train_seconds": seconds,
        "train_samples_per_s": samples / seconds,
        "final_train_loss_last50": sum(losses[-50:]) / len(losses[-50:]),
        "test_accuracy": evaluate(model, dataset),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="folder with cifar-10-python.tar.gz (default: $PIPEPROP_DATA/cache)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--method", default="sgd", help="training method for the epoch (sgd = plain SGD; or e.g. pb+sc+lwp)")
    p.add_argument("--epochs", type=float, default=1.0, help="0: only the batch-size-one throughput")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--b1-samples", type=int, default=300, help="samples for the batch-size-one throughput (0: skip)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the epoch")
    p.add_argument("--b1-threads", type=int, default=1, help="torch threads for the batch-size-one timings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=0, help="cap on the training time (0: none)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dataset = load_dataset("cifar10", data_dir=args.data_dir)
    result: dict = {"model": "resnet20", "norm": "gn", "threads": args.threads, "torch": torch.__version__,
                    "args": vars(args)}
    if args.b1_samples:
        torch.set_num_threads(args.b1_threads)
        result["b1"] = b1_throughput(dataset, args.b1_samples, args.seed)
        torch.set_num_threads(args.threads)
        print(json.dumps({"b1": result["b1"]}, indent=1), flush=True)
    if args.epochs > 0:
        result["epoch"] = train_epoch(dataset, args)
    result["load_average_at_end"] = os.getloadavg()
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
