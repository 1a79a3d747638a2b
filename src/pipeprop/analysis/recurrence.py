"""Delayed heavy-ball SGD on one eigen-direction of a convex quadratic, as a linear recurrence.

Loss ``½ λ w²`` (minimum at 0), learning rate ``η``, momentum ``m``, gradient delay ``D``. With the
conventions of :class:`pipeprop.optim.PipelineSGD` and :mod:`pipeprop.simulator` (step ``t`` applies the
gradient of micro-batch ``t``, whose forward used weight version ``t − D``) and the scaled velocity
``u = η v`` and ``h = s·η λ`` (``s`` a gradient scale, 1 unless the method shrinks gradients)::

    f_t     = w_t − c u_t                    forward weights of version t (c = 0 without LWP; c = T with LWP)
    G_t     = h f_{t−D}                      η · (delayed gradient)
    u_{t+1} = m u_t + G_t
    w_{t+1} = w_t − α u_{t+1} − β G_t         heavy ball α=1, β=0; SC α=m^D, β=(1−m^D)/(1−m); Nesterov α=m, β=1

The state ``x_t = [w_t, u_t, f_{t−1}, …, f_{t−D}]`` (``D + 2`` numbers) evolves as ``x_{t+1} = A x_t``
with the companion-type matrix ``A`` of :func:`companion_matrices`. Its characteristic polynomial is

    p(z) = (z − 1)(z^D (z − m) + h c) + h (α z + β (z − m))

(see :func:`characteristic_polynomial`); the asymptotic convergence rate is the spectral radius
``max |eig(A)|`` and the iteration converges iff it is below 1. Everything depends on ``η λ`` only
through ``h``, so the results are functions of ``(ηλ, m, D)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

__all__ = [
    "QuadraticMethod",
    "QUADRATIC_METHODS",
    "get_quadratic_method",
    "Coefficients",
    "coefficients",
    "companion_matrices",
    "characteristic_polynomial",
    "spectral_radius",
    "simulate",
]


@dataclass(frozen=True)
class QuadraticMethod:
    """How a training method changes delayed heavy-ball SGD on a quadratic.

    Attributes:
        name: method name (the names of :func:`pipeprop.available_methods` where one exists).
        spike_compensation: SC update ``w ← w − η(a v + b g)``.
        weight_prediction: LWP forward weights ``ŵ = w − η c v``.
        nesterov: Nesterov update ``w ← w − η(g + m v)``.
        grad_scale: ``None``, ``"shrink"`` (gradient shrinking ``g ← φ(D) g``, ``φ = β^D`` or ``1/(1+D)`` as in
            :mod:`pipeprop.optim.baselines.shrink`) or ``"pipemare"`` (PipeMare's learning-rate rule frozen at
            warm-up exponent ``p``: ``η ← η / max(D, 1)^p``; ``p = 1`` at the start of warm-up, 0 after it,
            where PipeMare is plain PB on a quadratic — its discrepancy correction only changes backward weights).
        delayed: ``False`` ignores ``D`` (synchronous SGD).
        summary: one line for listings.
    """

    name: str
    spike_compensation: bool = False
    weight_prediction: bool = False
    nesterov: bool = False
    grad_scale: Optional[str] = None
    delayed: bool = True
    summary: str = ""


QUADRATIC_METHODS: dict[str, QuadraticMethod] = {
    m.name: m
    for m in (
        QuadraticMethod("sgd", delayed=False, summary="synchronous SGDM (delay 0), the reference"),
        QuadraticMethod("pb", summary="delayed SGDM, no mitigation"),
        QuadraticMethod("pb+sc", spike_compensation=True, summary="Spike Compensation"),
        QuadraticMethod("pb+lwp", weight_prediction=True, summary="Linear Weight Prediction"),
        QuadraticMethod("pb+sc+lwp", spike_compensation=True, weight_prediction=True, summary="SC + LWP"),
        QuadraticMethod("pb+nesterov", nesterov=True, summary="delayed Nesterov momentum"),
        QuadraticMethod("pb+shrink", grad_scale="shrink", summary="gradient shrinking g <- beta^D g (or g/(1+D))"),
        QuadraticMethod("pipemare", grad_scale="pipemare", summary="PipeMare lr rule eta/max(D,1)^p at frozen p"),
    )
}

_ALIASES = {"none": "pb", "sc": "pb+sc", "lwp": "pb+lwp", "sc+lwp": "pb+sc+lwp", "nesterov": "pb+nesterov",
            "gs": "pb+shrink", "shrink": "pb+shrink", "gradient-shrinking": "pb+shrink", "pb+stash": "pb",
            "stash": "pb", "pb+spectrain": "pb+lwp", "spectrain": "pb+lwp"}


def get_quadratic_method(name: str | QuadraticMethod) -> QuadraticMethod:
    """Look a method up by name (aliases: ``none``, ``sc``, ``lwp``, ``sc+lwp``, ``nesterov``, ``shrink``).

    Weight stashing and SpecTrain map to ``pb`` and ``pb+lwp``: on a quadratic the backward weights do not
    change the weight gradient, so only staleness is modelled.
    """
    if isinstance(name, QuadraticMethod):
        return name
    key = str(name).strip().lower().replace(" ", "")
    key = _ALIASES.get(key, key)
    if key not in QUADRATIC_METHODS:
        raise ValueError(f"unknown method {name!r} for the quadratic analysis; choose one of: {', '.join(QUADRATIC_METHODS)}")
    return QUADRATIC_METHODS[key]


@dataclass(frozen=True)
class Coefficients:
    """The numbers of the recurrence (arrays broadcast against the momentum given)."""

    delay: int
    alpha: np.ndarray  # multiplier of u_{t+1} in the weight update
    beta: np.ndarray  # multiplier of G_t in the weight update
    c: np.ndarray  # forward weights f = w − c u
    scale: float  # h = scale · ηλ


def coefficients(
    method: str | QuadraticMethod,
    momentum: float | np.ndarray,
    delay: int,
    *,
    sc_delay: Optional[int] = None,
    lwp_horizon: Optional[int] = None,
    lwp_mode: str = "linear",
    shrink_rule: str = "power",
    shrink_beta: float = 0.98,
    pipemare_power: float = 1.0,
) -> Coefficients:
    """The recurrence coefficients of ``method`` at momentum ``m`` (scalar or array) and delay ``D``.

    Options mirror :class:`pipeprop.optim.PipelineSGD` (``sc_delay``, ``lwp_horizon``, ``lwp_mode``), plus
    ``shrink_rule``/``shrink_beta`` (as :class:`pipeprop.optim.baselines.GradientShrinkSGD`) and
    ``pipemare_power`` (``p`` of the PipeMare rule; 1 = start of warm-up, 0 = after it).
    """
    spec = get_quadratic_method(method)
    delay = int(delay)
    if delay < 0:
        raise ValueError(f"delay must be >= 0, got {delay}")
    if not spec.delayed:
        delay = 0
    m = np.asarray(momentum, dtype=float)
    if np.any((m < 0) | (m > 1)):
        raise ValueError("momentum must lie in [0, 1]")
    alpha, beta = np.ones_like(m), np.zeros_like(m)
    if spec.spike_compensation:
        d_sc = delay if sc_delay is None else int(sc_delay)
        alpha = m**d_sc
        with np.errstate(divide="ignore", invalid="ignore"):
            beta = np.where(m == 1.0, float(d_sc), (1.0 - alpha) / np.where(m == 1.0, 2.0, 1.0 - m))
    elif spec.nesterov:
        alpha, beta = m.copy(), np.ones_like(m)
    c = np.zeros_like(m)
    if spec.weight_prediction:
        horizon = delay if lwp_horizon is None else int(lwp_horizon)
        if lwp_mode == "linear":
            c = np.full_like(m, float(horizon))
        elif lwp_mode == "momentum-decay":
            with np.errstate(divide="ignore", invalid="ignore"):
                c = np.where(m == 1.0, float(horizon), m * (1.0 - m**horizon) / np.where(m == 1.0, 2.0, 1.0 - m))
        else:
            raise ValueError(f"unknown lwp_mode {lwp_mode!r}; choose 'linear' or 'momentum-decay'")
    scale = 1.0
    if spec.grad_scale == "shrink":
        if shrink_rule == "power":
            if not 0.0 < shrink_beta <= 1.0:
                raise ValueError(f"shrink_beta must lie in (0, 1], got {shrink_beta}")
            scale = shrink_beta**delay
        elif shrink_rule == "inverse":
            scale = 1.0 / (1.0 + delay)
        else:
            raise ValueError(f"unknown shrink_rule {shrink_rule!r}; choose 'power' or 'inverse'")
    elif spec.grad_scale == "pipemare":
        scale = 1.0 / max(delay, 1) ** pipemare_power
    return Coefficients(delay, alpha, beta, c, scale)


def companion_matrices(h: float | np.ndarray, coef: Coefficients, momentum: float | np.ndarray) -> np.ndarray:
    """Transition matrices ``A`` with ``x_{t+1} = A x_t``, shape ``broadcast(ηλ, m).shape + (D+2, D+2)``.

    ``h`` is ``ηλ`` (the method's gradient scale is applied here); ``coef`` comes from :func:`coefficients`
    for the same momentum.
    """
    D = coef.delay
    hs, m, alpha, beta, c = np.broadcast_arrays(
        np.asarray(h, dtype=float) * coef.scale, np.asarray(momentum, dtype=float), coef.alpha, coef.beta, coef.c
    )
    n = D + 2
    A = np.zeros(hs.shape + (n, n))
    g_row = np.zeros(hs.shape + (n,))  # G_t = g_row · x_t
    if D == 0:
        g_row[..., 0] = hs
        g_row[..., 1] = -hs * c
    else:
        g_row[..., D + 1] = hs
    A[..., 1, :] = g_row  # u_{t+1} = m u_t + G_t
    A[..., 1, 1] += m
    A[..., 0, :] = -(alpha + beta)[..., None] * g_row  # w_{t+1} = w_t − α m u_t − (α + β) G_t
    A[..., 0, 0] += 1.0
    A[..., 0, 1] -= alpha * m
    if D >= 1:
        A[..., 2, 0] = 1.0  # f_t = w_t − c u_t becomes the newest history entry
        A[..., 2, 1] = -c
        idx = np.arange(3, D + 2)
        A[..., idx, idx - 1] = 1.0  # shift f_{t−k} → f_{t+1−(k+1)}
    return A


def characteristic_polynomial(h: float | np.ndarray, coef: Coefficients, momentum: float | np.ndarray) -> np.ndarray:
    """Coefficients (highest power first, last axis of length ``D + 3``) of
    ``p(z) = (z − 1)(z^D (z − m) + h c) + h (α z + β (z − m))`` with ``h = scale · ηλ``."""
    D = coef.delay
    hs, m, alpha, beta, c = np.broadcast_arrays(
        np.asarray(h, dtype=float) * coef.scale, np.asarray(momentum, dtype=float), coef.alpha, coef.beta, coef.c
    )
    p = np.zeros(hs.shape + (D + 3,))
    # (z − 1)(z − m) z^D = z^{D+2} − (1 + m) z^{D+1} + m z^D
    p[..., 0] = 1.0
    p[..., 1] = -(1.0 + m)
    p[..., 2] += m
    # h c (z − 1) + h (α + β) z − h β m  → linear term and constant
    p[..., -2] += hs * (c + alpha + beta)
    p[..., -1] += -hs * (c + beta * m)
    return p


def spectral_radius(
    h: float | np.ndarray, method: str | QuadraticMethod, momentum: float | np.ndarray, delay: int, **options
) -> np.ndarray:
    """Asymptotic convergence rate ``max |eig(A)|`` per ``(ηλ, m)`` (broadcast), for delay ``D``.

    ``< 1`` converges (error ∝ rate^t), ``≥ 1`` diverges or stalls. ``options`` go to :func:`coefficients`.
    """
    coef = coefficients(method, momentum, delay, **options)
    A = companion_matrices(h, coef, momentum)
    eig = np.linalg.eigvals(A.reshape(-1, *A.shape[-2:]))
    return np.abs(eig).max(axis=-1).reshape(A.shape[:-2])


def simulate(
    h: float | np.ndarray,
    method: str | QuadraticMethod,
    momentum: float,
    delay: int,
    steps: int,
    w0: float | np.ndarray = 1.0,
    **options,
) -> tuple[np.ndarray, np.ndarray]:
    """Iterate the recurrence from ``w_0``, zero velocity and a history of ``w_0`` (the pipeline's start).

    ``h`` (= ηλ) and ``w0`` broadcast, e.g. one entry per eigen-direction. Returns ``(w, f_used)`` of shape
    ``(steps + 1, *shape)`` and ``(steps, *shape)``: the live weights ``w_0..w_steps`` and the forward weights
    whose gradient step ``t`` applies (version ``max(0, t − D)``), the ones the pipeline's loss is computed at.
    """
    coef = coefficients(method, momentum, delay, **options)
    A = companion_matrices(h, coef, momentum)
    hs, w0 = np.broadcast_arrays(np.asarray(h, dtype=float), np.asarray(w0, dtype=float))
    A = np.broadcast_to(A, hs.shape + A.shape[-2:])
    n = coef.delay + 2
    x = np.zeros(hs.shape + (n,))
    x[..., 0] = w0
    x[..., 2:] = w0[..., None]
    w = np.empty((steps + 1,) + hs.shape)
    f = np.empty((steps,) + hs.shape)
    w[0] = w0
    c = np.broadcast_to(coef.c, hs.shape)
    for t in range(steps):
        f[t] = x[..., -1] if coef.delay >= 1 else x[..., 0] - c * x[..., 1]
        x = np.einsum("...ij,...j->...i", A, x)
        w[t + 1] = x[..., 0]
    return w, f
