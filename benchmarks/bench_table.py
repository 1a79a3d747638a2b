"""The speed table of docs/performance.md: every figure a ratio measured in this one run.

Usage:  python benchmarks/bench_table.py [--rounds 9] [--k 2 4 8] [--no-distributed]   (``make bench``)

Rows (batch size 1, one thread, interleaved with its reference so both see the same machine load; each
ratio is the median over rounds of the per-round ratio):

* ``mlp pb`` / ``mlp pb+sc+lwp``: 8 linear layers of width 256 (3x16x16 inputs), ``PipelineSimulator.step``
  time / plain PyTorch SGD step time (``model(x)``, ``backward``, ``torch.optim.SGD.step``, ``loss.item()``);
* ``sc/lwp passes``: plain PyTorch plus only the passes over the weights that ``pb+sc+lwp`` adds on live
  weights (prediction, copy back, SC's gradient term; fused SGD): a yardstick for the ``pb+sc+lwp tick`` row,
  what such an engine costs with no pipeline at all;
* ``... tick``: the same with the tick engine (``TickPipeline.feed`` in steady state, ``pipeprop.train(...,
  engine="tick")``) in place of ``PipelineSimulator.step``;
* ``resnet20-gn pb``: the same for ResNet-20 with GroupNorm on 3x32x32 inputs (20 stages);
* ``20 stages x4 pb tick``: 20 linear layers of width 4 (no compute to speak of): the tick engine's fixed
  cost per tick against plain PyTorch's per step;
* ``resnet20-gn x K`` (K = 2, 4, 8 by default, ``--k``): K runs of ResNet-20-GN (own seeds, data and
  learning rates) with ``pipeprop.train_many`` vs the same K runs one after the other with
  ``PipelineSimulator``: the speed-up in run-samples/s;
* ``distributed P=2``: ``benchmarks/bench_distributed.py`` run unchanged as a subprocess (PB vs torch's
  ``Schedule1F1B`` at equal micro-batch, b = 16 and b = 1): samples/s of PB / samples/s of 1F1B.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import pipeprop
from pipeprop import models

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_simulator import chunks, compare, interleaved, mlp, passes_floor, summary  # noqa: E402

# the benchmark times linear LWP at momentum 0.9 on purpose (the setting); the regime warning is known
warnings.simplefilter("ignore", pipeprop.LWPRegimeWarning)


def resnet20() -> torch.nn.Module:
    return models.get("resnet20", norm="gn")


def tiny_stages() -> torch.nn.Module:
    """20 linear layers of width 4: no compute to speak of, so the time is fixed cost per step or tick."""
    return torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(20)])


def many_runs(k: int, steps: int, rounds: int, method: str) -> dict:
    """``train_many`` over K ResNet-20-GN runs vs the K runs separately, same models, data and lrs."""
    lrs = [1e-3 * 2 ** (i / 2) for i in range(k)]
    nets = []
    for seed in range(k):
        torch.manual_seed(seed)
        nets.append(resnet20())
    data = [[(torch.randn(1, 3, 32, 32), torch.randint(0, 10, (1,))) for _ in range(4 * steps)] for _ in range(k)]
    separate = [pipeprop.build_simulator(copy.deepcopy(m), F.cross_entropy, method=method, lr=lr, momentum=0.9)
                for m, lr in zip(nets, lrs)]
    many = pipeprop.build_multi_simulator([copy.deepcopy(m) for m in nets], F.cross_entropy, method=method,
                                          lr=lrs, momentum=0.9)
    feeds = [chunks(d, steps) for d in data]
    feed_many = chunks(list(zip(*data)), steps)
    for n in range(3):  # warm-up
        for sim, d in zip(separate, data):
            sim.step(*d[n])
        many.step([d[n][0] for d in data], [d[n][1] for d in data])

    def run_separate() -> None:  # each run for a chunk of steps, one after the other
        for sim, feed in zip(separate, feeds):
            for x, y in next(feed):
                sim.step(x, y)

    def run_many() -> None:
        for items in next(feed_many):
            many.step([x for x, _ in items], [y for _, y in items])

    a, b = interleaved(run_separate, run_many, rounds)
    sep, mny, ratio = summary(a, b)
    return dict(separate=k * steps / sep, many=k * steps / mny, speedup=1.0 / ratio)


def distributed(micro_batch: int, samples: int, timeout: int) -> dict:
    """PB vs torch Schedule1F1B samples/s at P = 2 from benchmarks/bench_distributed.py (a subprocess)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, str(Path(__file__).resolve().parent / "bench_distributed.py"), "--nproc", "2",
               "--micro-batch", str(micro_batch), "--samples", str(samples), "--schedules", "pb", "1f1b",
               "--json", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"{' '.join(cmd)} failed: {(proc.stderr or proc.stdout).strip()[-400:]}")
        rows = {r["schedule"]: r for r in json.loads(out.read_text())}
    pb = next(r for name, r in rows.items() if "PB" in name)
    ofob = next(r for name, r in rows.items() if "1F1B" in name)
    return dict(pb=pb["samples_per_s"], ofob=ofob["samples_per_s"], ratio=pb["samples_per_s"] / ofob["samples_per_s"],
                busy=pb["busy"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9, help="interleaved rounds per row (median reported)")
    ap.add_argument("--k", type=int, nargs="+", default=[2, 4, 8], help="runs for the train_many rows (one row each)")
    ap.add_argument("--many-method", default="pb+sc+lwp")
    ap.add_argument("--no-distributed", action="store_true", help="skip the distributed rows (two processes)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, 1 thread, batch size 1, {args.rounds} interleaved rounds per row, "
          f"load average {load:.1f} on {os.cpu_count()} CPUs")
    print(f"{'case':<34} {'reference':>12} {'pipeprop':>12} {'ratio':>7}")

    def row(case: str, ref: str, ours: str, ratio: float) -> None:
        print(f"{case:<34} {ref:>12} {ours:>12} {ratio:>6.2f}x", flush=True)

    torch.manual_seed(0)
    small = [(torch.randn(1, 3, 16, 16), torch.randint(0, 10, (1,))) for _ in range(500)]
    for method in ("pb", "pb+sc+lwp"):
        for engine, tag in (("simulator", ""), ("tick", " tick")):
            r = compare(mlp, small, method, steps=50, rounds=args.rounds, engine=engine)
            row(f"mlp 8x256 {method}{tag} / plain", f"{r['plain_ms']:.3f} ms", f"{r['sim_ms']:.3f} ms", r["ratio"])
    r = passes_floor(mlp, small, steps=50, rounds=args.rounds)
    row("mlp 8x256 sc/lwp passes / plain", f"{r['plain_ms']:.3f} ms", f"{r['sim_ms']:.3f} ms", r["ratio"])
    images = [(torch.randn(1, 3, 32, 32), torch.randint(0, 10, (1,))) for _ in range(100)]
    for engine, tag in (("simulator", ""), ("tick", " tick")):
        r = compare(resnet20, images, "pb", steps=10, rounds=args.rounds, engine=engine)
        row(f"resnet20-gn pb{tag} / plain", f"{r['plain_ms']:.2f} ms", f"{r['sim_ms']:.2f} ms", r["ratio"])
    tiny = [(torch.randn(1, 4), torch.randint(0, 4, (1,))) for _ in range(500)]
    r = compare(tiny_stages, tiny, "pb", steps=50, rounds=args.rounds, engine="tick")
    row("20 stages x4 pb tick / plain", f"{r['plain_ms']:.3f} ms", f"{r['sim_ms']:.3f} ms", r["ratio"])
    for k in args.k:
        r = many_runs(k, steps=4, rounds=max(3, args.rounds // 2), method=args.many_method)
        row(f"resnet20-gn x{k} {args.many_method} train_many", f"{r['separate']:.1f} r-s/s", f"{r['many']:.1f} r-s/s",
            r["speedup"])
    if not args.no_distributed:
        for b, samples in ((16, 1024), (1, 256)):
            try:
                d = distributed(b, samples, timeout=600)
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                print(f"distributed P=2 b={b}: not measured ({err})")
                continue
            busy = ", ".join(f"{x:.2f}" for x in d["busy"])
            row(f"distributed P=2 b={b} PB / 1F1B", f"{d['ofob']:.0f} s/s", f"{d['pb']:.0f} s/s", d["ratio"])
            print(f"{'':<34} PB busy fraction per rank: {busy}")
    print("ratios: pipeprop time / reference time for the first rows (lower is better); "
          "train_many and distributed: pipeprop samples/s / reference samples/s (higher is better)")


if __name__ == "__main__":
    main()
