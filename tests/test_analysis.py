"""Tests of pipeprop.analysis against references written here: literal optimizer loops, np.roots of the
paper's characteristic polynomials, the heavy-ball closed form, and torch's Hessian of the bridge model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeprop.analysis import (
    characteristic_polynomial,
    coefficients,
    companion_matrices,
    quadratic_loss_curve,
    random_psd_spectrum,
    rate_grid,
    rate_map_momentum,
    spectral_radius,
    stability_boundary,
)
from pipeprop.analysis.bridge import make_problem, run_bridge

METHODS = ("pb", "pb+sc", "pb+lwp", "pb+sc+lwp", "pb+nesterov")


# ----------------------------------------------------------------------------------------- references
def paper_polynomial(method: str, h: float, m: float, D: int) -> np.ndarray:
    """PAPER.md §6 polynomials (and Nesterov, derived by hand), built with numpy polynomial algebra."""
    zD = np.zeros(D + 1)
    zD[0] = 1.0  # z^D
    zm1, zmm, z = np.array([1.0, -1.0]), np.array([1.0, -m]), np.array([1.0, 0.0])
    a, b = m**D, (1 - m**D) / (1 - m)
    T = float(D)
    base = np.polymul(np.polymul(zm1, zmm), zD)  # (z-1)(z-m) z^D
    if method == "pb":
        return np.polyadd(base, h * z)
    if method == "pb+sc":
        return np.polyadd(base, h * np.polyadd(a * z, b * zmm))
    if method == "pb+lwp":
        return np.polyadd(np.polymul(zm1, np.polyadd(np.polymul(zD, zmm), [h * T])), h * z)
    if method == "pb+sc+lwp":
        return np.polyadd(np.polymul(zm1, np.polyadd(np.polymul(zD, zmm), [h * T])), h * np.polyadd(a * z, b * zmm))
    if method == "pb+nesterov":
        return np.polyadd(base, h * np.array([1 + m, -m]))
    raise ValueError(method)


def roots_radius(method: str, h: float, m: float, D: int) -> float:
    return float(np.abs(np.roots(paper_polynomial(method, h, m, D))).max())


def literal_run(method: str, lam: np.ndarray, lr: float, m: float, D: int, steps: int, w0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The optimizer written out step by step: forward weights of version t-D, heavy ball / SC / Nesterov, LWP.

    Returns live weights w_0..w_steps and the forward weights used at each step (vectorized over lam)."""
    sc, lwp, nest = "sc" in method, "lwp" in method, "nesterov" in method
    a, b = (m**D, (1 - m**D) / (1 - m)) if sc else (1.0, 0.0)
    shrink = 0.98**D if method == "pb+shrink" else 1.0  # GradientShrinkSGD's default power rule
    w = np.array(w0, dtype=float) * np.ones_like(lam)
    v = np.zeros_like(w)
    versions = [w.copy()]  # forward weights of versions 0, 1, ...
    ws, fs = [w.copy()], []
    for t in range(steps):
        f = versions[max(0, t - D)]
        fs.append(f)
        g = shrink * lam * f
        v = m * v + g
        if nest:
            w = w - lr * (g + m * v)
        else:
            w = w - lr * (a * v + b * g)
        versions.append(w - lr * D * v if lwp else w.copy())
        ws.append(w.copy())
    return np.array(ws), np.array(fs)


# ----------------------------------------------------------------------------------------- polynomials
@pytest.mark.parametrize("method", METHODS)
def test_companion_matrix_has_the_paper_polynomial(method: str) -> None:
    rng = np.random.default_rng(1)
    for _ in range(6):
        h, m, D = rng.uniform(0.01, 1.0), rng.uniform(0.0, 0.98), int(rng.integers(0, 9))
        coef = coefficients(method, m, D)
        A = companion_matrices(h, coef, m)
        assert A.shape == (D + 2, D + 2)
        want = paper_polynomial(method, h, m, D)
        want = np.concatenate([np.zeros(D + 3 - len(want)), want])
        np.testing.assert_allclose(np.poly(A), want, atol=1e-9)
        np.testing.assert_allclose(characteristic_polynomial(h, coef, m), want, atol=1e-12)


def test_sc_equals_momentum_decay_lwp_on_a_quadratic() -> None:
    # derived: a+b = 1 + m(1-m^D)/(1-m) and b m = m(1-m^D)/(1-m), so both polynomials coincide
    for D in (1, 3, 10):
        sc = characteristic_polynomial(0.05, coefficients("pb+sc", 0.9, D), 0.9)
        lwp = characteristic_polynomial(0.05, coefficients("pb+lwp", 0.9, D, lwp_mode="momentum-decay"), 0.9)
        np.testing.assert_allclose(sc, lwp, atol=1e-12)


# ----------------------------------------------------------------------------------------- rates
def test_spectral_radius_equals_rate_of_direct_iteration() -> None:
    rng = np.random.default_rng(7)
    checked: dict[str, int] = {m: 0 for m in METHODS}
    tries = 0
    while min(checked.values()) < 2:
        tries += 1
        assert tries < 500, "could not draw well-separated test cases"
        method = METHODS[tries % len(METHODS)]
        if checked[method] >= 2:
            continue
        h, m, D = float(np.exp(rng.uniform(np.log(2e-3), np.log(0.5)))), float(rng.uniform(0.5, 0.95)), int(rng.integers(0, 10))
        roots = np.roots(paper_polynomial(method, h, m, D))
        mod = np.abs(roots)
        top = roots[np.argmax(mod)]
        others = mod[np.abs(roots - top) > 1e-6]
        others = others[np.abs(roots[np.abs(roots - top) > 1e-6] - np.conj(top)) > 1e-6]
        r = mod.max()
        angle = abs(np.angle(top))
        if not 0.95 < r < 1.01 or (others.size and r - others.max() < 0.01) or 0 < angle < 2 * np.pi / 200:
            continue
        lr = 0.37
        w, _ = literal_run(method, np.array([h / lr]), lr, m, D, 3000, np.array([1.0]))
        w = w[:, 0]
        e1, e2 = np.sum(w[1500:2000] ** 2), np.sum(w[2500:3000] ** 2)
        measured = (e2 / e1) ** (1.0 / (2 * 1000))
        got = float(spectral_radius(h, method, m, D))
        assert got == pytest.approx(r, abs=1e-9)
        assert measured == pytest.approx(got, abs=1e-3), (method, h, m, D)
        checked[method] += 1


def test_delay_zero_is_heavy_ball_with_the_classical_optimum() -> None:
    mu, L = 0.04, 1.0
    kappa = L / mu
    lr = 4.0 / (np.sqrt(L) + np.sqrt(mu)) ** 2
    m = ((np.sqrt(kappa) - 1) / (np.sqrt(kappa) + 1)) ** 2
    optimum = (np.sqrt(kappa) - 1) / (np.sqrt(kappa) + 1)
    lam = np.array([mu, L])
    for method in ("sgd", "pb", "pb+sc", "pb+lwp", "pb+sc+lwp"):
        assert float(spectral_radius(lr * lam, method, m, 0).max()) == pytest.approx(optimum, abs=1e-6)
    # no (lr, m) on a grid around it does better
    lrs = lr * np.linspace(0.8, 1.2, 21)
    ms = np.clip(m + np.linspace(-0.1, 0.1, 21), 0, 0.999)
    worst = np.maximum(rate_map_momentum("pb", ms, 0, lrs * mu), rate_map_momentum("pb", ms, 0, lrs * L))
    assert worst.min() >= optimum - 1e-6
    # and D=0 heavy ball has the closed-form roots of z^2 - (1+m-h) z + m
    h = 0.3
    want = np.abs(np.roots([1.0, -(1 + 0.5 - h), 0.5])).max()
    assert float(spectral_radius(h, "pb", 0.5, 0)) == pytest.approx(want, abs=1e-12)


def test_grids_agree_with_pointwise_rates() -> None:
    h = np.geomspace(1e-3, 1.0, 7)
    grid = rate_grid("pb+sc", 0.9, [0, 3, 5], h)
    assert grid.shape == (3, 7)
    for i, D in enumerate((0, 3, 5)):
        for j, hh in enumerate(h):
            assert grid[i, j] == pytest.approx(roots_radius("pb+sc", hh, 0.9, D), abs=1e-7)
    ms = np.array([0.0, 0.5, 0.9])
    mm = rate_map_momentum("pb+lwp", ms, 4, h)
    assert mm.shape == (3, 7)
    assert mm[1, 3] == pytest.approx(roots_radius("pb+lwp", h[3], 0.5, 4), abs=1e-7)


# ----------------------------------------------------------------------------------------- stability
def bisect_boundary(method: str, m: float, D: int) -> float:
    """First ηλ where np.roots of the paper polynomial leaves the unit disc (scan, then bisection)."""
    hs = np.geomspace(1e-4, 10.0, 250)
    stable = np.array([roots_radius(method, h, m, D) < 1.0 for h in hs])
    first = int(np.argmin(stable))
    assert first > 0 and not stable[first]
    lo, hi = hs[first - 1], hs[first]
    for _ in range(36):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if roots_radius(method, mid, m, D) < 1.0 else (lo, mid)
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("method", ("pb", "pb+sc", "pb+lwp", "pb+sc+lwp", "pb+nesterov"))
def test_stability_boundary_matches_root_bisection(method: str) -> None:
    delays = [0, 1, 2, 5, 18]
    got = stability_boundary(method, 0.9, delays)
    for D, g in zip(delays, got):
        assert g == pytest.approx(bisect_boundary(method, 0.9, D), rel=1e-6), D


def test_scaled_methods_rescale_the_boundary() -> None:
    pb = stability_boundary("pb", 0.9, [0, 4, 16])
    np.testing.assert_allclose(stability_boundary("pb+shrink", 0.9, [0, 4, 16]), pb / 0.98 ** np.array([0, 4, 16]), rtol=1e-9)
    np.testing.assert_allclose(stability_boundary("pipemare", 0.9, [0, 4, 16]), pb * np.array([1, 4, 16]), rtol=1e-9)


def test_sc_and_lwp_enlarge_the_stable_range_what_holds_at_m09() -> None:
    """The paper's claim, checked: at m = 0.9 and D >= 2, SC always enlarges the stable ηλ range; LWP
    (linear, T = D) only for D <= 17 and SC+LWP only for D <= 9 — beyond that they *shrink* it."""
    delays = np.arange(2, 65)
    pb = stability_boundary("pb", 0.9, delays)
    sc = stability_boundary("pb+sc", 0.9, delays)
    lwp = stability_boundary("pb+lwp", 0.9, delays)
    both = stability_boundary("pb+sc+lwp", 0.9, delays)
    assert np.all(sc > pb)
    assert np.all(lwp[delays <= 17] > pb[delays <= 17]) and np.all(lwp[delays >= 18] < pb[delays >= 18])
    assert np.all(both[delays <= 9] > pb[delays <= 9]) and np.all(both[delays >= 10] < pb[delays >= 10])
    # the flips, independently: np.roots just below pb's boundary
    for method, D, stable in (("pb+lwp", 17, True), ("pb+lwp", 18, False), ("pb+sc+lwp", 9, True), ("pb+sc+lwp", 10, False)):
        h = 0.999 * bisect_boundary("pb", 0.9, D)
        assert (roots_radius(method, h, 0.9, D) < 1.0) == stable, (method, D)


# ----------------------------------------------------------------------------------------- quadratic
def test_quadratic_loss_curve_matches_literal_loop() -> None:
    lam = random_psd_spectrum(8, 20, seed=3)
    assert lam.min() > 0 and lam.max() == pytest.approx(1.0)
    w0 = np.linspace(-1, 1, 8)
    for method in ("pb", "pb+sc+lwp", "pb+nesterov"):
        run = quadratic_loss_curve(lam, 0.01, 0.9, 5, method, 200, w0)
        ws, fs = literal_run(method, lam, 0.01, 0.9, 5, 200, w0)
        np.testing.assert_allclose(run.live_loss, 0.5 * (ws**2 * lam).sum(1), rtol=1e-10)
        np.testing.assert_allclose(run.loss, 0.5 * (fs**2 * lam).sum(1), rtol=1e-10)


# ----------------------------------------------------------------------------------------- bridge
@pytest.mark.parametrize("method", ("pb", "pb+sc", "pb+lwp", "pb+sc+lwp", "pb+nesterov", "pb+shrink"))
def test_simulator_bridge_matches_the_recurrence(method: str) -> None:
    problem = make_problem(num_stages=3, seed=2)  # float64 model; the trained first layer has delay 4
    res = run_bridge(problem, method, lr=0.02, momentum=0.9, steps=80)
    assert res.delay == 4
    # independent prediction: torch's Hessian of the MSE loss in W, eigen-coordinates, literal optimizer loop
    x = torch.from_numpy(problem.x)
    p = torch.from_numpy(problem.product())
    w_star = torch.from_numpy(problem.w_star)
    y = x @ w_star.T @ p.T

    def loss(wflat: torch.Tensor) -> torch.Tensor:
        return torch.mean((x @ wflat.reshape(w_star.shape).T @ p.T - y) ** 2)

    H = torch.autograd.functional.hessian(loss, w_star.reshape(-1)).numpy()
    lam, vecs = np.linalg.eigh(H)
    c0 = vecs.T @ (problem.w_init - problem.w_star).reshape(-1)
    _, fs = literal_run(method, lam, 0.02, 0.9, 4, 80, c0)
    want = 0.5 * (fs**2 * lam).sum(1)
    np.testing.assert_allclose(res.simulator_loss, want, rtol=1e-9)
    np.testing.assert_allclose(res.predicted_loss, want, rtol=1e-9)


# ----------------------------------------------------------------------------------------- CLI
def test_cli_writes_figures_and_csvs(tmp_path) -> None:
    from click.testing import CliRunner

    from pipeprop.cli import main

    out = tmp_path / "an"
    result = CliRunner().invoke(main, [
        "analyze", "--out", str(out), "--grid", "12", "--max-delay", "3", "--delays", "0,2",
        "--methods", "pb,pb+sc", "--heatmap-methods", "pb+lwp", "--parts", "rates,heatmaps,boundary,quadratic",
        "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    for name in ("rate_vs_lr", "heatmap_lr_delay", "heatmap_lr_momentum", "max_stable_lr", "quadratic_loss"):
        assert (out / f"{name}.png").stat().st_size > 1000
        assert (out / f"{name}.csv").exists()
    header = (out / "max_stable_lr.csv").read_text().splitlines()[0]
    assert header == "delay,pb,pb+sc"
    bad = CliRunner().invoke(main, ["analyze", "--out", str(out), "--methods", "pb,bogus"])
    assert bad.exit_code != 0 and "choose one of" in bad.output
