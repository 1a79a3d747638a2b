"""Distributed engine vs torch.distributed.pipelining on the same model, stages and ranks (gloo on CPU).

For each process count P the model is an MLP of ``--blocks`` equal hidden blocks (Linear+ReLU, default P;
the classifier joins the last), one pipeline stage per block. The stages are assigned to ranks once per
launch (``--assignment``, default ``measured``: balanced by timed stage cost, agreed by all ranks) and
every schedule runs exactly those stage modules on those ranks, on the same samples at the same
micro-batch size ``b``, with one thread per rank:

* **pipeprop PB**: the asynchronous engine (:mod:`pipeprop.distributed`), one update per micro-batch,
  no flush;
* **GPipe** and **1F1B** (``torch.distributed.pipelining``): ``M`` micro-batches per mini-batch, fill and
  drain for every optimizer step.

After a warm-up of every schedule, ``--rounds`` timed rounds run the schedules interleaved (the order
alternating), and the medians are reported: samples/s, every rank's busy fraction = compute time / wall
time (compute = the rank's stage forwards, backwards down to the input's gradient, and optimizer steps:
the engine's own counters for PB, autograd markers around the stage for the torch schedules), PB over
1F1B (median of the per-round ratios) and where PB's time goes on each rank (forward, backward, update,
send, recv, other). The analytic bubble of fill-and-drain is (P-1)/(M+P-1).

    OMP_NUM_THREADS=1 python benchmarks/bench_distributed.py --nproc 2 --schedules pb 1f1b   # b = 16 and b = 1 rows
    OMP_NUM_THREADS=1 python benchmarks/bench_distributed.py --nproc 2 4 --micro-batch 16     # all three schedules

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


def _pb(comm: Any, args: Any, x: torch.Tensor, y: torch.Tensor, counts: list[int]) -> dict[str, Any]:
    from pipeprop.distributed import build_pipeline

    b = args.micro_batch
    model = make_model(args.blocks, args.width)
    engine = build_pipeline(model, F.cross_entropy, comm=comm, method="pb", lr=1e-3, momentum=0.9,
                            partition="layer", assignment=counts)
    batches = [(x[i : i + b], y[i : i + b]) for i in range(0, len(x), b)]
    stats = engine.run(batches, len(batches))
    return {"wall": stats.wall, "compute": stats.compute, "samples": len(batches) * b, "breakdown": stats.breakdown()}


def _torch_schedule(comm: Any, args: Any, x: torch.Tensor, y: torch.Tensor, kind: str, warmup: bool,
                    stages: range) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    import pipeprop

    world, rank, b, M = comm.world_size, comm.rank, args.micro_batch, args.chunks
    part = pipeprop.partition(make_model(args.blocks, args.width), "layer")  # the stage modules PB runs
    module = nn.Sequential(*[part.stages[s] for s in stages])
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

    import pipeprop
    from pipeprop.distributed import PipelineComm, assign_stages

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    comm = PipelineComm.from_env(timeout=120)
    x, y = data(args.samples, args.width)
    # one assignment of stages to ranks, used by every schedule (collective for "measured")
    part = pipeprop.partition(make_model(args.blocks, args.width), "layer")
    ranges = assign_stages(part.stages, world, args.assignment, x[: args.micro_batch], comm=comm)
    counts = [len(r) for r in ranges]
    # warm-up (allocations, first-call costs), then the timed runs, interleaved, the order alternating
    _pb(comm, args, x[: 4 * args.micro_batch * world], y[: 4 * args.micro_batch * world], counts)
    for kind in args.schedules:
        if kind != "pb":
            _torch_schedule(comm, args, x, y, kind, True, ranges[rank])
    res: dict[str, Any] = {"counts": counts}
    for k in range(args.rounds):
        order = list(args.schedules) if k % 2 == 0 else list(reversed(args.schedules))
        for name in order:
            r = _pb(comm, args, x, y, counts) if name == "pb" else _torch_schedule(comm, args, x, y, name, False, ranges[rank])
            res.setdefault(name, []).append(r)
    torch.save(res, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LABELS = {"pb": "pipeprop PB (async)", "gpipe": "torch ScheduleGPipe", "1f1b": "torch Schedule1F1B"}


def _median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def bench(world: int, args: Any, out: Path) -> list[dict[str, Any]]:
    """One row per schedule: medians over the interleaved rounds (samples/s of a round: all samples over
    the slowest rank's wall time), busy fractions and PB's time breakdown of the median round."""
    mp.start_processes(_rank, args=(world, free_port(), args, str(out)), nprocs=world, start_method="spawn")
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(world)]
    S, M = args.blocks, args.chunks
    bubble = (world - 1) / (M + world - 1)
    rounds = {name: [[r[name][k] for r in ranks] for k in range(args.rounds)] for name in args.schedules}
    speed = {name: [per[0]["samples"] / max(x["wall"] for x in per) for per in rounds[name]] for name in args.schedules}
    rows = []
    for name in args.schedules:
        med = _median(speed[name])
        k = min(range(args.rounds), key=lambda i: abs(speed[name][i] - med))
        per = rounds[name][k]
        row = {
            "P": world, "S": S, "schedule": LABELS[name], "samples": per[0]["samples"], "samples_per_s": med,
            "samples_per_s_rounds": speed[name], "busy": [x["compute"] / x["wall"] for x in per],
            "bubble": 0.0 if name == "pb" else bubble, "breakdown": [x.get("breakdown") for x in per],
            "stages_per_rank": ranks[0]["counts"],
        }
        if name == "pb" and "1f1b" in speed:
            row["ratio_vs_1f1b"] = _median([a / b for a, b in zip(speed["pb"], speed["1f1b"])])
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, nargs="+", default=[2, 4])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--blocks", type=int, default=None, help="hidden blocks = pipeline stages (default: P)")
    p.add_argument("--micro-batch", type=int, nargs="+", default=[16, 1], help="micro-batch sizes b (a row set each)")
    p.add_argument("--samples", type=int, default=None, help="samples per run (default: 1024 for b >= 16, else 384)")
    p.add_argument("--chunks", type=int, default=8, help="micro-batches per GPipe/1F1B mini-batch (M)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds (medians reported)")
    p.add_argument("--assignment", default="measured", help="stages per rank for every schedule (PB's options)")
    p.add_argument("--schedules", nargs="+", default=["pb", "gpipe", "1f1b"], choices=["pb", "gpipe", "1f1b"])
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import tempfile

    rows = []
    for b in args.micro_batch:
        for world in args.nproc:
            samples = args.samples or (1024 if b >= 16 else 384)
            run_args = argparse.Namespace(**{**vars(args), "blocks": args.blocks or world, "micro_batch": b,
                                             "samples": samples})
            with tempfile.TemporaryDirectory() as tmp:
                rows += [{**r, "b": b} for r in bench(world, run_args, Path(tmp))]
    print(f"\nMLP width {args.width}, M={args.chunks} micro-batches per GPipe/1F1B step, gloo on CPU, one thread "
          f"per rank, assignment {args.assignment!r}, median of {args.rounds} interleaved rounds, torch "
          f"{torch.__version__}, {os.cpu_count()} CPUs\n")
    print("| b | P | S | stages per rank | schedule | samples | samples/s | busy fraction per rank (compute/wall) "
          "| analytic bubble (P-1)/(M+P-1) |")
    print("|---|---|---|---|---|---:|---:|---|---:|")
    for r in rows:
        busy = ", ".join(f"{v:.2f}" for v in r["busy"])
        counts = ",".join(map(str, r["stages_per_rank"]))
        print(f"| {r['b']} | {r['P']} | {r['S']} | {counts} | {r['schedule']} | {r['samples']} | {r['samples_per_s']:.0f} "
              f"| {busy} | {r['bubble']:.3f} |")
    print()
    for r in rows:
        if "ratio_vs_1f1b" in r:
            rounds = ", ".join(f"{v:.0f}" for v in r["samples_per_s_rounds"])
            print(f"b={r['b']} P={r['P']}: PB / 1F1B samples/s = {r['ratio_vs_1f1b']:.2f}x (median of per-round "
                  f"ratios; PB per round: {rounds})")
    print("\nWhere PB's time goes (fraction of each rank's wall time, median round):\n")
    for r in rows:
        if r["breakdown"][0]:
            for k, br in enumerate(r["breakdown"]):
                print(f"b={r['b']} P={r['P']} rank {k}: " + ", ".join(f"{key} {v:.2f}" for key, v in br.items()))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    sys.exit(main())
