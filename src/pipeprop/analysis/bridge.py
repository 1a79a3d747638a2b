"""Bridge to the real simulator: a linear pipeline trained with MSE is a quadratic the analysis predicts exactly.

The model is ``nn.Sequential(Linear(d, k), Linear(k, k), …)`` (no biases, float64) split into one stage per
layer; only the first layer trains (delay ``D = 2(S − 1)``), the others are fixed random maps, so the
gradient still flows back through ``S − 1`` stages. With ``P`` the product of the fixed maps, full-batch
inputs ``X`` and targets ``Y = X W*ᵀ Pᵀ``, the loss ``mean((X Wᵀ Pᵀ − Y)²)`` is a quadratic in ``W`` whose
Hessian ``(2/(N k)) PᵀP ⊗ XᵀX`` has eigenvalues ``λ_ij = 2 μ_i ν_j / (N k)`` (``μ``, ``ν`` the eigenvalues of
``PᵀP`` and ``XᵀX``). Each eigen-coordinate of ``W − W*`` follows the scalar recurrence, so the
simulator's per-step losses must equal ``½ Σ λ_ij f_ij(t)²`` to rounding error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .quadratic import quadratic_loss_curve

__all__ = ["LinearPipelineProblem", "BridgeResult", "make_problem", "run_bridge", "BRIDGE_METHODS"]

#: analysis method -> (simulator method, extra optimizer options)
BRIDGE_METHODS: dict[str, tuple[str, dict]] = {
    "sgd": ("sgd", {}),
    "pb": ("pb", {}),
    "pb+sc": ("pb+sc", {}),
    "pb+lwp": ("pb+lwp", {}),
    "pb+sc+lwp": ("pb+sc+lwp", {}),
    "pb+nesterov": ("pb", {"nesterov": True}),
    "pb+shrink": ("pb+shrink", {}),
}


@dataclass
class LinearPipelineProblem:
    """Data and weights of the linear pipeline (numpy, float64)."""

    x: np.ndarray  # (N, d) inputs
    fixed: list[np.ndarray]  # (k, k) weights of the fixed stages 1..S-1
    w_star: np.ndarray  # (k, d) optimum of the trained layer
    w_init: np.ndarray  # (k, d) initial trained layer

    @property
    def num_stages(self) -> int:
        return 1 + len(self.fixed)

    @property
    def delay(self) -> int:
        return 2 * (self.num_stages - 1)

    def product(self) -> np.ndarray:
        """``P = A_{S−1} ⋯ A_1`` so that the model output is ``X Wᵀ Pᵀ``."""
        k = self.w_star.shape[0]
        p = np.eye(k)
        for a in self.fixed:
            p = a @ p
        return p

    def eigen(self) -> tuple[np.ndarray, np.ndarray]:
        """Hessian eigenvalues ``λ_ij`` and the eigen-coordinates of ``W_init − W*`` (both shape (k, d))."""
        n, _ = self.x.shape
        k = self.w_star.shape[0]
        p = self.product()
        mu, u = np.linalg.eigh(p.T @ p)
        nu, v = np.linalg.eigh(self.x.T @ self.x)
        lam = 2.0 * np.outer(mu, nu) / (n * k)
        coords = u.T @ (self.w_init - self.w_star) @ v
        return lam, coords


def make_problem(num_stages: int = 4, in_features: int = 4, out_features: int = 2, samples: int = 64, seed: int = 0) -> LinearPipelineProblem:
    """A random well-posed instance (fixed maps scaled to keep ``PᵀP`` of order one)."""
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, in_features))
    fixed = [np.eye(out_features) + 0.3 * rng.standard_normal((out_features, out_features)) / np.sqrt(out_features)
             for _ in range(num_stages - 1)]
    w_star = rng.standard_normal((out_features, in_features))
    w_init = w_star + rng.standard_normal((out_features, in_features))
    return LinearPipelineProblem(x, fixed, w_star, w_init)


def _model(problem: LinearPipelineProblem) -> nn.Sequential:
    k, d = problem.w_star.shape
    first = nn.Linear(d, k, bias=False).double()
    layers: list[nn.Module] = [first]
    with torch.no_grad():
        first.weight.copy_(torch.from_numpy(problem.w_init))
        for a in problem.fixed:
            lin = nn.Linear(k, k, bias=False).double()
            lin.weight.copy_(torch.from_numpy(a))
            lin.requires_grad_(False)
            layers.append(lin)
    return nn.Sequential(*layers)


@dataclass
class BridgeResult:
    """Simulator losses next to the analysis' prediction for one method."""

    method: str
    delay: int
    simulator_loss: np.ndarray
    predicted_loss: np.ndarray
    rate: float  # predicted asymptotic rate of the weights (loss ∝ rate^{2t})
    eigenvalues: np.ndarray


def run_bridge(
    problem: LinearPipelineProblem, method: str, lr: float, momentum: float, steps: int
) -> BridgeResult:
    """Train ``problem`` with :func:`pipeprop.build_simulator` and predict the same losses from the recurrence."""
    from ..api import build_simulator

    if method not in BRIDGE_METHODS:
        raise ValueError(f"bridge supports methods {', '.join(BRIDGE_METHODS)}; got {method!r}")
    sim_method, options = BRIDGE_METHODS[method]
    model = _model(problem)
    sim = build_simulator(model, nn.MSELoss(), method=sim_method, lr=lr, momentum=momentum, partition="layer", **options)
    sim.check_finite = False
    x = torch.from_numpy(problem.x)
    y = torch.from_numpy(problem.x @ problem.w_star.T @ problem.product().T)
    sim_loss = np.array([sim.step(x, y) for _ in range(steps)])
    lam, coords = problem.eigen()
    delay = problem.delay if method != "sgd" else 0
    pred = quadratic_loss_curve(lam.ravel(), lr, momentum, delay, method, steps, w0=coords.ravel())
    return BridgeResult(method, delay, sim_loss, pred.loss, pred.rate, lam.ravel())
