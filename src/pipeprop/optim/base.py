"""The interface between a pipeline engine and a per-stage optimizer.

A :class:`PipelineOptimizer` is an ordinary ``torch.optim.Optimizer`` whose parameter groups are
pipeline stages: group ``i`` holds stage ``i``'s parameters and its delay ``group["delay"]``. Besides
``step()`` it tells the engine which weights a stage uses in its forward and backward passes:

* :meth:`forward_weights` — the tensors the forward pass starting *now* should use (the live weights,
  or e.g. weights predicted ``D`` steps ahead for Linear Weight Prediction);
* :meth:`backward_weights` — the tensors the backward pass running *now* should use in place of the
  weights saved by its forward (``None``: the live weights, as on real PB hardware).

A learning-rate schedule lives inside the optimizer: :meth:`PipelineOptimizer.set_lr_schedule` makes every
stage use ``group["lr"] * schedule(k)``, with ``k`` the updates *that stage* has applied (kept in the group,
so in the optimizer's ``state_dict``); both engines use it. Schedulers from ``torch.optim.lr_scheduler``
also work (they edit ``group["lr"]``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["PipelineOptimizer", "group_params"]


def group_params(group: dict[str, Any]) -> list[Tensor]:
    return list(group["params"])


class PipelineOptimizer(torch.optim.Optimizer):
    """Base class: a ``torch.optim.Optimizer`` with one parameter group per pipeline stage."""

    #: whether :meth:`forward_weights` can differ from the live weights (e.g. weight prediction)
    predicts_forward_weights: bool = False

    #: whether :meth:`step` honours :attr:`keep_previous_weights`
    supports_keeping_previous_weights: bool = False

    #: set by an engine that keeps references to past weights (the simulator's weight-version ring):
    #: ``step()`` must then leave the tensors holding the previous weights untouched and rebind each
    #: parameter's ``.data`` to a new tensor (an out-of-place update), so no copy of the weights is needed
    keep_previous_weights: bool = False

    #: learning-rate factor of a stage's update number ``k = 0, 1, ...`` (see :meth:`set_lr_schedule`)
    lr_schedule: Optional[Callable[[int], float]] = None

    def set_lr_schedule(self, schedule: Optional[Callable[[int], float]]) -> None:
        """Scale each stage's learning rate by ``schedule(k)``, ``k`` = the updates that stage has applied.

        The count is the group's ``"updates"`` entry (saved and restored with the optimizer's
        ``state_dict``); a stage counts an update when one of its parameters had a gradient at ``step()``.
        """
        self.lr_schedule = schedule
        for group in self.param_groups:
            group.setdefault("updates", 0)
        if schedule is not None and getattr(self, "_update_counter", None) is None:
            self._update_counter = self.register_step_post_hook(_count_updates)

    def stage_updates(self, group: dict[str, Any]) -> int:
        """Updates this stage has applied since :meth:`set_lr_schedule`."""
        return int(group.get("updates", 0))

    def _group_lr(self, group: dict[str, Any]) -> float:
        """The stage's effective learning rate now: ``lr`` times the schedule at its update count (hook for
        subclasses, e.g. PipeMare's per-stage warm-up factor)."""
        if self.lr_schedule is None:
            return group["lr"]
        return group["lr"] * self.lr_schedule(self.stage_updates(group))

    #: set by such an engine before each :meth:`step`: tensors it no longer needs, keyed by parameter, that the
    #: out-of-place update writes the new weights into instead of allocating new ones (``step()`` empties it)
    spare_weights: Optional[dict[Tensor, Tensor]] = None

    def engine_step(self) -> None:
        """:meth:`step` as an engine calls it, once per micro-batch.

        The same update and the same step hooks, without ``torch.optim``'s ``record_function`` profiler scope
        when no profiler runs (a fixed cost of tens of microseconds per call, sizeable at batch size one).
        Falls back to ``step()`` under the profiler, with pre-step hooks, global hooks, or a wrapped instance
        ``step`` (e.g. by a ``torch.optim.lr_scheduler``).
        """
        step = type(self).step
        inner = getattr(step, "__wrapped__", None) if getattr(step, "hooked", False) else None
        if (
            inner is None
            or "step" in self.__dict__
            or self._optimizer_step_pre_hooks
            or _global_step_hooks()
            or torch.autograd._profiler_enabled()
        ):
            self.step()
            return
        inner(self)
        for hook in list(self._optimizer_step_post_hooks.values()):
            hook(self, (self,), {})

    def forward_uses_live_weights(self, group: dict[str, Any]) -> bool:
        """True when :meth:`forward_weights` would return the live weights unchanged."""
        return not self.predicts_forward_weights

    @torch.no_grad()
    def forward_weights(self, group: dict[str, Any], out: Optional[list[Tensor]] = None) -> list[Tensor]:
        """Weights for a forward pass of this stage starting now; written into ``out`` when given.

        Without ``out`` the result may alias the live parameters; callers that keep it must copy.
        """
        params = group_params(group)
        if out is None:
            return params
        torch._foreach_copy_(out, params)
        return out

    def forward_weights_into(self, stages: list[tuple[dict[str, Any], list[Tensor]]]) -> None:
        """``forward_weights(group, out=out)`` for every ``(group, out)`` of ``stages``: an engine's one call per
        step for all its stages (subclasses may do it in one pass)."""
        for group, out in stages:
            self.forward_weights(group, out=out)

    @torch.no_grad()
    def backward_weights(self, group: dict[str, Any]) -> Optional[list[Tensor]]:
        """Weights the backward pass running now uses in place of the saved forward weights (None: live)."""
        return None

    def stage_delay(self, group: dict[str, Any]) -> int:
        return int(group.get("delay", 0))

    def _apply_update(
        self, params: list[Tensor], terms: list[tuple[list[Tensor], float]], lr: Any, decoupled_wd: float
    ) -> None:
        """``w ← w (1 − η λ) − η Σ c_j t_j``, in place or, under :attr:`keep_previous_weights`, into new tensors
        (or the engine's :attr:`spare_weights`)."""
        (first, c0), *rest = terms
        if not self.keep_previous_weights:
            if decoupled_wd != 0.0:
                mul_scaled(params, 1.0 - lr * decoupled_wd, inplace=True)
            new = add_scaled(params, first, -lr * c0, inplace=True)
        else:
            base = mul_scaled(params, 1.0 - lr * decoupled_wd) if decoupled_wd != 0.0 else params
            spare = self.spare_weights
            out = [spare.pop(p, None) for p in params] if spare else None
            new = add_scaled(base, first, -lr * c0, out=out)
        for t, c in rest:
            add_scaled(new, t, -lr * c, inplace=True)
        if self.keep_previous_weights:
            for p, w in zip(params, new):
                p.data = w


Scale = Union[float, Tensor]


def _run_views(scale: Tensor, tensors: list[Tensor]) -> list[Tensor]:
    """``scale`` (one entry per run) shaped to broadcast over each ``[K, ...]`` tensor."""
    return [scale.view(-1, *([1] * (t.dim() - 1))) for t in tensors]


def add_scaled(
    base: list[Tensor], tensors: list[Tensor], scale: Scale, *, inplace: bool = False,
    out: Optional[Sequence[Optional[Tensor]]] = None,
) -> list[Tensor]:
    """``base + scale * tensors``; ``scale`` is a number or a vector with one entry per run (dimension 0).

    The result goes into new tensors, into ``base`` (``inplace``) or into ``out`` (entries ``None``: new).
    """
    if isinstance(scale, Tensor):  # base + tensors * scale[k] for run k, in one pass
        views = _run_views(scale, tensors)
        if inplace:
            torch._foreach_addcmul_(base, tensors, views)
            return base
        if out is not None:
            return [torch.addcmul(b, t, v) if o is None else torch.addcmul(b, t, v, out=o)
                    for o, b, t, v in zip(out, base, tensors, views)]
        return list(torch._foreach_addcmul(base, tensors, views))
    if inplace:
        torch._foreach_add_(base, tensors, alpha=scale)
        return base
    if out is not None:
        return [
            torch.add(b, t, alpha=scale) if o is None else torch.add(b, t, alpha=scale, out=o)
            for o, b, t in zip(out, base, tensors)
        ]
    return list(torch._foreach_add(base, tensors, alpha=scale))


def mul_scaled(tensors: list[Tensor], scale: Scale, *, inplace: bool = False) -> list[Tensor]:
    """``scale * tensors``; ``scale`` is a number or a vector with one entry per run (dimension 0)."""
    factor: Any = _run_views(scale, tensors) if isinstance(scale, Tensor) else scale
    if inplace:
        torch._foreach_mul_(tensors, factor)
        return tensors
    return list(torch._foreach_mul(tensors, factor))


def _global_step_hooks() -> bool:
    """Whether any global optimizer step hook is registered (``torch.optim.optimizer.register_optimizer_step_*``)."""
    from torch.optim import optimizer as _opt

    return bool(getattr(_opt, "_global_optimizer_pre_hooks", None) or getattr(_opt, "_global_optimizer_post_hooks", None))


def _count_updates(optimizer: PipelineOptimizer, args: Any, kwargs: Any) -> None:
    for group in optimizer.param_groups:
        if any(p.grad is not None for p in group["params"]):
            group["updates"] = int(group.get("updates", 0)) + 1
