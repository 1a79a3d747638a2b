"""SpecTrain (Chen, Yang & Cheng, "Efficient and Robust Parallel DNN Training through Model Parallelism on
Multi-GPU Platform", arXiv 1809.02839, 2018): weight prediction along the smoothed update for BOTH passes.

A stage predicts the weights ``s`` updates ahead along its momentum velocity ``v`` (the smoothed gradient):
``ŵ = w − η c(s) v`` with ``c(s) = s`` (``lwp_mode="linear"``, SpecTrain's rule) or the momentum-decayed
``m(1 − m^s)/(1 − m)``. SpecTrain aims both passes of a micro-batch at ONE target version: the weights that
are in effect when that micro-batch *completes* (its backward has reached the input stage). In pipeprop's
schedule stage ``s`` (0 = input) runs the backward of micro-batch ``n`` at live version ``n`` and the
micro-batch completes ``s`` steps later, when the stage has version ``n + s``. So, with
``r = (D_max − D)/2`` (``= s`` for the standard delays ``D = 2(S−1−s) + offset``):

* ``horizon_rule="completion"`` (default, SpecTrain): forward horizon ``D + r``, backward horizon ``r``;
* ``horizon_rule="update"``: forward horizon ``D``, backward horizon ``0`` (the version that the stage's
  own update is applied to; then SpecTrain equals forward-only LWP, ``pb+lwp``).

``forward_horizon``/``backward_horizon`` fix the horizons for every stage (per-group keys work too).
``pipeline_max_delay`` gives ``D_max`` when this optimizer holds only some of the stages (default: the
largest delay among its groups). With every delay 0 both horizons are 0: plain SGD with momentum.
UNCONFIRMED: how the PB paper parametrized SpecTrain (the target version above is SpecTrain's own rule).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from ..base import group_params
from ..pipeline_sgd import PipelineSGD, lwp_coefficient
from ._options import add_group_defaults, scratch_like

__all__ = ["SpecTrain", "HORIZON_RULES"]

HORIZON_RULES = ("completion", "update")


class SpecTrain(PipelineSGD):
    """SGD(M) whose forward AND backward passes use weights predicted along the velocity.

    Args:
        params, lr, momentum, weight_decay: as :class:`~pipeprop.optim.PipelineSGD` (``lwp_mode`` and
            ``lwp_source`` choose the extrapolation; SC may be combined).
        horizon_rule: ``"completion"`` (default) or ``"update"``, see the module docstring.
        forward_horizon: fixed forward horizon (overrides the rule).
        backward_horizon: fixed backward horizon (overrides the rule).
        pipeline_max_delay: the pipeline's largest delay ``D_max`` (default: the largest among the groups).
    """

    #: backward_weights scales by a scalar learning rate
    supports_per_run_lr = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        horizon_rule: str = "completion",
        forward_horizon: Optional[int] = None,
        backward_horizon: Optional[int] = None,
        pipeline_max_delay: Optional[int] = None,
        **options: Any,
    ) -> None:
        if horizon_rule not in HORIZON_RULES:
            raise ValueError(f"unknown horizon_rule {horizon_rule!r}; choose one of {HORIZON_RULES}")
        for name, value in (("forward_horizon", forward_horizon), ("backward_horizon", backward_horizon),
                            ("pipeline_max_delay", pipeline_max_delay)):
            if value is not None and int(value) < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value}")
        options.setdefault("weight_prediction", True)
        if not options["weight_prediction"]:
            raise ValueError("SpecTrain always predicts weights; drop weight_prediction=False")
        super().__init__(params, lr, momentum, weight_decay, **options)
        add_group_defaults(
            self,
            dict(
                horizon_rule=horizon_rule,
                forward_horizon=forward_horizon,
                backward_horizon=backward_horizon,
                pipeline_max_delay=pipeline_max_delay,
            ),
        )
        self._scratch: dict[int, list[Tensor]] = {}

    def _remaining(self, group: dict[str, Any]) -> int:
        """``r = (D_max − D)/2``: steps from this stage's backward until the micro-batch completes."""
        if group["horizon_rule"] == "update":
            return 0
        d_max = group["pipeline_max_delay"]
        if d_max is None:
            d_max = max(self.stage_delay(g) for g in self.param_groups)
        return max(0, (int(d_max) - self.stage_delay(group)) // 2)

    def _lwp_horizon(self, group: dict[str, Any]) -> int:
        """Forward horizon."""
        fixed = group.get("forward_horizon")
        if fixed is not None:
            return int(fixed)
        return self.stage_delay(group) + self._remaining(group)

    def backward_horizon(self, group: dict[str, Any]) -> int:
        fixed = group.get("backward_horizon")
        if fixed is not None:
            return int(fixed)
        return self._remaining(group)

    @torch.no_grad()
    def backward_weights(self, group: dict[str, Any]) -> Optional[list[Tensor]]:
        horizon = self.backward_horizon(group)
        if horizon == 0:
            return None
        params = group_params(group)
        coef = lwp_coefficient(group["momentum"], horizon, group["lwp_mode"])
        lr = self._group_lr(group)
        out = scratch_like(self._scratch, group, params)
        for o, p in zip(out, params):
            v = self._lwp_direction(group, p)
            if v is None:
                o.copy_(p)
            else:
                torch.add(p, v, alpha=-lr * coef, out=o)
        return out
