"""Gradient shrinking: the delayed gradient of a stage is scaled down by a factor that depends on its delay.

``g ← φ(D) g`` before the momentum update, with ``g`` the loss gradient plus the coupled L2 term, and

* ``shrink_rule="power"`` (default): ``φ(D) = β^D`` with ``β = shrink_beta`` (the gradient shrinking of
  Zhuang et al., "Fully Decoupled Neural Network Learning Using Delayed Gradients", arXiv 1906.09108,
  which scales a module's delayed gradient by β per step of staleness);
* ``shrink_rule="inverse"``: ``φ(D) = 1/(1 + D)`` (staleness-dependent step size as in Zhang et al.,
  "Staleness-aware Async-SGD", arXiv 1511.05950, with staleness ``D + 1``).

With a constant factor and SGD(M) this equals a per-stage learning rate ``η φ(D)`` (the decoupled weight
decay, if used, is not shrunk). ``D = 0`` gives ``φ = 1``: plain SGD with momentum.
UNCONFIRMED: whether and how the PB paper compared gradient shrinking, and the value of ``β`` (default
0.98, chosen so that deep fine-grained pipelines keep a usable rate: ``0.98^38 ≈ 0.46``).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from ..pipeline_sgd import PipelineSGD
from ._options import add_group_defaults

__all__ = ["GradientShrinkSGD", "shrink_factor", "SHRINK_RULES"]

SHRINK_RULES = ("power", "inverse")


def shrink_factor(delay: int, rule: str = "power", beta: float = 0.98) -> float:
    """``φ(D)``: ``β^D`` (``"power"``) or ``1/(1 + D)`` (``"inverse"``)."""
    if delay < 0:
        raise ValueError(f"delay must be >= 0, got {delay}")
    if rule == "power":
        return float(beta) ** delay
    if rule == "inverse":
        return 1.0 / (1.0 + delay)
    raise ValueError(f"unknown shrink_rule {rule!r}; choose one of {SHRINK_RULES}")


class GradientShrinkSGD(PipelineSGD):
    """SGD(M) whose stage gradients are multiplied by ``φ(D)`` (see the module docstring).

    Args:
        params, lr, momentum, weight_decay: as :class:`~pipeprop.optim.PipelineSGD` (other options pass through).
        shrink_rule: ``"power"`` (``β^D``, default) or ``"inverse"`` (``1/(1+D)``).
        shrink_beta: ``β`` of the power rule, in ``(0, 1]``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        shrink_rule: str = "power",
        shrink_beta: float = 0.98,
        **options: Any,
    ) -> None:
        if shrink_rule not in SHRINK_RULES:
            raise ValueError(f"unknown shrink_rule {shrink_rule!r}; choose one of {SHRINK_RULES}")
        if not 0.0 < shrink_beta <= 1.0:
            raise ValueError(f"shrink_beta must lie in (0, 1], got {shrink_beta}")
        super().__init__(params, lr, momentum, weight_decay, **options)
        add_group_defaults(self, dict(shrink_rule=shrink_rule, shrink_beta=float(shrink_beta)))

    def stage_factor(self, group: dict[str, Any]) -> float:
        return shrink_factor(self.stage_delay(group), group["shrink_rule"], group["shrink_beta"])

    def _process_grads(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        factor = self.stage_factor(group)
        if factor == 1.0:
            return grads
        return list(torch._foreach_mul(grads, factor))
