"""Which rank holds which stages: contiguous stage ranges, balanced by estimated or measured cost, or given.

Every rank computes the assignment itself, so all ranks must arrive at the same one. Estimated costs
(forward FLOPs counted by :class:`torch.utils.flop_counter.FlopCounterMode` on a sample input, parameter
counts) are deterministic. *Measured* costs (``"measured"``: a short timing of each stage's forward,
backward and update, :func:`measure_stage_times`) differ from rank to rank, so every rank times every
stage and the ranks average their timings (an all-reduce over the pipeline's process group) before
balancing: one assignment for all.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ..partition import _balanced_cuts

__all__ = [
    "AssignmentSpec",
    "forward_flops",
    "stage_costs",
    "measure_stage_times",
    "balance_stages",
    "assign_stages",
    "ASSIGNMENT_KINDS",
]

#: "flops", "params", "uniform", "measured", "2,1,1" (stages per rank) or a sequence of ints
AssignmentSpec = Union[str, Sequence[int]]

ASSIGNMENT_KINDS = ("flops", "params", "uniform", "measured")


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
    if kind == "measured":
        return measure_stage_times(stages, sample_input)
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


def _tensors(payload: Any) -> list[torch.Tensor]:
    if isinstance(payload, torch.Tensor):
        return [payload]
    if isinstance(payload, (tuple, list)):
        return [t for t in payload if isinstance(t, torch.Tensor)]
    return []


def _detached(payload: Any) -> Any:
    if isinstance(payload, torch.Tensor):
        return payload.detach()
    if isinstance(payload, (tuple, list)):
        return type(payload)(t.detach() if isinstance(t, torch.Tensor) else t for t in payload)
    return payload


def _as_stage_input(payload: Any) -> Any:
    """A detached copy whose floating tensors require grad (as a received activation)."""

    def leaf(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.requires_grad_(True) if t.is_floating_point() or t.is_complex() else t

    if isinstance(payload, torch.Tensor):
        return leaf(payload)
    if isinstance(payload, (tuple, list)):
        return type(payload)(leaf(t) if isinstance(t, torch.Tensor) else t for t in payload)
    return payload


def measure_stage_times(
    stages: Sequence[nn.Module], sample_input: Any, *, repeats: int = 5, momentum: float = 0.9
) -> list[float]:
    """Seconds one micro-batch costs each stage, as the asynchronous pipeline runs it: the forward, the
    backward from an error of the output's shape (down to the input's gradient except at stage 0, whose
    input is data) and a momentum-SGD update of the stage's parameters (``v ← m v + g``, ``w ← w − η v``,
    on copies). The median of ``repeats`` timings after one untimed warm-up.

    Nothing observable changes: parameters, their ``.grad``, the stages' buffers and the RNG state are as
    before. Stages are timed where they are (their current device).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if sample_input is None:
        raise ValueError("assignment 'measured' needs a sample input (one micro-batch)")
    saved = [[b.detach().clone() for b in st.buffers()] for st in stages]
    times: list[float] = []
    x = sample_input
    try:
        with torch.random.fork_rng(devices=[]):
            for s, st in enumerate(stages):
                params = [p for p in st.parameters() if p.requires_grad]
                weights = [p.detach().clone() for p in params]
                velocity = [torch.zeros_like(w) for w in weights]
                runs: list[float] = []
                out: Any = None
                for k in range(repeats + 1):
                    inputs = x if s == 0 else _as_stage_input(x)
                    t0 = time.perf_counter()
                    out = st(inputs)
                    outs = [o for o in _tensors(out) if o.requires_grad]
                    wrt = params + ([t for t in _tensors(inputs) if t.requires_grad] if s > 0 else [])
                    grads = (
                        torch.autograd.grad(outs, wrt, [torch.ones_like(o) for o in outs], allow_unused=True)
                        if outs and wrt
                        else [None] * len(wrt)
                    )
                    with torch.no_grad():
                        g = [gr if gr is not None else torch.zeros_like(w)
                             for gr, w in zip(grads[: len(params)], weights)]
                        if weights:
                            torch._foreach_mul_(velocity, momentum)
                            torch._foreach_add_(velocity, g)
                            torch._foreach_add_(weights, velocity, alpha=-1e-3)
                    if weights and weights[0].device.type == "cuda":
                        torch.cuda.synchronize(weights[0].device)
                    if k > 0:
                        runs.append(time.perf_counter() - t0)
                runs.sort()
                times.append(runs[len(runs) // 2])
                x = _detached(out)
    finally:
        with torch.no_grad():
            for st, bufs in zip(stages, saved):
                for b, v in zip(st.buffers(), bufs):
                    b.copy_(v)
    return times


def _agreed(costs: list[float], comm: Any) -> list[float]:
    """The ranks' average of ``costs`` (every rank of ``comm``'s pipeline must call this, in step)."""
    if comm is None or comm.world_size <= 1:
        return costs
    import torch.distributed as dist

    t = torch.tensor(costs, dtype=torch.float64, device=comm.device)
    dist.all_reduce(t, group=comm.group)
    return [v / comm.world_size for v in t.tolist()]


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
    stages: Sequence[nn.Module],
    world_size: int,
    spec: AssignmentSpec = "flops",
    sample_input: Any = None,
    *,
    comm: Optional[Any] = None,
) -> list[range]:
    """The stage range of every rank for ``spec`` (see :data:`AssignmentSpec`).

    ``"measured"`` times the stages (:func:`measure_stage_times`) and, with more than one rank, needs the
    pipeline's ``comm`` (a :class:`~pipeprop.distributed.comm.PipelineComm`): it is then collective, every
    rank calls it at the same point, and all get the assignment of the averaged timings.
    """
    counts = _parse_counts(spec)
    if counts is None and spec == "measured":
        if world_size > 1 and (comm is None or comm.world_size != world_size):
            raise ValueError(
                "assignment 'measured' on several processes needs the pipeline's comm (the ranks must agree on one "
                "timing): pass comm=..., or use 'flops'"
            )
        if world_size > len(stages):
            return balance_stages([1.0] * len(stages), world_size)  # the clear error, before any timing
        return balance_stages(_agreed(measure_stage_times(stages, sample_input), comm), world_size)
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
