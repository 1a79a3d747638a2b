"""Time every training method in the PB simulator relative to plain PB (``pb``), in one run.

Usage:  python benchmarks/bench_baselines.py [--steps 300] [--rounds 3] [--threads 1] [--methods a,b,...]

The same micro-batches (batch size 1) train a 7-layer MLP with each method; rounds cycle through the
methods to spread machine noise. The table shows the median time per step, the ratio to ``pb`` measured
in the same run, and the memory the simulator holds for weight versions plus the optimizer state.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import pipeprop


def mlp() -> nn.Sequential:
    layers: list[nn.Module] = []
    fan = 192
    for _ in range(6):
        layers += [nn.Linear(fan, 256), nn.ReLU()]
        fan = 256
    return nn.Sequential(*layers, nn.Linear(fan, 10))


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
               if isinstance(t, torch.Tensor))


def time_method(method: str, data: list[tuple[torch.Tensor, torch.Tensor]], init: dict) -> tuple[float, int]:
    model = mlp()
    model.load_state_dict(init)
    sim = pipeprop.build_simulator(model, F.cross_entropy, method=method, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    for x, y in data[:10]:  # warm-up
        sim.step(x, y)
    start = time.perf_counter()
    for x, y in data:
        sim.step(x, y)
    per_step = (time.perf_counter() - start) / len(data)
    return per_step, sim.weight_version_bytes() + state_bytes(sim.optimizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", default=",".join(pipeprop.available_methods()))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "pb" not in methods:
        methods.insert(0, "pb")
    data = [(torch.randn(1, 192), torch.randint(0, 10, (1,))) for _ in range(args.steps)]
    init = mlp().state_dict()
    times: dict[str, list[float]] = {m: [] for m in methods}
    memory: dict[str, int] = {}
    for _ in range(args.rounds):
        for m in methods:
            t, mem = time_method(m, data, init)
            times[m].append(t)
            memory[m] = mem
    base = statistics.median(times["pb"])
    print(f"{'method':<14} {'ms/step':>8} {'vs pb':>6} {'extra MB':>9}")
    for m in methods:
        med = statistics.median(times[m])
        print(f"{m:<14} {1e3 * med:8.3f} {med / base:6.2f} {memory[m] / 2**20:9.2f}")


if __name__ == "__main__":
    main()
