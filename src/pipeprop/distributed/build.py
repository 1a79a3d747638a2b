"""Build this rank's :class:`DistributedPipeline` from a whole model, like :func:`pipeprop.build_simulator`."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..api import stage_param_groups
from ..methods import get_method
from ..partition import Granularity, Partition, partition as make_partition
from .assignment import AssignmentSpec, assign_stages
from .comm import PipelineComm
from .engine import DistributedPipeline

__all__ = ["build_pipeline", "check_method"]


def check_method(method: str, delay_offset: int = 0) -> None:
    """Reject methods the asynchronous engine cannot run (clear message, before any process waits)."""
    spec = get_method(method)
    if not spec.pipelined:
        raise ValueError(
            f"method {spec.name!r} is synchronous (no pipeline delays); the distributed engine runs asynchronous "
            "PB methods: train it with the simulator (pipeprop train --engine simulator) instead"
        )
    if delay_offset:
        raise ValueError(
            "the distributed engine realizes the delays 2(S-1-s) of its schedule; delay_offset must be 0 "
            "(other conventions are simulator-only)"
        )


def build_pipeline(
    model: nn.Module | Partition,
    loss_fn: Callable[[Any, Any], Tensor],
    *,
    comm: PipelineComm,
    method: str = "pb+sc+lwp",
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    partition: Granularity = "layer",
    assignment: AssignmentSpec = "flops",
    sample_input: Any = None,
    device: torch.device | str | None = None,
    queue_capacity: int = 2,
    lr_schedule: Optional[Callable[[int], float]] = None,
    **options: Any,
) -> DistributedPipeline:
    """Partition ``model`` (built identically on every rank), keep this rank's stages and build its engine.

    ``assignment`` maps stages to ranks (see :func:`~pipeprop.distributed.assignment.assign_stages`);
    ``"flops"`` and ``"measured"`` need ``sample_input`` (one micro-batch), as does a model that is not an
    ``nn.Sequential`` of layers (its forward is captured as a graph on it). ``"measured"`` times every stage
    on every rank and balances the ranks' average (collective: all ranks build at the same point).
    ``lr_schedule`` scales each stage's learning rate at its update count
    (:meth:`~pipeprop.optim.PipelineOptimizer.set_lr_schedule`), as in the simulator's runner. Extra ``options`` go to the method's optimizer.
    Only this rank's stages are moved to ``device``.
    """
    spec = get_method(method)
    check_method(method, getattr(model, "delay_offset", 0) if isinstance(model, Partition) else 0)
    part = model if isinstance(model, Partition) else make_partition(model, partition, example_input=sample_input)
    if part.shared_parameters():
        raise ValueError("a parameter is read by several stages (tied weights); the distributed engine does not support that yet: use the simulator")
    ranges = assign_stages(part.stages, comm.world_size, assignment, sample_input, comm=comm)
    mine = ranges[comm.rank]
    stages = [part.stages[s] for s in mine]
    if device is not None:
        for st in stages:
            st.to(device)
    groups = stage_param_groups(stages, [part.stages[s].delay for s in mine])
    if "pipeline_max_delay" not in options:
        # methods that look at the whole pipeline (SpecTrain) must see its largest delay, not this rank's
        for g in groups:
            g["pipeline_max_delay"] = max(part.delays)
    optimizer = spec.build_optimizer(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, **options)
    if lr_schedule is not None:
        optimizer.set_lr_schedule(lr_schedule)
    return DistributedPipeline(
        stages,
        mine.start,
        len(part),
        optimizer,
        loss_fn,
        comm=comm,
        weight_mode=spec.weight_mode,
        device=device,
        queue_capacity=queue_capacity,
    )
