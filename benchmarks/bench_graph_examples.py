"""Time the PB simulator on the graph-captured examples against plain PyTorch, in one process.

Usage:  PYTHONPATH=src python benchmarks/bench_graph_examples.py [--steps 40] [--rounds 5] [--threads 1]

Models: examples/resnet_torchvision_style.py (ResNet-18 layout, width 16, GroupNorm, 3x32x32 inputs) and
examples/nanogpt.py (GPT, 2 layers, 64 wide, 64 tokens, tied embedding, loss computed by the model).
Each round trains ``--steps`` micro-batches of size 1 with (a) plain PyTorch — ``loss.backward()`` and
``torch.optim.SGD(momentum=0.9).step()`` on an eager copy of the model — and (b) ``PipelineSimulator.step``
under each method; rounds interleave (a) and (b) to spread machine noise. The table shows the number of
stages, the median time per step and the ratio simulator / plain.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import pipeprop

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"pipeprop_example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def cases():
    rn = _load("resnet_torchvision_style")
    gpt = _load("nanogpt")
    g = torch.Generator().manual_seed(0)
    img = [(torch.randn(1, 3, 32, 32, generator=g), torch.randint(0, 10, (1,), generator=g)) for _ in range(8)]
    seqs = [torch.randint(0, 65, (1, 65), generator=g) for _ in range(8)]
    tok = [(s[:, :-1], s[:, 1:]) for s in seqs]
    torch.manual_seed(0)
    yield "resnet18-w16 (torchvision-style)", rn.resnet18(width=16), img, F.cross_entropy, lambda m, x, y: F.cross_entropy(m(x), y)
    torch.manual_seed(0)
    yield "nanoGPT 2x64 (tied)", gpt.GPT(gpt.GPTConfig()), tok, None, lambda m, x, y: m(x, y)[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default="sgd,pb,pb+sc+lwp")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"| model | stages | method | plain PyTorch ms/step | simulator ms/step | ratio |")
    print("|---|---|---|---|---|---|")
    for name, model, data, loss_fn, plain_loss in cases():
        plain = copy.deepcopy(model)
        opt = torch.optim.SGD(plain.parameters(), lr=1e-3, momentum=0.9)

        def run_plain():
            for i in range(args.steps):
                x, y = data[i % len(data)]
                opt.zero_grad(set_to_none=True)
                plain_loss(plain, x, y).backward()
                opt.step()

        sims = {}
        for method in args.methods.split(","):
            m = copy.deepcopy(model)
            sims[method] = pipeprop.build_simulator(
                m, loss_fn, method=method, lr=1e-3, momentum=0.9, example_input=data[0][0], example_target=data[0][1]
            )

        def run_sim(sim):
            for i in range(args.steps):
                x, y = data[i % len(data)]
                sim.step(x, y)

        run_plain()
        for sim in sims.values():
            run_sim(sim)
        times = {k: [] for k in ["plain", *sims]}
        for _ in range(args.rounds):
            t = time.perf_counter()
            run_plain()
            times["plain"].append((time.perf_counter() - t) / args.steps)
            for method, sim in sims.items():
                t = time.perf_counter()
                run_sim(sim)
                times[method].append((time.perf_counter() - t) / args.steps)
        base = statistics.median(times["plain"])
        for method, sim in sims.items():
            med = statistics.median(times[method])
            print(f"| {name} | {len(sim.stages)} | {method} | {1e3 * base:.2f} | {1e3 * med:.2f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
