"""The one-call API: build a PB pipeline for a model and train it."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

from torch import Tensor, nn

from .methods import get_method
from .partition import Granularity, Partition, partition as make_partition
from .regime_warnings import warn_if_lwp_overshoots
from .simulator import PipelineSimulator

__all__ = ["stage_param_groups", "build_simulator", "train"]


def stage_param_groups(stages: Sequence[nn.Module], delays: Optional[Sequence[int]] = None) -> list[dict[str, Any]]:
    """One optimizer parameter group per stage, with its ``"delay"`` (default: each stage's ``.delay``)."""
    if delays is None:
        delays = [int(getattr(st, "delay", 0)) for st in stages]
    if len(delays) != len(stages):
        raise ValueError(f"{len(delays)} delays given for {len(stages)} stages")
    return [{"params": list(st.parameters()), "delay": int(d)} for st, d in zip(stages, delays)]


def build_simulator(
    model: nn.Module | Partition,
    loss_fn: Callable[[Any, Any], Tensor],
    *,
    method: str = "pb+sc+lwp",
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    partition: Granularity = "layer",
    delay_offset: int = 0,
    **options: Any,
) -> PipelineSimulator:
    """Partition ``model`` (unless it already is a :class:`Partition`) and build its simulator for ``method``.

    Extra ``options`` go to the method's optimizer (e.g. ``lwp_horizon=4``, ``nesterov=True``).
    """
    spec = get_method(method)
    part = model if isinstance(model, Partition) else make_partition(model, partition, delay_offset=delay_offset)
    delays = part.delays if spec.pipelined else [0] * len(part)
    kwargs = {**spec.options, **options}
    optimizer = spec.optimizer(stage_param_groups(part.stages, delays), lr=lr, momentum=momentum, weight_decay=weight_decay, **kwargs)
    warn_if_lwp_overshoots(optimizer.param_groups)
    return PipelineSimulator(part.stages, optimizer, loss_fn, weight_mode=spec.weight_mode)


def train(
    model: nn.Module,
    batches: Iterable[tuple[Any, Any]],
    loss_fn: Callable[[Any, Any], Tensor],
    *,
    method: str = "pb+sc+lwp",
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    partition: Granularity = "layer",
    delay_offset: int = 0,
    **options: Any,
) -> list[float]:
    """Train ``model`` in place with Pipelined Backpropagation; returns the loss of every step.

    One ``(x, y)`` micro-batch from ``batches`` enters the pipeline per step (its size is the micro-batch
    size, 1 for the paper's setting). ``method`` is one of :func:`pipeprop.available_methods`, e.g.
    ``"sgd"``, ``"pb"``, ``"pb+sc"``, ``"pb+lwp"``, ``"pb+sc+lwp"``, ``"pb+stash"``. When it returns, every
    micro-batch's update has been applied.
    """
    sim = build_simulator(
        model, loss_fn, method=method, lr=lr, momentum=momentum, weight_decay=weight_decay,
        partition=partition, delay_offset=delay_offset, **options,
    )
    return [sim.step(x, y) for x, y in batches]
