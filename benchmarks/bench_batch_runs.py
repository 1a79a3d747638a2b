"""End-to-end speed of `compare`'s batched runs: run-samples/s of K seeds as one batched group vs one by one.

    OMP_NUM_THREADS=1 python benchmarks/bench_batch_runs.py --model mlp --samples 2000 --runs 8 --repeats 2
    OMP_NUM_THREADS=1 python benchmarks/bench_batch_runs.py --train-only --samples 300 --runs 8 --repeats 5

Each repeat runs the same sweep (digits, pb+sc+lwp, b=1, one thread) with ``batch_runs=1`` and
``batch_runs=K``, interleaved, including setup, evaluation and checkpoints (what a user waits for).
``--train-only`` times just the training steps: K ``pipeprop.train`` calls vs one ``train_many`` call
(random 64-feature inputs, the zoo model), which is less exposed to a noisy shared machine.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from pipeprop.experiments import ExperimentConfig
from pipeprop.experiments.compare import run_sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--method", default="pb+sc+lwp")
    ap.add_argument("--train-only", action="store_true", help="time only the training steps (pipeprop.train vs train_many)")
    args = ap.parse_args()
    if args.train_only:
        return train_only(args)
    cfg = ExperimentConfig(name="bench", model=args.model, dataset="digits", method=args.method, batch_size=16, lr=0.1,
                           momentum=0.9, samples=args.samples, eval_every=args.samples, test_subset=100, progress=False,
                           methods=[args.method], seeds=list(range(args.runs)), num_threads=1)
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            rates = {}
            for k in (1, args.runs):
                out = Path(tmp) / f"k{k}"
                shutil.rmtree(out, ignore_errors=True)
                t = time.perf_counter()
                run_sweep(cfg, out, batch_runs=k, echo=lambda s: None)
                rates[k] = args.runs * args.samples / (time.perf_counter() - t)
            print(f"{args.model} {args.method} b=1, {args.runs} seeds, repeat {rep}: one by one {rates[1]:.0f}, "
                  f"batched K={args.runs} {rates[args.runs]:.0f} run-samples/s -> {rates[args.runs] / rates[1]:.2f}x",
                  flush=True)


def train_only(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    import pipeprop
    from pipeprop.models import get

    torch.set_num_threads(1)
    k, n = args.runs, args.samples

    def models() -> list[torch.nn.Module]:
        out = []
        for seed in range(k):
            torch.manual_seed(seed)
            out.append(get(args.model, num_classes=10, in_features=64))
        return out

    data = [[(torch.randn(1, 64), torch.randint(0, 10, (1,))) for _ in range(n)] for _ in range(k)]
    ratios = []
    for rep in range(args.repeats):
        t = time.perf_counter()
        for m, d in zip(models(), data):
            pipeprop.train(m, d, F.cross_entropy, method=args.method, lr=0.01, momentum=0.9)
        separate = k * n / (time.perf_counter() - t)
        ms = models()
        t = time.perf_counter()
        pipeprop.train_many(ms, data, F.cross_entropy, method=args.method, lr=[0.01] * k, momentum=0.9)
        many = k * n / (time.perf_counter() - t)
        ratios.append(many / separate)
        print(f"{args.model} {args.method} b=1, repeat {rep}: separate {separate:.0f}, train_many K={k} {many:.0f} "
              f"run-samples/s -> {many / separate:.2f}x", flush=True)
    print(f"median {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
