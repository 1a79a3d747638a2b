"""Time the PB simulator against plain PyTorch batch-size-1 SGD on the same model and data, in one run.

Usage:  python benchmarks/bench_simulator.py [--steps 1500] [--rounds 5] [--threads 1]

For each model (an MLP and a small CNN) and each method, the same micro-batches are trained with
(a) a plain loop ``loss = f(model(x), y); loss.backward(); torch.optim.SGD.step()`` and (b)
``PipelineSimulator.step``. Rounds alternate between the two to spread machine noise; the table shows
the median time per step and the ratio simulator / plain, plus the memory held for weight versions.
"""

from __future__ import annotations

import argparse
import statistics
import time

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


def plain_loop(model: nn.Module, data, lr: float, momentum: float) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    start = time.perf_counter()
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        loss.item()
    return (time.perf_counter() - start) / len(data)


def simulator_loop(model: nn.Module, data, method: str, lr: float, momentum: float) -> tuple[float, int]:
    sim = pipeprop.build_simulator(model, F.cross_entropy, method=method, lr=lr, momentum=momentum)
    start = time.perf_counter()
    for x, y in data:
        sim.step(x, y)
    return (time.perf_counter() - start) / len(data), sim.weight_version_bytes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default="sgd,pb,pb+sc+lwp,pb+stash")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = [(torch.randn(1, 3, 16, 16), torch.randint(0, 10, (1,))) for _ in range(args.steps)]
    print(f"{args.steps} steps x {args.rounds} rounds, batch size 1, {args.threads} thread(s), torch {torch.__version__}")
    print(f"{'model':<10} {'method':<10} {'plain ms/step':>13} {'sim ms/step':>11} {'ratio':>6} {'stages':>6} {'versions MiB':>12}")
    for name, make in (("mlp", mlp), ("cnn", small_cnn)):
        stages = len(pipeprop.partition(make()))
        for method in args.methods.split(","):
            plain, sim, mem = [], [], 0
            for _ in range(args.rounds):
                torch.manual_seed(1)
                plain.append(plain_loop(make(), data, 1e-3, 0.9))
                torch.manual_seed(1)
                t, mem = simulator_loop(make(), data, method, 1e-3, 0.9)
                sim.append(t)
            p, s = statistics.median(plain), statistics.median(sim)
            print(f"{name:<10} {method:<10} {1e3 * p:>13.3f} {1e3 * s:>11.3f} {s / p:>6.2f} {stages:>6} {mem / 2**20:>12.2f}", flush=True)


if __name__ == "__main__":
    main()
