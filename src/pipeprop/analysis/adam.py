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
``η (1 − β1) λ / (√v̂ + ε)``. :func:`measure_adam_reduction` checks this: the real
:class:`~pipeprop.optim.PipelineAdam` (its ``v`` pinned to ``v̂``) follows the SGD recurrence's trajectory.
NAdam adds a gradient term to the update and is not covered by this reduction.
"""

from __future__ import annotations

import math

import numpy as np

from .recurrence import simulate, spectral_radius

__all__ = ["adam_effective_h", "adam_trajectory", "measure_adam_reduction", "ADAM_QUADRATIC_METHODS"]

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


def adam_trajectory(method: str, *, lr: float, lam: float, beta1: float, delay: int, v_hat: float = 1.0,
                    eps: float = 1e-8, steps: int = 500, w0: float = 1.0) -> np.ndarray:
    """Live weights ``w_0..w_steps`` of the real :class:`~pipeprop.optim.PipelineAdam` on ``½ λ w²``.

    float64, one parameter, the gradient of the forward weights of version ``max(0, t − D)``; the state
    starts at step 10,000 (so ``1 − β1^t`` is 1 in float64) and ``v`` is pinned so that ``v̂ = v_hat``.
    """
    import torch

    from ..optim.pipeline_adam import PipelineAdam

    if method not in ADAM_QUADRATIC_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(ADAM_QUADRATIC_METHODS)}")
    beta2, t0 = 0.999, 10_000
    w = torch.nn.Parameter(torch.full((1,), float(w0), dtype=torch.float64))
    opt = PipelineAdam([{"params": [w], "delay": delay}], lr=lr, betas=(beta1, beta2), eps=eps,
                       **ADAM_QUADRATIC_METHODS[method])
    group = opt.param_groups[0]
    state = opt.state[w]
    state.update(step=t0, exp_avg=torch.zeros_like(w), exp_avg_sq=torch.zeros_like(w))
    history = [float(w0)]  # forward weights of versions 0, 1, ...
    out = [float(w0)]
    for t in range(steps):
        g = lam * history[max(0, t - delay)]
        w.grad = torch.full_like(w, g)
        # pin v: after this step's moment update, v/(1 − β2^(step + 1)) = v_hat
        state["exp_avg_sq"].fill_((v_hat * (1.0 - beta2 ** (state["step"] + 1)) - (1.0 - beta2) * g * g) / beta2)
        opt.step()
        history.append(opt.forward_weights(group)[0].item())
        out.append(w.item())
    return np.array(out)


def measure_adam_reduction(method: str, *, lr: float, lam: float, beta1: float, delay: int, v_hat: float = 1.0,
                           eps: float = 1e-8, steps: int = 500) -> tuple[float, float]:
    """``(max |w_adam − w_sgd| / max |w_sgd|, predicted rate)``: the real PipelineAdam against the SGD recurrence
    (:func:`~pipeprop.analysis.recurrence.simulate` at ``h = `` :func:`adam_effective_h`, momentum ``β1``)."""
    h = adam_effective_h(lr, lam, beta1, v_hat, eps)
    adam = adam_trajectory(method, lr=lr, lam=lam, beta1=beta1, delay=delay, v_hat=v_hat, eps=eps, steps=steps)
    sgd, _ = simulate(h, method, beta1, delay, steps)
    rel = float(np.max(np.abs(adam - sgd)) / np.max(np.abs(sgd)))
    return rel, float(spectral_radius(h, method, beta1, delay))
