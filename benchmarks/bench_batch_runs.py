"""End-to-end speed of `compare`'s batched runs: run-samples/s of K seeds as one batched group vs one by one.

    OMP_NUM_THREADS=1 python benchmarks/bench_batch_runs.py --model mlp --samples 2000 --runs 8 --repeats 2
    OMP_NUM_THREADS=1 python benchmarks/bench_batch_runs.py --train-only --samples 300 --runs 8 --repeats 5
    OMP_NUM_THREADS=1 python benchmarks/bench_batch_runs.py --k-sweep --model resnet20 --ks 2 4 8

Each repeat runs the same sweep (digits, pb+sc+lwp, b=1, one thread) with ``batch_runs=1`` and
``batch_runs=K``, interleaved, including setup, evaluation and checkpoints (what a user waits for).
``--train-only`` times just the training steps: K ``pipeprop.train`` calls vs one ``train_many`` call
(random 64-feature inputs, the zoo model), which is less exposed to a noisy shared machine.
``--k-sweep``: the evidence behind :func:`pipeprop.multi_run.min_runs_to_batch` (when ``compare`` batches by
default): for each K, ``build_multi_simulator`` steps vs the K runs' ``PipelineSimulator`` steps, interleaved,
median speed-up over 5 rounds, with the stages folded (the default where every layer has a folded form) and
with every stage forced onto ``vmap(functional_call)`` (the form of stages with other layers).
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
    ap.add_argument("--k-sweep", action="store_true", help="speed-up of batched vs separate steps for each K of --ks")
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--steps", type=int, default=0, help="--k-sweep: steps per round (default 100 mlp, 5 others)")
    args = ap.parse_args()
    if args.train_only:
        return train_only(args)
    if args.k_sweep:
        return k_sweep(args)
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


def k_sweep(args: argparse.Namespace) -> None:
    import copy
    import warnings

    import torch
    import torch.nn.functional as F

    import pipeprop
    from pipeprop.models import get

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dense = args.model == "mlp"
    steps = args.steps or (100 if dense else 5)
    shape = (1, 64) if dense else (1, 3, 32, 32)

    def make() -> torch.nn.Module:
        return get("mlp", num_classes=10, in_features=64) if dense else get(args.model, num_classes=10)

    for k in args.ks:
        nets = []
        for seed in range(k):
            torch.manual_seed(seed)
            nets.append(make())
        data = [[(torch.randn(*shape), torch.randint(0, 10, (1,))) for _ in range(steps)] for _ in range(k)]
        separate = [pipeprop.build_simulator(copy.deepcopy(m), F.cross_entropy, method=args.method, lr=0.01,
                                             momentum=0.9) for m in nets]
        folded, vmapped = (pipeprop.build_multi_simulator([copy.deepcopy(m) for m in nets], F.cross_entropy,
                                                          method=args.method, lr=[0.01] * k, momentum=0.9)
                           for _ in range(2))
        for st in vmapped.stages:
            st._folded = [None]  # every stage through vmap(functional_call)

        def run_many(sim) -> None:
            for n in range(steps):
                sim.step([d[n][0] for d in data], [d[n][1] for d in data])

        def run_separate() -> None:
            for sim, d in zip(separate, data):
                for n in range(steps):
                    sim.step(*d[n])

        run_separate(), run_many(folded), run_many(vmapped)  # warm-up
        speedups: dict[str, list[float]] = {"folded": [], "vmap": []}
        rates = []
        for _ in range(5):
            t = time.perf_counter()
            run_separate()
            ts = time.perf_counter() - t
            rates.append(k * steps / ts)
            for name, sim in (("folded", folded), ("vmap", vmapped)):
                t = time.perf_counter()
                run_many(sim)
                speedups[name].append(ts / (time.perf_counter() - t))
        print(f"{args.model} {args.method} K={k} (all stages foldable: {all(st.folded for st in folded.stages)}, "
              f"min_runs_to_batch {folded.min_runs_to_batch()}): separate {statistics.median(rates):.0f} run-samples/s;"
              f" batched speed-up folded {statistics.median(speedups['folded']):.2f}x, "
              f"vmap {statistics.median(speedups['vmap']):.2f}x", flush=True)


if __name__ == "__main__":
    main()
