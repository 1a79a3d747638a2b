"""Distributed engine vs torch.distributed.pipelining on the same model and stages (gloo on CPU).

For each process count P the model is an MLP of P equal hidden blocks (Linear+ReLU, the classifier joins
the last), split into P stages, one per rank. All schedules see the same samples at the same micro-batch
size ``b``:

* **pipeprop PB**: the asynchronous engine (:mod:`pipeprop.distributed`), one update per micro-batch,
  no flush;
* **GPipe** and **1F1B** (``torch.distributed.pipelining``): ``M`` micro-batches per mini-batch, fill and
  drain for every optimizer step.

Reported per schedule: samples/s, and every rank's busy fraction = compute time / wall time, where
compute is the time spent in the rank's stage forward, backward (from the output's gradient to the
input's, timed by autograd markers around the stage) and optimizer steps: the engine's own counters for
PB, the same events for the torch schedules. The analytic bubble of fill-and-drain is (S-1)/(M+S-1).

    OMP_NUM_THREADS=1 python benchmarks/bench_distributed.py --nproc 2 4 --samples 1024 --micro-batch 16 --chunks 8

Numbers from a shared 2-core machine are noisy; compare ratios within one run only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn


def make_model(stages: int, width: int, classes: int = 10) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(stages):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, classes))
    layers[-1].pipeprop_starts_stage = False  # the classifier joins the last block: P equal stages
    return nn.Sequential(*layers)


def stage_modules(model: nn.Sequential, stages: int) -> list[nn.Sequential]:
    mods = list(model)
    out = [nn.Sequential(*mods[2 * i : 2 * i + 2]) for i in range(stages)]
    out[-1].append(mods[-1])
    return out


def data(samples: int, width: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(samples, width, generator=g), torch.randint(0, 10, (samples,), generator=g)


class _Clock:
    """Accumulates the compute time of one stage: forward, backward and optimizer steps."""

    def __init__(self) -> None:
        self.total = 0.0
        self.mark = 0.0


class _BackwardStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, clock: _Clock, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.clock = clock
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        ctx.clock.mark = time.perf_counter()
        return None, g


class _BackwardEnd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, clock: _Clock, x: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.clock = clock
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        ctx.clock.total += time.perf_counter() - ctx.clock.mark
        return None, g, None


class Timed(nn.Module):
    """Wraps a stage so that its forward and backward (up to its input) are timed."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.clock = _Clock()
        self._anchor = torch.zeros((), requires_grad=True)  # puts the end marker into the graph on stage 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        x = _BackwardEnd.apply(self.clock, x, self._anchor)
        y = self.inner(x)
        self.clock.total += time.perf_counter() - t0
        return _BackwardStart.apply(self.clock, y)


def _pb(comm: Any, args: Any, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    from pipeprop.distributed import build_pipeline

    world, b = comm.world_size, args.micro_batch
    model = make_model(world, args.width)
    engine = build_pipeline(model, F.cross_entropy, comm=comm, method="pb", lr=1e-3, momentum=0.9,
                            partition=world, assignment="uniform")
    batches = [(x[i : i + b], y[i : i + b]) for i in range(0, len(x), b)]
    stats = engine.run(batches, len(batches))
    return {"wall": stats.wall, "compute": stats.compute, "samples": len(batches) * b}


def _torch_schedule(comm: Any, args: Any, x: torch.Tensor, y: torch.Tensor, kind: str, warmup: bool) -> dict[str, float]:
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    world, rank, b, M = comm.world_size, comm.rank, args.micro_batch, args.chunks
    module = stage_modules(make_model(world, args.width), world)[rank]
    timed = Timed(module)
    stage = PipelineStage(timed, rank, world, torch.device("cpu"))
    cls = ScheduleGPipe if kind == "gpipe" else Schedule1F1B
    schedule = cls(stage, n_microbatches=M, loss_fn=F.cross_entropy)
    opt = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)
    batch = b * M
    iters = len(x) // batch
    if warmup:
        iters = min(iters, 2)
    dist.barrier()
    t0 = time.perf_counter()
    for i in range(iters):
        xb, yb = x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]
        if rank == 0:
            schedule.step(xb)
        elif rank == world - 1:
            schedule.step(target=yb, losses=[])
        else:
            schedule.step()
        s0 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        timed.clock.total += time.perf_counter() - s0
    wall = time.perf_counter() - t0
    timed.clock.total = timed.clock.total if not warmup else 0.0
    return {"wall": wall, "compute": timed.clock.total, "samples": iters * batch}


def _rank(rank: int, world: int, port: int, args: Any, out: str) -> None:
    import torch.distributed as dist

    from pipeprop.distributed import PipelineComm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    comm = PipelineComm.from_env(timeout=120)
    x, y = data(args.samples, args.width)
    res: dict[str, Any] = {}
    # warm-up (allocations, first-call costs), then the timed runs in turn
    _pb(comm, args, x[: 4 * args.micro_batch * world], y[: 4 * args.micro_batch * world])
    for kind in ("gpipe", "1f1b"):
        _torch_schedule(comm, args, x, y, kind, warmup=True)
    for _ in range(args.repeat):
        for name in ("pb", "gpipe", "1f1b"):
            r = _pb(comm, args, x, y) if name == "pb" else _torch_schedule(comm, args, x, y, name, warmup=False)
            best = res.get(name)
            if best is None or r["wall"] < best["wall"]:
                res[name] = r
    torch.save(res, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench(world: int, args: Any, out: Path) -> list[dict[str, Any]]:
    mp.start_processes(_rank, args=(world, free_port(), args, str(out)), nprocs=world, start_method="spawn")
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(world)]
    rows = []
    S, M = world, args.chunks
    bubble = (S - 1) / (M + S - 1)
    for name, label in (("pb", "pipeprop PB (async)"), ("gpipe", "torch ScheduleGPipe"), ("1f1b", "torch Schedule1F1B")):
        wall = max(r[name]["wall"] for r in ranks)
        samples = ranks[0][name]["samples"]
        busy = [r[name]["compute"] / r[name]["wall"] for r in ranks]
        rows.append({
            "P": world, "schedule": label, "samples": samples, "samples_per_s": samples / wall,
            "busy": busy, "bubble": 0.0 if name == "pb" else bubble,
        })
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, nargs="+", default=[2, 4])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--chunks", type=int, default=8, help="micro-batches per GPipe/1F1B mini-batch (M)")
    p.add_argument("--repeat", type=int, default=1, help="timed repetitions (best wall time kept)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import tempfile

    rows = []
    for world in args.nproc:
        with tempfile.TemporaryDirectory() as tmp:
            rows += bench(world, args, Path(tmp))
    print(f"\nMLP width {args.width}, micro-batch b={args.micro_batch}, M={args.chunks} micro-batches per "
          f"GPipe/1F1B step, {args.samples} samples, gloo on CPU, torch {torch.__version__}, {os.cpu_count()} CPUs\n")
    print("| P=S | schedule | samples/s | busy fraction per rank (compute/wall) | analytic bubble (S-1)/(M+S-1) |")
    print("|---|---|---:|---|---:|")
    for r in rows:
        busy = ", ".join(f"{v:.2f}" for v in r["busy"])
        print(f"| {r['P']} | {r['schedule']} | {r['samples_per_s']:.0f} | {busy} | {r['bubble']:.3f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    sys.exit(main())
