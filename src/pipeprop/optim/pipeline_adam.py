"""Adam, AdamW and NAdam for pipeline stages, with Spike Compensation and Linear Weight Prediction.

Per parameter group (= pipeline stage) with delay ``D = group["delay"]``, step count ``t`` of the stage
(1 at its first update), gradient ``g``, learning rate ``η`` and weight decay ``λ``:

* decay: ``w ← w (1 − η λ)`` first (``decoupled_weight_decay=True``, AdamW), or ``g ← g + λ w`` (Adam);
* moments: ``m ← β1 m + (1 − β1) g``,  ``v ← β2 v + (1 − β2) g²``;
* Adam(W):  ``w ← w − η · m̃/(1 − β1^t) / (√(v/(1 − β2^t)) + ε)``  with ``m̃ = m``
  (exactly ``torch.optim.Adam``/``AdamW``);
* NAdam:    ``w ← w − η · [(1 − μ_t)/(1 − Π_t) g + μ_{t+1}/(1 − Π_{t+1}) m̃] / (√(v/(1 − β2^t)) + ε)``,
  ``μ_t = β1 (1 − ½·0.96^(t ψ))``, ``Π_t = μ_1⋯μ_t`` (exactly ``torch.optim.NAdam``, ``ψ = momentum_decay``);
* Spike Compensation (``spike_compensation=True``) replaces the first moment in the update by
  ``m̃ = β1^D' m + (1 − β1^D') g`` (``D' = sc_delay or D``): the first moment is a momentum whose input is
  ``(1 − β1) g``, so the ``D'`` contributions the late gradient missed, ``Σ_{j<D'} (1 − β1) β1^j g =
  (1 − β1^D') g``, are applied at once and the rest of the moment is scaled by ``β1^D'``. ``D = 0`` is Adam.
* Linear Weight Prediction (``weight_prediction=True``): the forward pass uses
  ``ŵ = w − η T (m̂/(√v̂ + ε) [+ λ w])`` with ``m̂ = m/(1 − β1^t)``, ``v̂ = v/(1 − β2^t)`` from the state at
  the time of that forward, ``T = lwp_horizon or D``; the decay term only with ``lwp_weight_decay=True``
  (and decoupled decay); ``ŵ = w`` while the state is empty.

All update math lives in the functions :func:`adam_update_directions` (multi-tensor) and
:func:`adam_update_directions_single` (one tensor at a time), which return the ``u`` of ``w ← w(1 − ηλ) − η u``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor

from .base import PipelineOptimizer, group_params

__all__ = [
    "PipelineAdam",
    "ADAM_VARIANTS",
    "adam_sc_coefficient",
    "adam_update_directions",
    "adam_update_directions_single",
    "nadam_mu",
]

ADAM_VARIANTS = ("adam", "nadam")


def adam_sc_coefficient(beta1: float, delay: int) -> float:
    """SC weight ``a = β1^D`` of the first moment (the gradient gets ``1 − a``)."""
    if delay < 0:
        raise ValueError(f"delay must be >= 0, got {delay}")
    return float(beta1) ** delay


def nadam_mu(beta1: float, step: int, momentum_decay: float) -> float:
    """NAdam's momentum schedule ``μ_t = β1 (1 − ½ · 0.96^(t ψ))``."""
    return beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))


def _first_moment_for_update(exp_avgs: list[Tensor], grads: list[Tensor], sc_a: Optional[float]) -> list[Tensor]:
    """``m`` itself, or under SC ``a m + (1 − a) g`` (new tensors)."""
    if sc_a is None or sc_a == 1.0:
        return exp_avgs
    out = torch._foreach_mul(exp_avgs, sc_a)
    torch._foreach_add_(out, grads, alpha=1.0 - sc_a)
    return list(out)


def adam_update_directions(
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    step: int,
    beta1: float,
    beta2: float,
    eps: float,
    variant: str = "adam",
    sc_a: Optional[float] = None,
    mu: float = 0.0,
    mu_next: float = 0.0,
    mu_product: float = 1.0,
) -> list[Tensor]:
    """Update the moments in place and return the directions ``u`` (multi-tensor path).

    ``step`` is the step count after this update (``t ≥ 1``); ``grads`` already include a coupled L2 term.
    For NAdam pass ``mu`` (μ_t), ``mu_next`` (μ_{t+1}) and ``mu_product`` (Π_t, including μ_t).
    """
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    bias_correction2 = 1.0 - beta2**step
    first = _first_moment_for_update(exp_avgs, grads, sc_a)
    if variant == "adam":
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, math.sqrt(bias_correction2))
        torch._foreach_add_(denom, eps)
        out = torch._foreach_div(first, denom)
        torch._foreach_div_(out, 1.0 - beta1**step)
        return list(out)
    if variant == "nadam":
        denom = torch._foreach_div(exp_avg_sqs, bias_correction2)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        out = torch._foreach_mul(grads, (1.0 - mu) / (1.0 - mu_product))
        torch._foreach_add_(out, first, alpha=mu_next / (1.0 - mu_product * mu_next))
        torch._foreach_div_(out, denom)
        return list(out)
    raise ValueError(f"unknown variant {variant!r}; choose one of {ADAM_VARIANTS}")


def adam_update_directions_single(
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    step: int,
    beta1: float,
    beta2: float,
    eps: float,
    variant: str = "adam",
    sc_a: Optional[float] = None,
    mu: float = 0.0,
    mu_next: float = 0.0,
    mu_product: float = 1.0,
) -> list[Tensor]:
    """The same as :func:`adam_update_directions`, one tensor at a time."""
    if variant not in ADAM_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {ADAM_VARIANTS}")
    bias_correction2 = 1.0 - beta2**step
    out = []
    for g, m, v in zip(grads, exp_avgs, exp_avg_sqs):
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        first = m if sc_a is None or sc_a == 1.0 else m * sc_a + g * (1.0 - sc_a)
        if variant == "adam":
            denom = (v.sqrt() / math.sqrt(bias_correction2)).add_(eps)
            out.append(first.div(denom).div_(1.0 - beta1**step))
        else:
            denom = v.div(bias_correction2).sqrt_().add_(eps)
            u = g * ((1.0 - mu) / (1.0 - mu_product)) + first * (mu_next / (1.0 - mu_product * mu_next))
            out.append(u.div_(denom))
    return out


class PipelineAdam(PipelineOptimizer):
    """Adam / AdamW / NAdam for pipeline stages, with optional SC and LWP (see the module docstring).

    Args:
        params: parameters or parameter groups; give each stage its own group with a ``"delay"`` key.
        lr: learning rate ``η``.
        betas: ``(β1, β2)``.
        eps: ``ε``, added outside the square root.
        weight_decay: ``λ``.
        decoupled_weight_decay: ``w ← w(1 − ηλ)`` before the step (AdamW) instead of ``g + λw`` (Adam).
        variant: ``"adam"`` or ``"nadam"``.
        momentum_decay: NAdam's ``ψ`` (as ``torch.optim.NAdam``).
        delay: default stage delay ``D`` for groups without one.
        spike_compensation: apply SC to the first moment in the update.
        sc_delay: delay used for the SC coefficient (default: the group's delay).
        weight_prediction: predict forward weights with LWP.
        lwp_horizon: prediction horizon ``T`` (default: the group's delay).
        lwp_weight_decay: include the decoupled decay ``λ w`` in the predicted step.
        beta1_target: delay-dependent first-moment decay (AsyncPP's "adaptive momentum"): stage β1 =
            ``β1 + D/(D_max + 2) · (beta1_target − β1)``; ``None`` keeps β1 for every stage.
        pipeline_max_delay: ``D_max`` for ``beta1_target`` (default: the largest delay among the groups).
        foreach: multi-tensor path (default True); ``False`` updates one tensor at a time.
    """

    supports_keeping_previous_weights = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        decoupled_weight_decay: bool = False,
        variant: str = "adam",
        momentum_decay: float = 4e-3,
        delay: int = 0,
        spike_compensation: bool = False,
        sc_delay: Optional[int] = None,
        weight_prediction: bool = False,
        lwp_horizon: Optional[int] = None,
        lwp_weight_decay: bool = False,
        beta1_target: Optional[float] = None,
        pipeline_max_delay: Optional[int] = None,
        foreach: Optional[bool] = None,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        try:
            beta1, beta2 = (float(b) for b in betas)
        except (TypeError, ValueError):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
        if not 0.0 <= beta1 < 1.0 or not 0.0 <= beta2 < 1.0:
            raise ValueError(f"betas must lie in [0, 1), got {(beta1, beta2)}")
        if eps < 0.0:
            raise ValueError(f"invalid eps {eps}")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        if variant not in ADAM_VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {ADAM_VARIANTS}")
        if momentum_decay < 0.0:
            raise ValueError(f"invalid momentum_decay {momentum_decay}")
        for name, value in (("delay", delay), ("sc_delay", sc_delay), ("lwp_horizon", lwp_horizon)):
            if value is not None and int(value) < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if beta1_target is not None and not 0.0 <= beta1_target < 1.0:
            raise ValueError(f"beta1_target must lie in [0, 1), got {beta1_target}")
        if lwp_weight_decay and not decoupled_weight_decay:
            raise ValueError("lwp_weight_decay predicts the decoupled decay; use it with decoupled_weight_decay=True (AdamW)")
        defaults = dict(
            lr=lr,
            betas=(beta1, beta2),
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            variant=variant,
            momentum_decay=momentum_decay,
            delay=delay,
            spike_compensation=spike_compensation,
            sc_delay=sc_delay,
            weight_prediction=weight_prediction,
            lwp_horizon=lwp_horizon,
            lwp_weight_decay=lwp_weight_decay,
            beta1_target=beta1_target,
            pipeline_max_delay=pipeline_max_delay,
            foreach=True if foreach is None else bool(foreach),
        )
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ per-stage quantities
    def _group_lr(self, group: dict[str, Any]) -> float:
        """The stage's effective learning rate now: the base class's hook (schedules) where it has one."""
        base = getattr(super(), "_group_lr", None)
        return base(group) if base is not None else group["lr"]

    def stage_betas(self, group: dict[str, Any]) -> tuple[float, float]:
        """``(β1, β2)`` of this stage (β1 moved towards ``beta1_target`` in proportion to the delay)."""
        beta1, beta2 = group["betas"]
        target = group.get("beta1_target")
        if target is None:
            return beta1, beta2
        d_max = group.get("pipeline_max_delay")
        if d_max is None:
            d_max = max(self.stage_delay(g) for g in self.param_groups)
        return beta1 + self.stage_delay(group) / (int(d_max) + 2) * (target - beta1), beta2

    def _sc_delay(self, group: dict[str, Any]) -> int:
        d = group["sc_delay"]
        return self.stage_delay(group) if d is None else int(d)

    def _lwp_horizon(self, group: dict[str, Any]) -> int:
        h = group["lwp_horizon"]
        return self.stage_delay(group) if h is None else int(h)

    @staticmethod
    def _step_count(group: dict[str, Any], state: Any) -> int:
        for p in group_params(group):
            st = state.get(p)
            if st and "step" in st:
                return int(st["step"])
        return 0

    # ------------------------------------------------------------------ forward weights (LWP)
    @property
    def predicts_forward_weights(self) -> bool:  # type: ignore[override]
        return any(g["weight_prediction"] for g in self.param_groups)

    def forward_uses_live_weights(self, group: dict[str, Any]) -> bool:
        return not group["weight_prediction"] or self._lwp_horizon(group) == 0

    @torch.no_grad()
    def forward_weights(self, group: dict[str, Any], out: Optional[list[Tensor]] = None) -> list[Tensor]:
        params = group_params(group)
        if self.forward_uses_live_weights(group):
            return super().forward_weights(group, out)
        moving = [p for p in params if "exp_avg" in self.state.get(p, {})]
        if out is None:
            out = [p if "exp_avg" not in self.state.get(p, {}) else None for p in params]  # type: ignore[misc]
            if moving:
                preds = iter(self._predicted(group, moving))
                out = [next(preds) if o is None else o for o in out]
            return out
        torch._foreach_copy_(out, params)
        if moving:
            index = {id(p): i for i, p in enumerate(params)}
            for p, w in zip(moving, self._predicted(group, moving)):
                out[index[id(p)]].copy_(w)
        return out

    def _predicted(self, group: dict[str, Any], params: list[Tensor]) -> list[Tensor]:
        """``w − η T (m̂/(√v̂ + ε) [+ λ w])`` for params that have a state (new tensors)."""
        beta1, beta2 = self.stage_betas(group)
        t = int(self.state[params[0]]["step"])
        lr, horizon, eps = self._group_lr(group), self._lwp_horizon(group), group["eps"]
        m = [self.state[p]["exp_avg"] for p in params]
        v = [self.state[p]["exp_avg_sq"] for p in params]
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, math.sqrt(1.0 - beta2**t))
        torch._foreach_add_(denom, eps)
        direction = torch._foreach_div(m, denom)
        torch._foreach_div_(direction, 1.0 - beta1**t)
        if group["lwp_weight_decay"] and group["weight_decay"] != 0.0:
            torch._foreach_add_(direction, params, alpha=group["weight_decay"])
        return list(torch._foreach_add(params, direction, alpha=-lr * horizon))

    # ------------------------------------------------------------------ the update
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
            self._step_group(group, params)
        return loss

    def _step_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        beta1, beta2 = self.stage_betas(group)
        lr, wd, eps = self._group_lr(group), group["weight_decay"], group["eps"]
        decoupled = group["decoupled_weight_decay"]
        exp_avgs, exp_avg_sqs = [], []
        for p in params:
            st = self.state[p]
            if "exp_avg" not in st:
                st["step"] = 0
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["variant"] == "nadam":
                    st["mu_product"] = 1.0
            st["step"] += 1
            exp_avgs.append(st["exp_avg"])
            exp_avg_sqs.append(st["exp_avg_sq"])
        first = self.state[params[0]]
        t = int(first["step"])
        grads = [p.grad for p in params]
        if wd != 0.0 and not decoupled:
            grads = list(torch._foreach_add(grads, params, alpha=wd))
        nadam: dict[str, float] = {}
        if group["variant"] == "nadam":
            mu = nadam_mu(beta1, t, group["momentum_decay"])
            for p in params:
                self.state[p]["mu_product"] *= mu
            nadam = dict(mu=mu, mu_next=nadam_mu(beta1, t + 1, group["momentum_decay"]),
                         mu_product=float(first["mu_product"]))
        sc_a = adam_sc_coefficient(beta1, self._sc_delay(group)) if group["spike_compensation"] else None
        update = adam_update_directions if group["foreach"] else adam_update_directions_single
        directions = update(grads, exp_avgs, exp_avg_sqs, step=t, beta1=beta1, beta2=beta2, eps=eps,
                            variant=group["variant"], sc_a=sc_a, **nadam)
        self._apply_update(params, [(directions, 1.0)], lr, wd if decoupled else 0.0)
