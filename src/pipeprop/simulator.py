"""The exact sequential equivalent of a fine-grained asynchronous PB pipeline.

Under the convention of :mod:`pipeprop.schedule`, micro-batch ``n``'s forward at stage ``s`` sees weight
version ``max(0, n - D_s)`` and its backward, at every stage, sees version ``n`` (the live weights).
So one :meth:`PipelineSimulator.step` per micro-batch reproduces the pipeline bit for bit:

1. forward through every stage with that stage's *forward weights* of version ``max(0, n - D_s)``
   (plain weights for PB, predicted weights for LWP), kept in a ring buffer of ``D_s + 1`` versions;
2. backward with the weights saved by that forward replaced by the live weights (``weight_mode="pb"``,
   weight inconsistency as on PB hardware) or kept (``weight_mode="stash"``, PipeDream's weight
   stashing); weight gradients come from the stashed activations;
3. every stage updates (its optimizer group knows its delay), and the forward weights of the new
   version are pushed into the ring buffers.

Every micro-batch's update has been applied when :meth:`step` returns, so a run that ends is drained.
With all delays 0 this is plain SGD.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .optim.base import PipelineOptimizer, group_params
from .weight_swap import rebound_saved_weights, swapped_weights

__all__ = ["PipelineSimulator", "DivergenceError", "WEIGHT_MODES"]

WEIGHT_MODES = ("pb", "stash")

LossFn = Callable[[Any, Any], Tensor]


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int, loss: float, run: Optional[int] = None) -> None:
        self.step, self.loss, self.run = step, loss, run
        where = "" if run is None else f"run {run}: "
        super().__init__(
            f"{where}loss is {loss} at step {step} (micro-batch {step}): training diverged. Lower the learning rate, "
            "use a mitigation (e.g. method='pb+sc+lwp'), or check the inputs for NaN/inf."
        )


class _WeightRing:
    """The forward weights of the last ``delay + 1`` versions of one stage.

    Two storage modes. *Copy*: preallocated slots that the optimizer writes the forward weights into.
    *Reference* (for the live weights of a stage whose forward uses them, when the optimizer can update out of
    place, :attr:`PipelineOptimizer.keep_previous_weights`): a slot holds the live weights of that version,
    which later updates no longer touch, so pushing a version copies nothing; the update writes the new
    weights into the slot that is about to be overwritten (:attr:`PipelineOptimizer.spare_weights`).
    """

    def __init__(self, params: Sequence[Tensor], delay: int, by_reference: bool) -> None:
        self.delay = delay
        self.by_reference = by_reference
        self.slots: list[list[Tensor]] = [
            [] if by_reference else [torch.empty_like(p, memory_format=torch.preserve_format) for p in params]
            for _ in range(delay + 1)
        ]

    def slot(self, version: int) -> list[Tensor]:
        return self.slots[version % (self.delay + 1)]

    def push(self, version: int, optimizer: PipelineOptimizer, group: dict[str, Any]) -> None:
        if self.by_reference:  # a ring of live weights (forward_weights(group) would return the parameters)
            self.slots[version % (self.delay + 1)] = [p.detach() for p in group["params"]]
        else:
            optimizer.forward_weights(group, out=self.slot(version))

    def num_bytes(self, live: Sequence[Tensor]) -> int:
        """Bytes held beyond the live weights."""
        live_ptrs = {p.untyped_storage().data_ptr() for p in live}
        return sum(
            t.numel() * t.element_size()
            for slot in self.slots
            for t in slot
            if t.untyped_storage().data_ptr() not in live_ptrs
        )


def _check_finite(loss: Tensor, step: int) -> None:
    """Raise :class:`DivergenceError` if the loss (a scalar, or one entry per run) is NaN or infinite."""
    if loss.dim() == 0:
        value = float(loss)
        if not math.isfinite(value):
            raise DivergenceError(step, value)
        return
    bad = (~torch.isfinite(loss)).nonzero()
    if bad.numel():
        run = int(bad[0, 0])
        raise DivergenceError(step, float(loss.reshape(-1)[run]), run=run)


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)} ({x.dtype})"
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(_describe(e) for e in x) + ")"
    return type(x).__name__


class PipelineSimulator:
    """Trains pipeline stages with asynchronous PB semantics, one micro-batch per :meth:`step`.

    Args:
        stages: the stages in pipeline order (e.g. a :class:`~pipeprop.partition.Partition`); the output
            of stage ``s`` is the input of stage ``s + 1``.
        optimizer: a :class:`~pipeprop.optim.PipelineOptimizer` whose ``param_groups[s]`` holds exactly the
            parameters of stage ``s`` and its delay ``"delay"``.
        loss_fn: ``loss_fn(output, target) -> scalar tensor``.
        weight_mode: ``"pb"`` (backward through live weights) or ``"stash"`` (weight stashing).
        check_finite: raise :class:`DivergenceError` on a NaN/inf loss.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        optimizer: PipelineOptimizer,
        loss_fn: LossFn,
        *,
        weight_mode: str = "pb",
        check_finite: bool = True,
    ) -> None:
        if weight_mode not in WEIGHT_MODES:
            raise ValueError(f"unknown weight_mode {weight_mode!r}; choose one of {WEIGHT_MODES}")
        if not isinstance(optimizer, PipelineOptimizer):
            raise TypeError("optimizer must be a pipeprop PipelineOptimizer (one parameter group per stage)")
        self.stages = list(stages)
        if len(optimizer.param_groups) != len(self.stages):
            raise ValueError(
                f"optimizer has {len(optimizer.param_groups)} parameter groups but there are {len(self.stages)} "
                "stages; build it with pipeprop.stage_param_groups(stages)"
            )
        for s, (stage, group) in enumerate(zip(self.stages, optimizer.param_groups)):
            if {id(p) for p in stage.parameters()} != {id(p) for p in group["params"]}:
                raise ValueError(f"optimizer parameter group {s} does not hold exactly the parameters of stage {s}")
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.weight_mode = weight_mode
        self.check_finite = check_finite
        self.step_count = 0
        self._overrides_backward = type(optimizer).backward_weights is not PipelineOptimizer.backward_weights
        self._all_params = [p for group in optimizer.param_groups for p in group["params"]]
        self._rings: list[Optional[_WeightRing]] = []
        can_keep = optimizer.supports_keeping_previous_weights
        for group in optimizer.param_groups:
            needs_ring = group_params(group) and (
                optimizer.stage_delay(group) > 0 or not optimizer.forward_uses_live_weights(group)
            )
            # a ring of past live weights holds them by reference; one of predictions is written in place
            by_reference = can_keep and optimizer.forward_uses_live_weights(group)
            ring = _WeightRing(group_params(group), optimizer.stage_delay(group), by_reference) if needs_ring else None
            self._rings.append(ring)
        self._keeps_previous = any(r is not None and r.by_reference for r in self._rings)
        if self._keeps_previous:
            optimizer.keep_previous_weights = True
        self._push_forward_weights(0)

    # ------------------------------------------------------------------ weight versions
    def _push_forward_weights(self, version: int) -> None:
        predicted = []
        for ring, group in zip(self._rings, self.optimizer.param_groups):
            if ring is None:
                continue
            if ring.by_reference:
                ring.push(version, self.optimizer, group)
            else:
                predicted.append((group, ring.slot(version)))
        if predicted:  # all stages' forward weights (e.g. LWP predictions) in one call
            self.optimizer.forward_weights_into(predicted)

    def _spare_weights(self, version: int) -> dict[Tensor, Tensor]:
        """Storage the update to ``version`` may write into: the tensors of the version that leaves a ring of
        past weights when ``version`` is pushed (no longer used), or the live weights where no ring keeps them."""
        spare: dict[Tensor, Tensor] = {}
        for ring, group in zip(self._rings, self.optimizer.param_groups):
            params = group["params"]
            if ring is None or not ring.by_reference:
                spare.update((p, p.data) for p in params)  # nothing keeps the live weights: update in place
            else:
                spare.update(zip(params, ring.slot(version)))  # empty while the ring fills: new tensors
        return spare

    def forward_weights_of(self, stage: int, microbatch: int) -> list[Tensor]:
        """The forward weights stage ``stage`` uses for ``microbatch`` (must be the next or a current one)."""
        group = self.optimizer.param_groups[stage]
        ring = self._rings[stage]
        if ring is None:
            return group_params(group)
        return ring.slot(max(0, microbatch - ring.delay))

    def weight_version_bytes(self) -> int:
        """Memory held for stale/predicted weight versions (excluding the live weights)."""
        return sum(
            r.num_bytes(group_params(g)) for r, g in zip(self._rings, self.optimizer.param_groups) if r is not None
        )

    # ------------------------------------------------------------------ one micro-batch
    def forward(self, x: Any) -> Any:
        out = x
        for s, stage in enumerate(self.stages):
            try:
                out = stage(out)
            except (RuntimeError, TypeError, ValueError) as err:
                names = " > ".join(getattr(stage, "names", [type(stage).__name__]))
                raise type(err)(
                    f"stage {s} ({names}) failed on input {_describe(out)}: {err}. Check that the model's layers "
                    "fit together and that the micro-batch has the shape the model expects."
                ) from err
        return out

    def step(self, x: Any, y: Any, *, sync: bool = True) -> Any:
        """Push micro-batch ``(x, y)`` through the pipeline; returns its loss (from stale forward weights).

        With ``sync=False`` the loss comes back as a detached tensor instead of a ``float``, so the step does
        not wait for the device (unless ``check_finite``, which must read the loss before the update). A loss
        with one entry per run (:func:`pipeprop.train_many`) is summed for the backward pass.
        """
        n = self.step_count
        opt = self.optimizer
        for p in self._all_params:  # opt.zero_grad(set_to_none=True), without its per-call overhead
            p.grad = None
        fwd: dict[tuple[int, int], Tensor] = {}
        swap_params: list[Tensor] = []
        swap_tensors: list[Tensor] = []
        bwd_override: dict[int, list[Tensor]] = {}
        for s, group in enumerate(opt.param_groups):
            override = opt.backward_weights(group) if self._overrides_backward else None
            if override is not None:
                bwd_override[s] = list(override)
            if self._rings[s] is None and override is None:
                continue  # forward and backward both use the live weights: nothing to rebind
            params = group_params(group)
            for i, (p, w) in enumerate(zip(params, self.forward_weights_of(s, n))):
                fwd[(s, i)] = w
                if w is not p:
                    swap_params.append(p)
                    swap_tensors.append(w)

        def resolve(s: int, i: int) -> Tensor:
            if s in bwd_override:
                return bwd_override[s][i]
            if self.weight_mode == "stash":
                return fwd[(s, i)]
            return group_params(opt.param_groups[s])[i]

        with ExitStack() as stack:
            if fwd:
                stack.enter_context(rebound_saved_weights(fwd, resolve))
                stack.enter_context(swapped_weights(swap_params, swap_tensors))
            output = self.forward(x)
            loss = self.loss_fn(output, y)
        loss_value = loss.detach()
        if self.check_finite:
            _check_finite(loss_value, n)
        (loss if loss.dim() == 0 else loss.sum()).backward()
        if self._keeps_previous:
            opt.spare_weights = self._spare_weights(n + 1)
        opt.step()
        opt.spare_weights = None
        self.step_count = n + 1
        self._push_forward_weights(n + 1)
        return float(loss_value) if sync and loss_value.dim() == 0 else loss_value

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Step count and weight-version ring buffers (the model and optimizer are saved separately)."""
        return {
            "step_count": self.step_count,
            "rings": [None if r is None else [[t.clone() for t in slot] for slot in r.slots] for r in self._rings],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rings = state["rings"]
        if len(rings) != len(self._rings):
            raise ValueError("checkpoint was written for a pipeline with a different number of stages")
        for s, (mine, theirs) in enumerate(zip(self._rings, rings)):
            if (mine is None) != (theirs is None) or (mine is not None and len(mine.slots) != len(theirs)):
                raise ValueError(f"checkpoint stage {s} has different delays/method than this pipeline")
            if mine is not None:
                params = group_params(self.optimizer.param_groups[s])
                for k, saved in enumerate(theirs):
                    for p, v in zip(params, saved):
                        if p.shape != v.shape:
                            raise ValueError(f"checkpoint stage {s}: weight shape {tuple(v.shape)} != {tuple(p.shape)}")
                    if mine.by_reference:
                        mine.slots[k] = [v.detach().clone().to(p.device, p.dtype) for v, p in zip(saved, params)]
                    else:
                        for t, v in zip(mine.slots[k], saved):
                            t.copy_(v)
        self.step_count = int(state["step_count"])
