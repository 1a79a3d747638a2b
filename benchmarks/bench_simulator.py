"""Time the PB simulator against plain PyTorch batch-size-1 SGD on the same model and data, in one run.

Usage:  python benchmarks/bench_simulator.py [--steps 50] [--rounds 11] [--threads 1]

For each model (an MLP and a small CNN) and each method, the same micro-batches are trained with
(a) a plain loop ``loss = f(model(x), y); loss.backward(); torch.optim.SGD.step(); loss.item()`` and (b)
``PipelineSimulator.step`` (which returns the loss as a float, too). The two alternate every ``--steps``
steps (the order swaps every round), so both see the same machine load; the table shows the median time
per step and the median over rounds of the ratio simulator / plain, plus the memory held for weight
versions. ``benchmarks/bench_table.py`` (``make bench``) prints the summary table of docs/performance.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

import pipeprop


def mlp() -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    fan = 3 * 16 * 16
    for _ in range(7):
        layers += [nn.Linear(fan, 256), nn.ReLU()]
        fan = 256
    return nn.Sequential(*layers, nn.Linear(fan, 10))


def small_cnn() -> nn.Sequential:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
        *block(64, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def interleaved(first: Callable[[], None], second: Callable[[], None], rounds: int) -> tuple[list[float], list[float]]:
    """Seconds per round of ``first()`` and ``second()``, run alternately (the order swaps every round) so
    that both see the same machine load; compare them round by round (see :func:`summary`)."""
    a: list[float] = []
    b: list[float] = []
    for r in range(rounds):
        for fn, out in ((first, a), (second, b)) if r % 2 == 0 else ((second, b), (first, a)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return a, b


def summary(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Median of ``a``, median of ``b`` and the median of the per-round ratios ``b / a``."""
    return statistics.median(a), statistics.median(b), statistics.median(y / x for x, y in zip(a, b))


class PlainLoop:
    """``model(x)``, ``loss.backward()``, ``torch.optim.SGD.step()``, ``loss.item()``: plain PyTorch."""

    def __init__(self, model: nn.Module, lr: float, momentum: float) -> None:
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()
        return loss.item()


class MitigationPassesLoop(PlainLoop):
    """:class:`PlainLoop` plus the passes over the weights that ``pb+sc+lwp`` adds when it runs on live weights
    and equals the simulator bit for bit (the tick engine): the prediction written into the weights the forward
    reads, the live weights copied back over it for the backward, and SC's gradient term after a fused
    heavy-ball step. No pipeline, no delay: the least such an engine can cost per step, as a yardstick."""

    def __init__(self, model: nn.Module, lr: float, momentum: float, horizon: int = 8) -> None:
        self.model, self.lr, self.horizon = model, lr, horizon
        self.params = list(model.parameters())
        self.forward_weights = [p.data for p in self.params]
        self.live = [p.detach().clone() for p in self.params]
        self.opt = torch.optim.SGD(self.live, lr=lr, momentum=momentum, fused=True)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        for f, w in zip(self.forward_weights, self.live):
            v = self.opt.state[w].get("momentum_buffer")
            torch.add(w, v, alpha=-self.lr * self.horizon, out=f) if v is not None else f.copy_(w)
        loss = F.cross_entropy(self.model(x), y)
        torch._foreach_copy_(self.forward_weights, self.live)
        loss.backward()
        for w, p in zip(self.live, self.params):
            w.grad, p.grad = p.grad, None
        self.opt.step()
        torch._foreach_add_(self.live, [w.grad for w in self.live], alpha=-self.lr * 0.5)
        return loss.item()


def passes_floor(make: Callable[[], nn.Module], data: list, steps: int, rounds: int, lr: float = 1e-3,
                 momentum: float = 0.9) -> dict:
    """:class:`PlainLoop` vs :class:`MitigationPassesLoop` on the same model and data, interleaved."""
    torch.manual_seed(1)
    plain = PlainLoop(make(), lr, momentum)
    torch.manual_seed(1)
    passes = MitigationPassesLoop(make(), lr, momentum)
    feed_a, feed_b = chunks(data, steps), chunks(data, steps)
    for x, y in data[:20]:
        plain.step(x, y)
        passes.step(x, y)

    def run(loop: PlainLoop, feed) -> Callable[[], None]:
        def steps() -> None:
            for x, y in next(feed):
                loop.step(x, y)

        return steps

    p, s, ratio = summary(*interleaved(run(plain, feed_a), run(passes, feed_b), rounds))
    return dict(plain_ms=1e3 * p / steps, sim_ms=1e3 * s / steps, ratio=ratio)


def chunks(data: list, size: int):
    """Endless cycle over ``data`` in chunks of ``size`` items."""
    i = 0
    while True:
        yield [data[(i + k) % len(data)] for k in range(size)]
        i += size


def compare(make: Callable[[], nn.Module], data: list, method: str, steps: int, rounds: int,
            lr: float = 1e-3, momentum: float = 0.9, engine: str = "simulator") -> dict:
    """Plain PyTorch vs pipeprop on the same model and data, ``steps`` micro-batches per round each.

    ``engine="simulator"``: ``PipelineSimulator.step``; ``engine="tick"``: ``TickPipeline.feed`` in steady
    state (the pipeline full, one tick per micro-batch; losses read in blocks).
    """
    torch.manual_seed(1)
    plain = PlainLoop(make(), lr, momentum)
    torch.manual_seed(1)
    if engine == "tick":
        sim = pipeprop.build_tick_pipeline(make(), F.cross_entropy, method=method, lr=lr, momentum=momentum)
        step = sim.feed
    else:
        sim = pipeprop.build_simulator(make(), F.cross_entropy, method=method, lr=lr, momentum=momentum)
        step = sim.step
    feed_a, feed_b = chunks(data, steps), chunks(data, steps)
    for x, y in data[: max(20, 2 * len(sim.stages))]:  # warm-up: allocator, caches, ring or pipeline filled
        plain.step(x, y)
        step(x, y)

    def run_plain() -> None:
        for x, y in next(feed_a):
            plain.step(x, y)

    def run_sim() -> None:
        for x, y in next(feed_b):
            step(x, y)

    a, b = interleaved(run_plain, run_sim, rounds)
    p, s, ratio = summary(a, b)
    versions = sim.weight_version_bytes() / 2**20 if engine == "simulator" else 0.0
    return dict(plain_ms=1e3 * p / steps, sim_ms=1e3 * s / steps, ratio=ratio, stages=len(sim.stages),
                versions_mib=versions)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50, help="steps per round and loop")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default="sgd,pb,pb+sc+lwp,pb+stash")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = [(torch.randn(1, 3, 16, 16), torch.randint(0, 10, (1,))) for _ in range(500)]
    print(f"{args.steps} steps x {args.rounds} interleaved rounds, batch size 1, {args.threads} thread(s), "
          f"torch {torch.__version__}; ratio = median over rounds of sim/plain")
    print(f"{'model':<10} {'method':<10} {'plain ms/step':>13} {'sim ms/step':>11} {'ratio':>6} {'stages':>6} {'versions MiB':>12}")
    for name, make in (("mlp", mlp), ("cnn", small_cnn)):
        for method in args.methods.split(","):
            r = compare(make, data, method, args.steps, args.rounds)
            print(f"{name:<10} {method:<10} {r['plain_ms']:>13.3f} {r['sim_ms']:>11.3f} {r['ratio']:>6.2f} "
                  f"{r['stages']:>6} {r['versions_mib']:>12.2f}", flush=True)


if __name__ == "__main__":
    main()
