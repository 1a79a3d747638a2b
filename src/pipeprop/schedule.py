"""The step arithmetic of fine-grained Pipelined Backpropagation (the one place that fixes the convention).

Stages are numbered ``0..S-1`` from the input. Micro-batches are numbered ``n = 0, 1, 2, ...`` and one
enters stage 0 per pipeline step. **Convention:** in every step each stage first runs the forward of the
micro-batch entering it, then the backward of the micro-batch whose error arrives, then updates its
weights with that backward's gradient. Hence

* the forward of micro-batch ``n`` at stage ``s`` runs in step ``n + s``;
* the loss of ``n`` is computed by the last stage in step ``n + S - 1`` (right after its forward);
* the backward of ``n`` at stage ``s`` runs in step ``n + 2(S-1) - s``.

At its forward, stage ``s`` has applied the updates of micro-batches ``0..n-D_s-1``, where

    D_s = 2 (S - 1 - s)  (+ a configurable ``offset``),

so the forward of ``n`` uses weight version ``max(0, n - D_s)`` while its backward (at every stage) uses
version ``n``: the live weights after the updates of ``0..n-1``. This is why the whole asynchronous
pipeline equals a sequential process (see :mod:`pipeprop.simulator`). The ``offset`` models other
conventions, e.g. ``offset=1`` for PipeMare's ``2(S-s)+1`` (1-indexed) where the loss takes its own step.
"""

from __future__ import annotations

__all__ = [
    "stage_delay",
    "stage_delays",
    "forward_step",
    "backward_step",
    "forward_version",
    "forward_microbatch",
    "backward_microbatch",
    "num_steps",
    "fill_bubble_fraction",
]


def _check_stage(stage: int, num_stages: int) -> None:
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage index {stage} outside 0..{num_stages - 1}")


def stage_delay(stage: int, num_stages: int, offset: int = 0) -> int:
    """Weight updates that stage ``stage`` applies between the forward and backward of one micro-batch."""
    _check_stage(stage, num_stages)
    if offset < 0:
        raise ValueError(f"delay offset must be >= 0, got {offset}")
    return 2 * (num_stages - 1 - stage) + offset


def stage_delays(num_stages: int, offset: int = 0) -> list[int]:
    """Delays ``[D_0, ..., D_{S-1}]`` of an ``S``-stage pipeline (input stage first)."""
    return [stage_delay(s, num_stages, offset) for s in range(num_stages)]


def forward_step(microbatch: int, stage: int, num_stages: int) -> int:
    """Pipeline step in which ``stage`` runs the forward of ``microbatch``."""
    _check_stage(stage, num_stages)
    return microbatch + stage


def backward_step(microbatch: int, stage: int, num_stages: int) -> int:
    """Pipeline step in which ``stage`` runs the backward (and update) of ``microbatch``."""
    _check_stage(stage, num_stages)
    return microbatch + 2 * (num_stages - 1) - stage


def forward_microbatch(step: int, stage: int, num_stages: int) -> int:
    """Micro-batch whose forward ``stage`` runs in pipeline step ``step`` (inverse of :func:`forward_step`;
    outside ``0..M-1`` during fill and drain)."""
    _check_stage(stage, num_stages)
    return step - stage


def backward_microbatch(step: int, stage: int, num_stages: int) -> int:
    """Micro-batch whose backward ``stage`` runs in pipeline step ``step`` (inverse of :func:`backward_step`)."""
    _check_stage(stage, num_stages)
    return step - 2 * (num_stages - 1) + stage


def forward_version(microbatch: int, delay: int) -> int:
    """Weight version (number of applied updates) that the forward of ``microbatch`` sees at a stage."""
    return max(0, microbatch - delay)


def num_steps(num_microbatches: int, num_stages: int) -> int:
    """Pipeline steps needed to push ``num_microbatches`` through fill, steady state and the final drain."""
    if num_microbatches <= 0:
        return 0
    return num_microbatches + 2 * (num_stages - 1)


def fill_bubble_fraction(num_microbatches: int, num_stages: int) -> float:
    """Idle fraction of a fill-and-drain (GPipe) schedule: ``(S-1)/(M+S-1)``; PB tends to 0 in steady state."""
    return (num_stages - 1) / (num_microbatches + num_stages - 1)
