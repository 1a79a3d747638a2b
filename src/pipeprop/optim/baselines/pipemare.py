"""PipeMare (Yang et al., "PipeMare: Asynchronous Pipeline Parallel DNN Training", MLSys 2021,
arXiv 1910.05124): learning-rate rescheduling plus discrepancy correction, on top of SGD with momentum.

Per stage with delay ``D`` (updates between its forward and backward of one micro-batch) and
``k`` = number of updates this stage has applied so far:

* **T1, learning-rate rescheduling** (``lr_rescheduling=True``): the stage's learning rate is
  ``η_s(k) = η · max(D, 1)^(−p_k)`` with ``p_k = max(0, 1 − k/K)`` and ``K = pipemare_warmup_steps``:
  it starts at ``η / D`` and anneals geometrically to ``η`` after ``K`` updates. ``η`` is the group's
  ``lr``, so any ``torch.optim.lr_scheduler`` multiplies with this factor.
* **T2, discrepancy correction** (``discrepancy_correction=True``): an exponential moving average of the
  stage's weight deltas, ``δ ← γ δ + (1 − γ)(w_new − w_old)`` (``δ = 0`` initially), extrapolates the
  live weights back towards the forward weights for the BACKWARD pass:
  ``w_bwd = w − h δ`` with ``h = min(k, D)`` (the true forward/backward version gap, which is ``D`` once
  the pipeline is full). ``γ = pipemare_decay`` or, by default, ``γ = D^(−1/D)`` (``γ^D = 1/D``) for
  ``D ≥ 2`` and ``γ = 0`` for ``D ≤ 1`` (then ``w − δ`` is exactly the previous version).

UNCONFIRMED (digest of the paper could not be checked): the exact T1 schedule (exponent annealed linearly),
the default ``K`` and the default ``γ`` rule; all are options. With ``D = 0`` both techniques vanish and
the optimizer is plain SGD with momentum.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from ..base import group_params
from ..pipeline_sgd import PipelineSGD
from ._options import add_group_defaults, scratch_like

__all__ = ["PipeMare", "pipemare_lr_factor", "pipemare_decay"]


def pipemare_lr_factor(delay: int, step: int, warmup_steps: int) -> float:
    """T1 factor ``max(D, 1)^(−p)`` with ``p = max(0, 1 − step/warmup_steps)`` (``p = 0`` if no warm-up)."""
    if warmup_steps <= 0:
        return 1.0
    p = max(0.0, 1.0 - step / warmup_steps)
    return float(max(delay, 1)) ** (-p)


def pipemare_decay(delay: int) -> float:
    """Default EMA decay ``γ = D^(−1/D)`` for ``D ≥ 2``, ``0`` for ``D ≤ 1``."""
    if delay <= 1:
        return 0.0
    return float(delay) ** (-1.0 / delay)


class PipeMare(PipelineSGD):
    """SGD(M) with PipeMare's per-stage learning-rate warm-up and backward-weight discrepancy correction.

    Args:
        params, lr, momentum, weight_decay: as :class:`~pipeprop.optim.PipelineSGD` (all its other options,
            e.g. ``nesterov`` or ``decoupled_weight_decay``, pass through).
        lr_rescheduling: apply T1 (delay-dependent learning-rate warm-up).
        pipemare_warmup_steps: ``K``, updates over which the stage factor anneals from ``1/D`` to 1.
        discrepancy_correction: apply T2 (backward weights ``w − min(k, D) δ``).
        pipemare_decay: EMA decay ``γ`` of the weight deltas; ``None`` = ``D^(−1/D)`` per stage.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        lr_rescheduling: bool = True,
        pipemare_warmup_steps: int = 5000,
        discrepancy_correction: bool = True,
        pipemare_decay: Optional[float] = None,
        **options: Any,
    ) -> None:
        if pipemare_warmup_steps < 0:
            raise ValueError(f"pipemare_warmup_steps must be >= 0, got {pipemare_warmup_steps}")
        if pipemare_decay is not None and not 0.0 <= pipemare_decay < 1.0:
            raise ValueError(f"pipemare_decay must lie in [0, 1) or be None (per-stage D^(-1/D)), got {pipemare_decay}")
        super().__init__(params, lr, momentum, weight_decay, **options)
        add_group_defaults(
            self,
            dict(
                lr_rescheduling=lr_rescheduling,
                pipemare_warmup_steps=int(pipemare_warmup_steps),
                discrepancy_correction=discrepancy_correction,
                pipemare_decay=pipemare_decay,
            ),
        )
        self._scratch: dict[int, list[Tensor]] = {}

    # ------------------------------------------------------------------ per-stage quantities
    def stage_steps(self, group: dict[str, Any]) -> int:
        """Updates this stage has applied so far (``k``)."""
        for p in group_params(group):
            st = self.state.get(p)
            if st and "stage_step" in st:
                return int(st["stage_step"])
        return 0

    def _group_lr(self, group: dict[str, Any]) -> float:
        lr = super()._group_lr(group)
        if not group["lr_rescheduling"]:
            return lr
        return lr * pipemare_lr_factor(self.stage_delay(group), self.stage_steps(group), group["pipemare_warmup_steps"])

    def _decay(self, group: dict[str, Any]) -> float:
        g = group["pipemare_decay"]
        return pipemare_decay(self.stage_delay(group)) if g is None else float(g)

    def correction_horizon(self, group: dict[str, Any]) -> int:
        """``h = min(k, D)``: how many updates the live weights are ahead of this forward's weights."""
        return min(self.stage_steps(group), self.stage_delay(group))

    # ------------------------------------------------------------------ engine hooks
    @torch.no_grad()
    def backward_weights(self, group: dict[str, Any]) -> Optional[list[Tensor]]:
        if not group["discrepancy_correction"]:
            return None
        h = self.correction_horizon(group)
        if h == 0:
            return None
        params = group_params(group)
        out = scratch_like(self._scratch, group, params)
        for o, p in zip(out, params):
            delta = self.state[p].get("pipemare_delta")
            if delta is None:
                o.copy_(p)
            else:
                torch.add(p, delta, alpha=-float(h), out=o)
        return out

    def _update(self) -> None:
        """The SGD update of every stage (run by the inherited ``step``), with the deltas' EMA around it."""
        # δ ← γ δ + (1 − γ)(w_new − w_old); the difference is taken exactly (no cancellation against |w|)
        corrected: list[tuple[float, list[Tensor], list[Tensor], list[Tensor]]] = []
        stepped: list[Tensor] = []
        for group in self.param_groups:
            params = [p for p in group_params(group) if p.grad is not None]
            stepped += params
            if not group["discrepancy_correction"] or not params:
                continue
            deltas = []
            for p in params:
                st = self.state[p]
                if "pipemare_delta" not in st:
                    st["pipemare_delta"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                deltas.append(st["pipemare_delta"])
            corrected.append((self._decay(group), params, [p.detach().clone() for p in params], deltas))
        super()._update()
        for gamma, params, old, deltas in corrected:
            torch._foreach_sub_(old, params)  # now w_old − w_new
            torch._foreach_mul_(deltas, gamma)
            torch._foreach_add_(deltas, old, alpha=-(1.0 - gamma))
        for p in stepped:
            st = self.state[p]
            st["stage_step"] = int(st.get("stage_step", 0)) + 1
