"""Where one ``PipelineSimulator.step`` spends its time, against plain PyTorch, on the 8-layer MLP.

Usage:  python benchmarks/profile_step.py [--width 16 256] [--methods sgd,pb,pb+sc+lwp] [--steps 300]

Times each part of the step by wrapping the simulator's own methods (weight binding, forward, loss,
optimizer step, pushing the next forward weights); ``backward+rest`` is what remains (autograd's backward
with the saved-tensor unpacking, the loss check, the spare-weight map). At width 16 compute is negligible,
so the differences between methods are their fixed per-step cost; at width 256 (the speed table's MLP)
memory traffic adds to it. Figures are ms per step; run it on a quiet machine (docs/performance.md).
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections import Counter

import torch
from torch import nn
import torch.nn.functional as F

import pipeprop

PARTS = ("bind", "forward", "loss", "optimizer", "push")


def mlp(width: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    fan = 3 * 16 * 16
    for _ in range(7):
        layers += [nn.Linear(fan, width), nn.ReLU()]
        fan = width
    return nn.Sequential(*layers, nn.Linear(fan, 10))


def timed(obj, name: str, key: str, acc: Counter) -> None:
    fn = getattr(obj, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[key] += time.perf_counter() - start

    setattr(obj, name, wrapper)


def profile(width: int, method: str, steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    data = [(torch.randn(1, 3, 16, 16), torch.randint(0, 10, (1,))) for _ in range(steps)]
    torch.manual_seed(1)
    sim = pipeprop.build_simulator(mlp(width), F.cross_entropy, method=method, lr=1e-3, momentum=0.9)
    torch.manual_seed(1)
    model = mlp(width)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def plain(x, y):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    for x, y in data[:30]:  # warm-up
        sim.step(x, y)
        plain(x, y)
    acc: Counter = Counter()
    timed(sim, "_bind_weights", "bind", acc)
    timed(sim, "forward", "forward", acc)
    timed(sim, "loss_fn", "loss", acc)
    timed(sim.optimizer, "engine_step", "optimizer", acc)
    timed(sim, "_push_forward_weights", "push", acc)
    start = time.perf_counter()
    for x, y in data:
        sim.step(x, y)
    total = time.perf_counter() - start
    start = time.perf_counter()
    for x, y in data:
        plain(x, y)
    ref = time.perf_counter() - start
    out = {k: 1e3 * acc[k] / steps for k in PARTS}
    out["backward+rest"] = 1e3 * total / steps - sum(out.values())
    out["total"], out["plain"] = 1e3 * total / steps, 1e3 * ref / steps
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, nargs="+", default=[16, 256])
    ap.add_argument("--methods", default="sgd,pb,pb+sc+lwp")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    cols = (*PARTS, "backward+rest", "total", "plain")
    print(f"ms per step, batch size 1, 1 thread, torch {torch.__version__}")
    print(f"{'width':>5} {'method':<10} " + " ".join(f"{c:>13}" for c in cols))
    for width in args.width:
        for method in args.methods.split(","):
            r = profile(width, method, args.steps)
            print(f"{width:>5} {method:<10} " + " ".join(f"{r[c]:>13.3f}" for c in cols), flush=True)


if __name__ == "__main__":
    main()
