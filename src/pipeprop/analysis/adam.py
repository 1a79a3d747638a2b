"""Adam-type updates on the quadratic: with a fixed preconditioner they ARE the SGD recurrence.

On one eigen-direction (loss ``½ λ w²``) with the second-moment estimate frozen at ``v̂`` (late in
training, ``v`` changes slowly compared with ``m``) and the first-moment bias correction at 1 (``t`` large),
the Adam(W) step ``w ← w − η m/(√v̂ + ε)`` with ``m ← β1 m + (1 − β1) g`` is heavy-ball SGD with momentum
``β1`` on the scaled velocity ``m/(1 − β1)``, so with ``p = 1/(√v̂ + ε)``:

* PB:  ``h = ηλ · (1 − β1) · p`` and ``m = β1`` in :func:`~pipeprop.analysis.recurrence.characteristic_polynomial`;
* SC-Adam's first moment ``β1^D m + (1 − β1^D) g = (1 − β1)(a v + b g)`` with SGD's ``a = β1^D``,
  ``b = (1 − β1^D)/(1 − β1)``: exactly the SGD SC coefficients;
* LWP-Adam ``ŵ = w − η T m/(√v̂ + ε) = w − (η (1 − β1) p) T v``: exactly SGD's LWP with ``c = T``.

So every rate, stability boundary and heat map of ``pipeprop analyze`` holds for Adam with ``ηλ`` read as
``η (1 − β1) λ / (√v̂ + ε)``. :func:`measure_adam_rate` checks this with the real
:class:`~pipeprop.optim.PipelineAdam` (its ``v`` pinned to ``v̂``) against :func:`spectral_radius`.
NAdam adds a gradient term to the update and is not covered by this reduction.
"""

from __future__ import annotations

import math

import numpy as np

from .recurrence import spectral_radius

__all__ = ["adam_effective_h", "measure_adam_rate", "ADAM_QUADRATIC_METHODS"]

#: analysis methods whose Adam version reduces exactly (method name -> PipelineAdam options)
ADAM_QUADRATIC_METHODS = {
    "pb": {},
    "pb+sc": {"spike_compensation": True},
    "pb+lwp": {"weight_prediction": True},
    "pb+sc+lwp": {"spike_compensation": True, "weight_prediction": True},
}


def adam_effective_h(lr: float, lam: float, beta1: float, v_hat: float, eps: float = 1e-8) -> float:
    """The SGD recurrence's ``h = ηλ`` that Adam with frozen ``v̂`` realizes: ``η (1 − β1) λ / (√v̂ + ε)``."""
    return lr * (1.0 - beta1) * lam / (math.sqrt(v_hat) + eps)


def measure_adam_rate(method: str, *, lr: float, lam: float, beta1: float, delay: int, v_hat: float = 1.0,
                      eps: float = 1e-8, steps: int = 3000, window: int = 500) -> tuple[float, float]:
    """``(measured, predicted)`` per-step convergence rate of delayed Adam on ``½ λ w²``.

    Runs :class:`~pipeprop.optim.PipelineAdam` (float64, one parameter) with the gradient of the forward
    weights of version ``t − D`` and ``v`` pinned so that ``v̂ = v_hat``; the measured rate is the geometric
    mean decay of ``max |w|`` over the last ``window`` steps, the prediction :func:`spectral_radius` at
    :func:`adam_effective_h`.
    """
    import torch

    from ..optim.pipeline_adam import PipelineAdam

    if method not in ADAM_QUADRATIC_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(ADAM_QUADRATIC_METHODS)}")
    beta2 = 0.999
    w = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = PipelineAdam([{"params": [w], "delay": delay}], lr=lr, betas=(beta1, beta2), eps=eps,
                       **ADAM_QUADRATIC_METHODS[method])
    group = opt.param_groups[0]
    state = opt.state[w]
    state.update(step=0, exp_avg=torch.zeros_like(w), exp_avg_sq=torch.zeros_like(w))
    history = [1.0]  # forward weights of versions 0, 1, ...
    trace = []
    for t in range(steps):
        g = lam * history[max(0, t - delay)]
        w.grad = torch.full_like(w, g)
        # pin v: after this step's update v/(1 − β2^(t+1)) = v_hat
        state["exp_avg_sq"].fill_((v_hat * (1.0 - beta2 ** (t + 1)) - (1.0 - beta2) * g * g) / beta2)
        opt.step()
        history.append(opt.forward_weights(group)[0].item())
        trace.append(abs(w.item()))
    seg = np.array(trace[-2 * window :])
    first, last = seg[:window].max(), seg[window:].max()
    measured = (last / first) ** (1.0 / window) if first > 0 and last > 0 else 0.0
    predicted = float(spectral_radius(adam_effective_h(lr, lam, beta1, v_hat, eps), method, beta1, delay))
    return float(measured), predicted
