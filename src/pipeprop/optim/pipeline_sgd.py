"""SGD with momentum plus the paper's two mitigations, Spike Compensation and Linear Weight Prediction.

Per parameter group (= pipeline stage) with delay ``D = group["delay"]``, gradient ``g`` (coupled L2:
``g = grad + λ w``), momentum ``m`` and learning rate ``η``:

* heavy-ball SGDM:   ``v ← m v + g``,  ``w ← w − η v``   (equals ``torch.optim.SGD`` with dampening 0)
* Nesterov:          ``v ← m v + g``,  ``w ← w − η (g + m v)``
* Spike Compensation (SC, ``spike_compensation=True``):
  ``w ← w − η (a v + b g)`` with ``a = m^D'``, ``b = (1 − m^D')/(1 − m)``, ``D' = sc_delay or D``.
* Linear Weight Prediction (LWP, ``weight_prediction=True``): the forward pass uses
  ``ŵ = w − η T v`` with horizon ``T = lwp_horizon or D`` (mode ``"linear"``), or the momentum-decayed
  extrapolation ``ŵ = w − η m(1−m^T)/(1−m) v`` (mode ``"momentum-decay"``). The prediction uses the state
  at the time of the forward; the backward runs through the live weights.

With ``D = 0`` SC and LWP reduce to plain SGD with momentum (``a = 1, b = 0``; ``ŵ = w``).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from .base import PipelineOptimizer, group_params

__all__ = ["PipelineSGD", "spike_coefficients", "lwp_coefficient"]

LWP_MODES = ("linear", "momentum-decay")


def spike_coefficients(momentum: float, delay: int) -> tuple[float, float]:
    """Spike Compensation coefficients ``(a, b) = (m^D, (1 − m^D)/(1 − m))`` (``b = D`` when ``m = 1``)."""
    if delay < 0:
        raise ValueError(f"delay must be >= 0, got {delay}")
    a = momentum**delay
    b = float(delay) if momentum == 1.0 else (1.0 - a) / (1.0 - momentum)
    return a, b


def lwp_coefficient(momentum: float, horizon: int, mode: str = "linear") -> float:
    """Multiplier ``c`` of ``η v`` in the prediction ``ŵ = w − c η v``."""
    if mode == "linear":
        return float(horizon)
    if mode == "momentum-decay":
        if momentum == 1.0:
            return float(horizon)
        return momentum * (1.0 - momentum**horizon) / (1.0 - momentum)
    raise ValueError(f"unknown LWP mode {mode!r}; choose one of {LWP_MODES}")


class PipelineSGD(PipelineOptimizer):
    """SGD(M) for pipeline stages, with optional Spike Compensation and Linear Weight Prediction.

    Args:
        params: parameters or parameter groups; give each stage its own group with a ``"delay"`` key.
        lr: learning rate ``η``.
        momentum: heavy-ball momentum ``m``.
        weight_decay: L2 coefficient ``λ``; added to the gradient (coupled, as ``torch.optim.SGD``) unless
            ``decoupled_weight_decay`` (then ``w ← w (1 − η λ)`` before the step).
        nesterov: Nesterov momentum (not combinable with SC).
        delay: default stage delay ``D`` for groups without one.
        spike_compensation: apply SC in the update.
        sc_delay: delay used for the SC coefficients (default: the group's delay).
        weight_prediction: predict forward weights with LWP.
        lwp_horizon: prediction horizon ``T`` (default: the group's delay).
        lwp_mode: ``"linear"`` (``T η v``, default) or ``"momentum-decay"``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        nesterov: bool = False,
        decoupled_weight_decay: bool = False,
        delay: int = 0,
        spike_compensation: bool = False,
        sc_delay: Optional[int] = None,
        weight_prediction: bool = False,
        lwp_horizon: Optional[int] = None,
        lwp_mode: str = "linear",
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        if nesterov and spike_compensation:
            raise ValueError("Spike Compensation is defined for heavy-ball momentum; use nesterov=False with SC")
        if lwp_mode not in LWP_MODES:
            raise ValueError(f"unknown lwp_mode {lwp_mode!r}; choose one of {LWP_MODES}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            decoupled_weight_decay=decoupled_weight_decay,
            delay=delay,
            spike_compensation=spike_compensation,
            sc_delay=sc_delay,
            weight_prediction=weight_prediction,
            lwp_horizon=lwp_horizon,
            lwp_mode=lwp_mode,
        )
        super().__init__(params, defaults)

    @property
    def predicts_forward_weights(self) -> bool:  # type: ignore[override]
        return any(g["weight_prediction"] for g in self.param_groups)

    def forward_uses_live_weights(self, group: dict[str, Any]) -> bool:
        return not group["weight_prediction"] or self._lwp_horizon(group) == 0

    def _lwp_horizon(self, group: dict[str, Any]) -> int:
        h = group["lwp_horizon"]
        return self.stage_delay(group) if h is None else int(h)

    def _keeps_velocity(self, group: dict[str, Any]) -> bool:
        return group["momentum"] != 0.0 or group["weight_prediction"]

    @torch.no_grad()
    def forward_weights(self, group: dict[str, Any], out: Optional[list[Tensor]] = None) -> list[Tensor]:
        params = group_params(group)
        if self.forward_uses_live_weights(group):
            return super().forward_weights(group, out)
        coef = lwp_coefficient(group["momentum"], self._lwp_horizon(group), group["lwp_mode"])
        velocities = [self.state[p].get("momentum_buffer") for p in params]
        if out is None:
            out = [torch.empty_like(p) for p in params]
        for o, p, v in zip(out, params, velocities):
            if v is None:
                o.copy_(p)
            else:
                torch.add(p, v, alpha=-group["lr"] * coef, out=o)
        return out

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group_params(group) if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            lr, m, wd = group["lr"], group["momentum"], group["weight_decay"]
            if wd != 0.0 and not group["decoupled_weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=wd)
            if self._keeps_velocity(group):
                bufs = []
                for p, g in zip(params, grads):
                    st = self.state[p]
                    buf = st.get("momentum_buffer")
                    if buf is None:
                        buf = st["momentum_buffer"] = g.detach().clone()
                    else:
                        buf.mul_(m).add_(g)
                    bufs.append(buf)
                if group["nesterov"]:
                    direction = torch._foreach_add(grads, bufs, alpha=m)
                elif group["spike_compensation"] and m != 0.0:
                    d_sc = group["sc_delay"]
                    a, b = spike_coefficients(m, self.stage_delay(group) if d_sc is None else int(d_sc))
                    direction = torch._foreach_mul(bufs, a)
                    if b != 0.0:
                        torch._foreach_add_(direction, grads, alpha=b)
                elif m != 0.0:
                    direction = bufs
                else:
                    direction = grads
            else:
                direction = grads
            if wd != 0.0 and group["decoupled_weight_decay"]:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            torch._foreach_add_(params, direction, alpha=-lr)
        return loss
