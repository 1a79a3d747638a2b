"""A many-eigenvalue quadratic ``L(w) = ½ wᵀ H w``: loss curves by direct simulation and the predicted rate.

The quadratic decouples along the eigenvectors of ``H``, so the loss is ``½ Σ_i λ_i w_i(t)²`` with each
coordinate following the scalar recurrence of :mod:`pipeprop.analysis.recurrence` at ``h = η λ_i``. Its
asymptotic rate is the largest spectral radius over the spectrum (the loss decays like ``rate^{2t}``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .recurrence import QuadraticMethod, simulate, spectral_radius

__all__ = ["random_psd_spectrum", "QuadraticRun", "quadratic_loss_curve"]


def random_psd_spectrum(dim: int = 50, samples: int = 100, seed: int = 0, lambda_max: float = 1.0) -> np.ndarray:
    """Eigenvalues of ``H = G Gᵀ / samples`` for a Gaussian ``G`` (dim × samples), scaled so ``max λ = lambda_max``.

    Sorted ascending; with ``samples ≥ dim`` all are positive (a Marchenko–Pastur spread, condition number
    about ``((1 + √r)/(1 − √r))²`` for ``r = dim/samples``).
    """
    if dim < 1 or samples < dim:
        raise ValueError(f"need 1 <= dim <= samples for a positive definite H, got dim={dim}, samples={samples}")
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((dim, samples))
    eig = np.linalg.eigvalsh(g @ g.T / samples)
    return np.sort(eig) * (lambda_max / eig.max())


@dataclass
class QuadraticRun:
    """Loss curve of one method on a quadratic."""

    method: str
    loss: np.ndarray  # loss at the forward weights each step uses (what a pipeline reports), length steps
    live_loss: np.ndarray  # loss at the live weights w_0..w_steps
    rate: float  # max spectral radius over the spectrum


def quadratic_loss_curve(
    eigenvalues: np.ndarray,
    lr: float,
    momentum: float,
    delay: int,
    method: str | QuadraticMethod,
    steps: int,
    w0: np.ndarray | float = 1.0,
    **options,
) -> QuadraticRun:
    """Simulate ``method`` on ``½ Σ λ_i w_i²`` from eigen-coordinates ``w0``; returns losses and the rate."""
    lam = np.asarray(eigenvalues, dtype=float)
    if np.any(lam < 0):
        raise ValueError("eigenvalues must be >= 0 (a convex quadratic)")
    h = lr * lam
    with np.errstate(over="ignore", invalid="ignore"):
        w, f = simulate(h, method, momentum, delay, steps, w0=w0, **options)
        loss = 0.5 * (f**2 * lam).sum(axis=-1)
        live = 0.5 * (w**2 * lam).sum(axis=-1)
    rate = float(spectral_radius(h, method, momentum, delay, **options).max())
    name = method if isinstance(method, str) else method.name
    return QuadraticRun(name, loss, live, rate)
