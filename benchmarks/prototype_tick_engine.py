"""How fast could a tick-by-tick PB engine on live weights be? A measured prototype, not library code.

docs/performance.md ("Not tried yet: a tick-by-tick engine on live weights") describes an engine that runs
the pipeline as hardware does: in each tick every stage runs the forward of one micro-batch and the
backward of another on the weights it holds *now*, then all stages update. No version ring and no
saved-tensor hooks are needed, because

* the optimizer updates the weights in place through ``.data`` aliases, whose in-place writes autograd's
  version check does not see, so every backward reads the live weights (PB's semantics);
* for LWP the prediction is copied into the live storage for the forwards and the live weights are copied
  back after them (three multi-tensor copies per tick), so the saved views again hold the live weights by
  the time a backward reads them.

This script builds the smallest such engine (:class:`TickPrototype`: ``nn.Sequential`` models, SGD-family
methods whose backward reads the live weights; no checkpoints, no evaluations, no derived weights), first
checks in float64 that it equals :class:`pipeprop.PipelineSimulator` (every loss and the final weights),
then times plain PyTorch, the simulator and the prototype, interleaved, on one thread.

Usage:  python benchmarks/prototype_tick_engine.py [--models mlp resnet20] [--methods pb pb+sc+lwp] [--rounds 7]
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import pipeprop
from pipeprop import models
from pipeprop.methods import get_method

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_simulator import PlainLoop, interleaved, mlp, summary  # noqa: E402

warnings.simplefilter("ignore", pipeprop.LWPRegimeWarning)


def _leaves(out: Tensor | tuple) -> Tensor | tuple:
    """The next stage's input: detached leaves that collect the gradient to send back."""
    if isinstance(out, Tensor):
        return out.detach().requires_grad_()
    return tuple(o.detach().requires_grad_() for o in out)


class TickPrototype:
    """PB tick by tick on live weights (see the module docstring): :meth:`feed` micro-batches, then :meth:`drain`."""

    def __init__(self, model: nn.Module, method: str, lr: float, momentum: float) -> None:
        spec = get_method(method)
        if spec.weight_mode != "pb" or not spec.pipelined:
            raise ValueError(f"the prototype runs pipelined methods whose backward reads the live weights, not {method!r}")
        part = pipeprop.partition(model)
        self.stages = list(part.stages)
        self.params = [list(st.parameters()) for st in self.stages]
        self.alias = [[p.data for p in ps] for ps in self.params]  # same storage, own version counter
        groups = [{"params": a, "delay": int(d)} for a, d in zip(self.alias, part.delays)]
        self.opt = spec.build_optimizer(groups, optimizer=None, lr=lr, momentum=momentum, betas=None, eps=None,
                                        weight_decay=0.0)
        self.flat_params = [p for ps in self.params for p in ps]
        self.flat_alias = [a for al in self.alias for a in al]
        self.predicts = self.opt.predicts_forward_weights
        if self.predicts:
            self.backup = [torch.empty_like(a) for a in self.flat_alias]

        S = len(self.stages)
        self.t = 0  # the next tick
        self.batches: dict[int, tuple[Tensor, Tensor]] = {}  # fed micro-batches not yet at the last stage
        self.fed = 0
        self.inputs: dict[tuple[int, int], Any] = {}  # (s, n): stage s's input leaves for micro-batch n
        self.roots: dict[tuple[int, int], Any] = {}  # (s, n): stage s's output (the loss for the last stage)
        self.errors: dict[tuple[int, int], Any] = {}  # (s, n): gradient of stage s's output
        self.drain_ticks = 2 * (S - 1)

    def feed(self, batches: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        """Push micro-batches into stage 0, one tick each (no drain); returns the losses that came out."""
        losses = []
        for x, y in batches:
            self.batches[self.fed] = (x, y)
            self.fed += 1
            losses += self._tick()
        return losses

    def drain(self) -> list[Tensor]:
        """Run the ticks that finish every micro-batch fed so far."""
        losses = []
        while self.t < self.fed + self.drain_ticks:
            losses += self._tick()
        return losses

    def _tick(self) -> list[Tensor]:
        S, t, M = len(self.stages), self.t, self.fed
        losses = []
        if self.predicts:  # the forwards read each stage's prediction (written into the live storage), the
            torch._foreach_copy_(self.backup, self.flat_alias)  # backwards the live weights (copied back)
            self.opt.forward_weights_into([(g, out) for g, out in zip(self.opt.param_groups, self.alias)])
        for s in range(S):
            n = t - s
            if not 0 <= n < M:
                continue
            x = self.batches[n][0] if s == 0 else self.inputs[(s, n)]
            out = self.stages[s](x)
            if s == S - 1:
                out = F.cross_entropy(out, self.batches.pop(n)[1])
                losses.append(out.detach())
            else:
                self.inputs[(s + 1, n)] = _leaves(out)
            self.roots[(s, n)] = out
        if self.predicts:
            torch._foreach_copy_(self.flat_alias, self.backup)
        todo = [(s, t - 2 * (S - 1) + s) for s in range(S) if 0 <= t - 2 * (S - 1) + s < M]
        for p in self.flat_params:
            p.grad = None
        tensors, grads = [], []
        for k in todo:
            out, err = self.roots.pop(k), self.errors.pop(k, None)
            if isinstance(out, Tensor):
                tensors.append(out), grads.append(err)
            else:  # a tuple between stages (a residual block's (h, skip)): the parts that got a gradient
                for o, e in zip(out, err):
                    if e is not None:
                        tensors.append(o), grads.append(e)
        torch.autograd.backward(tensors, grads)
        for s, n in todo:
            if s > 0:
                x = self.inputs.pop((s, n))
                self.errors[(s - 1, n)] = x.grad if isinstance(x, Tensor) else tuple(v.grad for v in x)
        for p, a in zip(self.flat_params, self.flat_alias):
            a.grad = p.grad
        self.opt.engine_step()
        self.t += 1
        return losses


def check_equal_to_simulator(make: Callable[[], nn.Module], shape: tuple[int, ...], method: str, steps: int) -> float:
    """Largest difference (losses and final weights, float64) between the prototype and the simulator."""
    torch.manual_seed(0)
    model = make().double()
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(*shape, generator=g, dtype=torch.float64), torch.randint(0, 10, (1,), generator=g))
            for _ in range(steps)]
    sim = pipeprop.build_simulator(ref, F.cross_entropy, method=method, lr=1e-3, momentum=0.9)
    want = torch.tensor([sim.step(x, y) for x, y in data], dtype=torch.float64)
    proto = TickPrototype(model, method, lr=1e-3, momentum=0.9)
    got = torch.stack(proto.feed(data) + proto.drain())
    diff = (got - want).abs().max().item()
    for a, b in zip(model.parameters(), ref.parameters()):
        diff = max(diff, (a - b).abs().max().item())
    return diff


def time_three(make: Callable[[], nn.Module], data: list, method: str, steps: int, rounds: int) -> dict:
    """ms per micro-batch of plain PyTorch, the simulator and the prototype (each round: ``steps`` micro-batches)."""
    torch.manual_seed(1)
    plain = PlainLoop(make(), 1e-3, 0.9)
    torch.manual_seed(1)
    sim = pipeprop.build_simulator(make(), F.cross_entropy, method=method, lr=1e-3, momentum=0.9)
    torch.manual_seed(1)
    proto = TickPrototype(make(), method, lr=1e-3, momentum=0.9)
    S = len(proto.stages)
    chunk = data[:steps]

    def run_plain() -> None:
        for x, y in chunk:
            plain.step(x, y)

    def run_sim() -> None:
        for x, y in chunk:
            sim.step(x, y)

    def run_proto() -> None:  # one tick per micro-batch, in steady state (the pipeline stays full)
        proto.feed(chunk)[-1].item()

    run_plain(), run_sim(), run_proto()  # warm-up
    a, b = interleaved(run_plain, run_sim, rounds)
    c, d = interleaved(run_plain, run_proto, rounds)
    _, _, sim_ratio = summary(a, b)
    _, _, proto_ratio = summary(c, d)
    return dict(plain_ms=1e3 * summary(a, b)[0] / steps, sim=sim_ratio, proto=proto_ratio, stages=S)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mlp", "resnet20"], choices=["mlp", "resnet20"])
    ap.add_argument("--methods", nargs="+", default=["pb", "pb+sc+lwp"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--check-only", action="store_true", help="only the float64 equality check")
    args = ap.parse_args()
    torch.set_num_threads(1)
    makers = {"mlp": (mlp, (1, 3, 16, 16), 400), "resnet20": (lambda: models.get("resnet20", norm="gn"), (1, 3, 32, 32), 60)}
    for name in args.models:
        make, shape, steps = makers[name]
        for method in args.methods:
            diff = check_equal_to_simulator(make, shape, method, steps=min(steps, 60))
            print(f"{name} {method}: prototype vs simulator, float64, max |difference| {diff:.1e}", flush=True)
            if diff > 1e-9:
                raise SystemExit("the prototype does not equal the simulator: not timing it")
    if args.check_only:
        return
    print(f"{'case':<24} {'plain':>9} {'simulator':>10} {'prototype':>10}")
    for name in args.models:
        make, shape, steps = makers[name]
        g = torch.Generator().manual_seed(2)
        data = [(torch.randn(*shape, generator=g), torch.randint(0, 10, (1,), generator=g)) for _ in range(steps)]
        for method in args.methods:
            r = time_three(make, data, method, steps, args.rounds)
            print(f"{name + ' ' + method:<24} {r['plain_ms']:>6.2f} ms {r['sim']:>9.2f}x {r['proto']:>9.2f}x", flush=True)
    print("ratios: time per micro-batch / plain PyTorch's, medians of interleaved rounds (the prototype in steady "
          "state: one tick per micro-batch, the pipeline full)")


if __name__ == "__main__":
    main()
