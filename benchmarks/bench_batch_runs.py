"""End-to-end speed of `compare`'s batched runs: run-samples/s of K seeds as one batched group vs one by one.

    OMP_NUM_THREADS=1 python benchmarks/bench_batch_runs.py --model mlp --samples 2000 --runs 8 --repeats 2

Each repeat runs the same sweep (digits, pb+sc+lwp, b=1, one thread) with ``batch_runs=1`` and
``batch_runs=K``, interleaved, including setup, evaluation and checkpoints (what a user waits for).
"""

from __future__ import annotations

import argparse
import shutil
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
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
