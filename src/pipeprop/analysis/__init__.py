"""Quadratic-model analysis of delayed SGD with momentum and its mitigations (numpy; the bridge uses torch).

* :mod:`.recurrence` — one eigen-direction as a linear recurrence: companion matrices, characteristic
  polynomials, spectral radius (= asymptotic rate), direct simulation;
* :mod:`.stability` — rates over grids and the largest stable ``ηλ`` per delay;
* :mod:`.quadratic` — many-eigenvalue quadratics (loss curves);
* :mod:`.bridge` — the real simulator on a linear model next to the prediction (imports torch lazily).
"""

from .quadratic import QuadraticRun, quadratic_loss_curve, random_psd_spectrum
from .recurrence import (
    QUADRATIC_METHODS,
    Coefficients,
    QuadraticMethod,
    characteristic_polynomial,
    coefficients,
    companion_matrices,
    get_quadratic_method,
    simulate,
    spectral_radius,
)
from .stability import optimal_rate, rate_grid, rate_map_momentum, stability_boundary

__all__ = [
    "QUADRATIC_METHODS",
    "QuadraticMethod",
    "get_quadratic_method",
    "Coefficients",
    "coefficients",
    "companion_matrices",
    "characteristic_polynomial",
    "spectral_radius",
    "simulate",
    "stability_boundary",
    "rate_grid",
    "rate_map_momentum",
    "optimal_rate",
    "random_psd_spectrum",
    "quadratic_loss_curve",
    "QuadraticRun",
]
