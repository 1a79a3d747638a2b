"""Which rank holds which stages: contiguous stage ranges, balanced by estimated cost or given explicitly.

Every rank computes the assignment itself, so it must be deterministic: costs are *estimated* (forward
FLOPs counted by :class:`torch.utils.flop_counter.FlopCounterMode` on a sample input, or parameter
counts), never timed.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

import torch
from torch import nn

from ..partition import _balanced_cuts

__all__ = ["AssignmentSpec", "forward_flops", "stage_costs", "balance_stages", "assign_stages", "ASSIGNMENT_KINDS"]

#: "flops", "params", "uniform", "2,1,1" (stages per rank) or a sequence of ints
AssignmentSpec = Union[str, Sequence[int]]

ASSIGNMENT_KINDS = ("flops", "params", "uniform")


def forward_flops(module: nn.Module, x: Any) -> tuple[float, Any]:
    """FLOPs of ``module(x)`` counted by :class:`torch.utils.flop_counter.FlopCounterMode` (a multiply-add
    is 2), and the output; the one FLOP counter of pipeprop (no grad, RNG untouched)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.random.fork_rng(devices=[]), torch.no_grad(), counter:
        out = module(x)
    return float(counter.get_total_flops()), out


def stage_costs(stages: Sequence[nn.Module], kind: str = "flops", sample_input: Any = None) -> list[float]:
    """Estimated cost of each stage.

    ``"flops"`` counts the forward FLOPs of each stage on ``sample_input`` (plus the size of its output, a
    proxy for elementwise work), leaving the stages' buffers and the RNG state untouched; ``"params"``
    counts parameters; ``"uniform"`` gives every stage cost 1.
    """
    if kind == "uniform":
        return [1.0] * len(stages)
    if kind == "params":
        return [float(sum(p.numel() for p in st.parameters())) + 1.0 for st in stages]
    if kind != "flops":
        raise ValueError(f"unknown cost estimate {kind!r}; choose one of {ASSIGNMENT_KINDS} or give stage counts")
    if sample_input is None:
        raise ValueError("assignment 'flops' needs a sample input (one micro-batch); or use 'params'")
    costs: list[float] = []
    saved = [[b.detach().clone() for b in st.buffers()] for st in stages]
    x = sample_input
    with torch.random.fork_rng(devices=[]):
        for st in stages:
            flops, x = forward_flops(st, x)
            outs = [x] if isinstance(x, torch.Tensor) else [t for t in x if isinstance(t, torch.Tensor)]
            costs.append(flops + float(sum(t.numel() for t in outs)))
    with torch.no_grad():
        for st, bufs in zip(stages, saved):
            for b, v in zip(st.buffers(), bufs):
                b.copy_(v)
    return costs


def balance_stages(costs: Sequence[float], world_size: int) -> list[range]:
    """Contiguous stage ranges, one per rank, minimising the largest summed cost."""
    if world_size < 1:
        raise ValueError(f"need at least one process, got {world_size}")
    if world_size > len(costs):
        raise ValueError(
            f"{world_size} processes but only {len(costs)} pipeline stages: every process needs a stage, so use "
            f"--nproc <= {len(costs)} or a finer partition"
        )
    starts = _balanced_cuts(list(costs), world_size)
    bounds = list(starts) + [len(costs)]
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _parse_counts(spec: AssignmentSpec) -> list[int] | None:
    if isinstance(spec, str):
        if spec in ASSIGNMENT_KINDS:
            return None
        try:
            return [int(v) for v in spec.replace(" ", "").split(",") if v]
        except ValueError:
            raise ValueError(
                f"unknown assignment {spec!r}: use one of {ASSIGNMENT_KINDS} or stage counts per rank such as '2,1,1'"
            ) from None
    return [int(v) for v in spec]


def assign_stages(
    stages: Sequence[nn.Module], world_size: int, spec: AssignmentSpec = "flops", sample_input: Any = None
) -> list[range]:
    """The stage range of every rank for ``spec`` (see :data:`AssignmentSpec`)."""
    counts = _parse_counts(spec)
    if counts is None:
        return balance_stages(stage_costs(stages, str(spec), sample_input), world_size)
    if len(counts) != world_size or any(c < 1 for c in counts) or sum(counts) != len(stages):
        raise ValueError(
            f"explicit assignment {counts} must give each of the {world_size} processes at least one stage and "
            f"{len(stages)} stages in total"
        )
    out, a = [], 0
    for c in counts:
        out.append(range(a, a + c))
        a += c
    return out
