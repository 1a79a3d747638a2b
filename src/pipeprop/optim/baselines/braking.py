"""Adaptive Braking (Venigalla, Kosson, Chiley & Köster, "Adaptive Braking for Mitigating Gradient Delay",
arXiv 2007.01397, 2020): scale the gradient by its alignment with the velocity, then apply momentum.

``c = <g, v> / (‖g‖ ‖v‖ + ε)``,  ``g̃ = (1 − ρ c) g``,  ``v ← m v + g̃``,  ``w ← w − η v``,

with ``g`` the loss gradient plus coupled L2 and ``v`` the velocity before this step (no braking on the
first step, when there is no velocity yet). A gradient that opposes the velocity (``c < 0``, overshoot
along a high-curvature direction) is amplified to brake; one aligned with it is damped.

Options (all UNCONFIRMED as to the AB paper's exact choice): ``ab_scope="tensor"`` (default: one cosine
per parameter tensor) or ``"stage"`` (one cosine over all tensors of the stage); ``ab_rho`` (default 1.0,
from PAPER.md §11 "ρ ≈ 1–2"; with ρ = 1 the factor lies in [0, 2]); ``ab_clip=(lo, hi)`` clips the factor
``1 − ρ c``. ``ab_rho = 0`` gives plain SGD with momentum. AB composes with SC and LWP (the SC step and the
LWP prediction use the braked velocity).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from ..pipeline_sgd import PipelineSGD
from ._options import add_group_defaults

__all__ = ["AdaptiveBrakingSGD", "AB_SCOPES"]

AB_SCOPES = ("tensor", "stage")


class AdaptiveBrakingSGD(PipelineSGD):
    """SGD(M) with Adaptive Braking (see the module docstring); other PipelineSGD options pass through.

    Args:
        ab_rho: braking strength ``ρ`` (>= 0).
        ab_scope: ``"tensor"`` or ``"stage"``.
        ab_clip: ``None`` or ``(lo, hi)`` bounds for the factor ``1 − ρ c``.
        ab_eps: ``ε`` in the cosine's denominator.
    """

    #: the cosine is a reduction over whole tensors: runs stacked along dimension 0 would mix
    supports_stacked_runs = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        ab_rho: float = 1.0,
        ab_scope: str = "tensor",
        ab_clip: Optional[tuple[float, float]] = None,
        ab_eps: float = 1e-8,
        **options: Any,
    ) -> None:
        if ab_rho < 0.0:
            raise ValueError(f"ab_rho must be >= 0, got {ab_rho}")
        if ab_scope not in AB_SCOPES:
            raise ValueError(f"unknown ab_scope {ab_scope!r}; choose one of {AB_SCOPES}")
        if ab_clip is not None:
            try:
                lo, hi = (float(x) for x in ab_clip)
            except (TypeError, ValueError):
                raise ValueError(f"ab_clip must be None or a pair (lo, hi), got {ab_clip!r}") from None
            if lo > hi:
                raise ValueError(f"ab_clip lower bound {lo} exceeds upper bound {hi}")
            ab_clip = (lo, hi)
        if ab_eps <= 0.0:
            raise ValueError(f"ab_eps must be > 0, got {ab_eps}")
        super().__init__(params, lr, momentum, weight_decay, **options)
        add_group_defaults(self, dict(ab_rho=float(ab_rho), ab_scope=ab_scope, ab_clip=ab_clip, ab_eps=float(ab_eps)))

    def _process_grads(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        rho = group["ab_rho"]
        if rho == 0.0:
            return grads
        velocities = [self.state[p].get("momentum_buffer") for p in params]
        idx = [i for i, v in enumerate(velocities) if v is not None]
        if not idx:
            return grads
        gs = [grads[i] for i in idx]
        vs = [velocities[i] for i in idx]
        dots = torch.stack([torch.dot(g.reshape(-1), v.reshape(-1)) for g, v in zip(gs, vs)])  # on device: no sync
        v_norms = torch.stack(torch._foreach_norm(vs))
        eps, clip = group["ab_eps"], group["ab_clip"]
        if group["ab_scope"] == "stage":
            g_all = torch.sqrt(torch.stack(torch._foreach_norm(grads)).square().sum())
            factor = 1.0 - rho * dots.sum() / (g_all * v_norms.square().sum().sqrt() + eps)
            if clip is not None:
                factor = factor.clamp(clip[0], clip[1])
            return list(torch._foreach_mul(grads, factor.to(grads[0].dtype)))
        g_norms = torch.stack(torch._foreach_norm(gs))
        factors = 1.0 - rho * dots / (g_norms * v_norms + eps)
        if clip is not None:
            factors = factors.clamp(clip[0], clip[1])
        out = list(grads)
        for k, i in enumerate(idx):
            out[i] = grads[i] * factors[k]
        return out
