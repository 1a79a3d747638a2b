"""Numerical precision of a pipeline run (Lightning's names).

* ``"32"`` — float32 everywhere (the default; the model's own dtype is kept).
* ``"64"`` — float64 weights and inputs (exactness checks).
* ``"bf16-mixed"`` / ``"16-mixed"`` — float32 *master* weights and optimizer state, forward and backward
  compute in bfloat16 / float16 under ``torch.autocast``. Under PB the backward sees the cast of the *live*
  weights (the casts are recomputed at backward time by :class:`pipeprop.weight_swap.DerivedWeightTracker`).
  ``"16-mixed"`` scales the loss (dynamic loss scaling, as ``torch.amp.GradScaler``): a micro-batch whose
  scaled gradients overflow is skipped (no update) and the scale halves; the scale doubles after
  ``growth_interval`` finite steps.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Sequence

import torch
from torch import Tensor, nn

__all__ = ["PRECISIONS", "check_precision", "prepare_model", "autocast", "cast_input", "LossScaler"]

PRECISIONS = ("32", "64", "bf16-mixed", "16-mixed")
_AUTOCAST_DTYPE = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def check_precision(precision: Any) -> str:
    p = str(precision)
    aliases = {"32-true": "32", "64-true": "64", "fp32": "32", "fp64": "64", "bf16": "bf16-mixed", "16": "16-mixed"}
    p = aliases.get(p, p)
    if p not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    return p


def prepare_model(model: Any, precision: str) -> None:
    """Convert the model's weights for ``precision`` in place (float64 for "64"; mixed needs float32 masters)."""
    precision = check_precision(precision)
    if not isinstance(model, nn.Module):
        return
    if precision == "64":
        model.to(torch.float64)
    elif precision in _AUTOCAST_DTYPE:
        low = [n for n, p in model.named_parameters() if p.is_floating_point() and p.dtype != torch.float32]
        if low:
            raise ValueError(
                f"precision={precision!r} keeps float32 master weights, but {low[0]} is {dict(model.named_parameters())[low[0]].dtype}; "
                "call model.float() first (autocast does the low-precision compute)"
            )


def autocast(precision: str, params: Sequence[Tensor]) -> ContextManager[Any]:
    """The autocast region of a forward (weight-cast cache off: a shared weight has a version per stage)."""
    dtype = _AUTOCAST_DTYPE.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    device = params[0].device.type if params else "cpu"
    return torch.autocast(device, dtype=dtype, cache_enabled=False)


def cast_input(x: Any, dtype: torch.dtype) -> Any:
    """Floating tensors in ``x`` (tensors, tuples, lists, dicts) cast to ``dtype``."""
    if isinstance(x, Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(cast_input(e, dtype) for e in x)
    if isinstance(x, dict):
        return {k: cast_input(v, dtype) for k, v in x.items()}
    if hasattr(x, "args") and hasattr(x, "kwargs"):
        return type(x)(cast_input(x.args, dtype), cast_input(x.kwargs, dtype))
    return x


class LossScaler:
    """Dynamic loss scaling for float16 (the rule of ``torch.amp.GradScaler``)."""

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000) -> None:
        self.scale, self.growth_factor, self.backoff_factor = float(init_scale), growth_factor, backoff_factor
        self.growth_interval = growth_interval
        self._good_steps = 0
        self.skipped = 0

    def unscale(self, params: Sequence[Tensor]) -> bool:
        """Divide the gradients by the scale; returns False (and backs off) when one is not finite."""
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)
            finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        else:
            finite = True
        if not finite:
            self.scale *= self.backoff_factor
            self._good_steps = 0
            self.skipped += 1
            for p in params:
                p.grad = None
            return False
        self._good_steps += 1
        if self._good_steps % self.growth_interval == 0:
            self.scale *= self.growth_factor
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "good_steps": self._good_steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale, self._good_steps, self.skipped = float(state["scale"]), int(state["good_steps"]), int(state["skipped"])
