"""Rates over grids and the stability boundary (largest stable ``ηλ``) of the delayed recurrences.

The boundary uses the root locus of ``p(z) = z^D (z − 1)(z − m) + h (p₁ z − p₀)`` (``h`` enters linearly, see
:func:`~pipeprop.analysis.recurrence.characteristic_polynomial`): a root lies on the unit circle at
``z = e^{iθ}`` exactly when ``h(θ) = −e^{iDθ}(e^{iθ} − 1)(e^{iθ} − m) / (p₁ e^{iθ} − p₀)`` is real and positive.
For small ``h > 0`` every root is inside (the root at 1 moves in), so the smallest such ``h`` is where the
iteration first becomes unstable. This costs ``O(D)`` per delay instead of an eigen-decomposition per
bisection step, so boundaries for delays in the thousands take milliseconds.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from .recurrence import QuadraticMethod, coefficients, spectral_radius

__all__ = ["stability_boundary", "rate_grid", "rate_map_momentum", "optimal_rate"]


def _boundary_one(m: float, delay: int, alpha: float, beta: float, c: float) -> float:
    p1, p0 = c + alpha + beta, c + beta * m
    n = 256 + 16 * (delay + 2)
    theta = np.linspace(0.0, np.pi, n + 1)[1:]

    def h_of(th: np.ndarray) -> np.ndarray:
        z = np.exp(1j * th)
        return -np.exp(1j * delay * th) * (z - 1.0) * (z - m) / (p1 * z - p0)

    im = h_of(theta).imag
    im[-1] = 0.0  # θ = π: h is real there (conjugate symmetry); taken as a candidate below
    cands = [h_of(np.array([np.pi])).real[0]]
    exact = np.flatnonzero(im[:-1] == 0.0)
    cands.extend(h_of(theta[exact]).real)
    k = np.flatnonzero(im[:-2] * im[1:-1] < 0.0)
    if k.size:
        # refine only the crossings that can hold the smallest positive h (Re h barely changes in a cell)
        re_a, re_b = h_of(theta[k]).real, h_of(theta[k + 1]).real
        lo_re, hi_re = np.minimum(re_a, re_b), np.maximum(re_a, re_b)
        keep = hi_re > 0.0
        if keep.any():
            keep &= lo_re <= hi_re[keep].min()
        k = k[keep]
    if k.size:
        lo, hi = theta[k].copy(), theta[k + 1].copy()
        s_lo = np.sign(im[k])
        for _ in range(48):
            mid = 0.5 * (lo + hi)
            s_mid = np.sign(h_of(mid).imag)
            left = s_mid == s_lo
            lo = np.where(left, mid, lo)
            hi = np.where(left, hi, mid)
        cands.extend(h_of(0.5 * (lo + hi)).real)
    cands_arr = np.asarray(cands)
    positive = cands_arr[cands_arr > 0.0]
    return float(positive.min()) if positive.size else float("inf")


def stability_boundary(
    method: str | QuadraticMethod, momentum: float, delays: int | Iterable[int], **options
) -> np.ndarray:
    """Largest stable ``ηλ`` (the end of the stable range that starts at 0) for each delay.

    ``options`` go to :func:`~pipeprop.analysis.recurrence.coefficients` (``sc_delay``, ``lwp_horizon``, ...).
    """
    scalar = np.ndim(delays) == 0
    ds = np.atleast_1d(np.asarray(delays, dtype=int))
    out = np.empty(ds.shape, dtype=float)
    for i, d in enumerate(ds):
        coef = coefficients(method, momentum, int(d), **options)
        hs = _boundary_one(float(momentum), coef.delay, float(coef.alpha), float(coef.beta), float(coef.c))
        out[i] = hs / coef.scale
    return out[0] if scalar else out


def rate_grid(
    method: str | QuadraticMethod, momentum: float, delays: Sequence[int], lr_lambda: np.ndarray, **options
) -> np.ndarray:
    """Spectral radius over ``delays × ηλ`` (shape ``(len(delays), len(lr_lambda))``)."""
    h = np.asarray(lr_lambda, dtype=float)
    return np.stack([spectral_radius(h, method, momentum, int(d), **options) for d in delays])


def rate_map_momentum(
    method: str | QuadraticMethod, momenta: np.ndarray, delay: int, lr_lambda: np.ndarray, **options
) -> np.ndarray:
    """Spectral radius over ``momenta × ηλ`` at one delay (shape ``(len(momenta), len(lr_lambda))``)."""
    m = np.asarray(momenta, dtype=float)[:, None]
    h = np.asarray(lr_lambda, dtype=float)[None, :]
    return spectral_radius(h, method, m, delay, **options)


def optimal_rate(
    method: str | QuadraticMethod, momentum: float, delay: int, lr_lambda: np.ndarray, **options
) -> tuple[float, float]:
    """``(best rate, ηλ attaining it)`` over the grid ``lr_lambda``."""
    r = spectral_radius(np.asarray(lr_lambda, dtype=float), method, momentum, delay, **options)
    i = int(np.argmin(r))
    return float(r[i]), float(np.asarray(lr_lambda)[i])
