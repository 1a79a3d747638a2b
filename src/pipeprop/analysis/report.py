"""The figures and CSV tables of ``pipeprop analyze`` (matplotlib is imported only here, lazily)."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .quadratic import quadratic_loss_curve, random_psd_spectrum
from .recurrence import get_quadratic_method
from .stability import rate_grid, rate_map_momentum, stability_boundary

__all__ = ["AnalysisConfig", "write_analysis", "ANALYSIS_TASKS", "MAIN_METHODS", "ALL_METHODS"]

MAIN_METHODS = ("pb", "pb+sc", "pb+lwp", "pb+sc+lwp")
ALL_METHODS = ("pb", "pb+sc", "pb+lwp", "pb+sc+lwp", "pb+nesterov", "pb+shrink", "pipemare")
_COLORS = {"sgd": "black", "pb": "tab:red", "pb+sc": "tab:blue", "pb+lwp": "tab:green", "pb+sc+lwp": "tab:purple",
           "pb+nesterov": "tab:orange", "pb+shrink": "tab:brown", "pipemare": "tab:gray"}


@dataclass
class AnalysisConfig:
    """What ``pipeprop analyze`` computes."""

    momentum: float = 0.9
    methods: Sequence[str] = ALL_METHODS
    heatmap_methods: Sequence[str] = MAIN_METHODS
    curve_delays: Sequence[int] = (0, 1, 4, 16, 64)
    heatmap_max_delay: int = 32
    heatmap_delay: int = 8  # delay of the (ηλ, m) heatmaps
    grid: int = 200  # ηλ (and m) grid points of the heatmaps
    boundary_max_delay: int = 256
    quadratic_delay: int = 8
    quadratic_dim: int = 50
    quadratic_steps: int = 1500
    bridge_stages: int = 4
    bridge_steps: int = 200
    seed: int = 0
    lr_lambda_range: tuple[float, float] = (1e-4, 4.0)
    options: dict = field(default_factory=dict)  # passed to coefficients() (sc_delay, lwp_mode, ...)

    def __post_init__(self) -> None:
        for name in list(self.methods) + list(self.heatmap_methods):
            get_quadratic_method(name)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}")
        if self.grid < 2:
            raise ValueError(f"grid must be >= 2, got {self.grid}")
        if min(self.curve_delays, default=0) < 0 or self.heatmap_delay < 0 or self.quadratic_delay < 0:
            raise ValueError("delays must be >= 0")
        if self.heatmap_max_delay < 1:
            raise ValueError(f"the (ηλ, D) heatmap needs a largest delay >= 1, got {self.heatmap_max_delay}")
        lo, hi = self.lr_lambda_range
        if not 0.0 < lo < hi:
            raise ValueError(f"the ηλ range needs 0 < min < max, got {self.lr_lambda_range}")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for row in rows:
            w.writerow([f"{v:.8g}" if isinstance(v, float) else v for v in row])


def _lr_grid(cfg: AnalysisConfig, n: int) -> np.ndarray:
    return np.geomspace(cfg.lr_lambda_range[0], cfg.lr_lambda_range[1], n)


def _grid_shape(n: int) -> tuple[int, int]:
    cols = min(n, 4)
    return (n + cols - 1) // cols, cols


# ------------------------------------------------------------------------------------------------ (a)
def rate_curves(cfg: AnalysisConfig, out: Path) -> list[Path]:
    """Rate vs ηλ for several delays, one panel per method."""
    plt = _plt()
    h = _lr_grid(cfg, 240)
    rows_n, cols = _grid_shape(len(cfg.methods))
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3.2 * rows_n), sharey=True, squeeze=False)
    rows = []
    cmap = plt.get_cmap("viridis")
    for ax, method in zip(axes.flat, cfg.methods):
        r = rate_grid(method, cfg.momentum, cfg.curve_delays, h, **cfg.options)
        for i, d in enumerate(cfg.curve_delays):
            ax.semilogx(h, np.minimum(r[i], 1.1), color=cmap(i / max(1, len(cfg.curve_delays) - 1)), label=f"D={d}")
            rows.extend((method, d, float(x), float(y)) for x, y in zip(h, r[i]))
        ax.axhline(1.0, color="k", lw=0.6, ls=":")
        ax.set_title(method)
        ax.set_xlabel("ηλ")
        ax.set_ylim(0.85, 1.1)
    for ax in axes.flat[len(cfg.methods):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("rate = spectral radius")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"Asymptotic rate of delayed SGDM on ½λw² (m={cfg.momentum}); >1 diverges (clipped at 1.1)")
    fig.tight_layout()
    png, csv_path = out / "rate_vs_lr.png", out / "rate_vs_lr.csv"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    _write_csv(csv_path, ("method", "delay", "lr_lambda", "rate"), rows)
    return [png, csv_path]


# ------------------------------------------------------------------------------------------------ (b)
def _heatmap_panel(ax, x_edges, y_edges, rate, title, xlabel, ylabel, plt):
    masked = np.ma.masked_where(rate >= 1.0, rate)
    cmap = plt.get_cmap("magma_r").with_extremes(bad="lightgray")
    mesh = ax.pcolormesh(x_edges, y_edges, masked, cmap=cmap, vmin=0.8, vmax=1.0, shading="flat")
    ax.set_xscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return mesh


def _edges_log(x: np.ndarray) -> np.ndarray:
    lx = np.log(x)
    mid = 0.5 * (lx[1:] + lx[:-1])
    return np.exp(np.concatenate([[2 * lx[0] - mid[0]], mid, [2 * lx[-1] - mid[-1]]]))


def _edges_lin(x: np.ndarray) -> np.ndarray:
    mid = 0.5 * (x[1:] + x[:-1])
    return np.concatenate([[2 * x[0] - mid[0]], mid, [2 * x[-1] - mid[-1]]])


def heatmaps(cfg: AnalysisConfig, out: Path) -> list[Path]:
    """Rate over (ηλ, D) at the configured momentum, and over (ηλ, m) at one delay, per method."""
    plt = _plt()
    h = _lr_grid(cfg, cfg.grid)
    delays = np.arange(cfg.heatmap_max_delay + 1)
    momenta = np.linspace(0.0, 0.99, cfg.grid)
    n = len(cfg.heatmap_methods)
    fig_d, ax_d = plt.subplots(1, n, figsize=(4 * n, 3.6), squeeze=False)
    fig_m, ax_m = plt.subplots(1, n, figsize=(4 * n, 3.6), squeeze=False)
    rows_d, rows_m = [], []
    for i, method in enumerate(cfg.heatmap_methods):
        r = rate_grid(method, cfg.momentum, delays, h, **cfg.options)
        mesh = _heatmap_panel(ax_d[0, i], _edges_log(h), _edges_lin(delays.astype(float)), r, method, "ηλ", "delay D", plt)
        bound = stability_boundary(method, cfg.momentum, delays, **cfg.options)
        ax_d[0, i].plot(bound, delays, color="cyan", lw=1.0, label="boundary")
        ax_d[0, i].set_xlim(h[0], h[-1])
        rows_d.extend((method, int(d), float(x), float(y)) for d, rr in zip(delays, r) for x, y in zip(h, rr))
        rm = rate_map_momentum(method, momenta, cfg.heatmap_delay, h, **cfg.options)
        mesh_m = _heatmap_panel(ax_m[0, i], _edges_log(h), _edges_lin(momenta), rm, method, "ηλ", "momentum m", plt)
        rows_m.extend((method, float(mm), float(x), float(y)) for mm, rr in zip(momenta, rm) for x, y in zip(h, rr))
    fig_d.colorbar(mesh, ax=ax_d[0, -1], label="rate (gray: ≥ 1, unstable)")
    fig_m.colorbar(mesh_m, ax=ax_m[0, -1], label="rate (gray: ≥ 1, unstable)")
    fig_d.suptitle(f"Rate over (ηλ, D), m={cfg.momentum}; cyan: largest stable ηλ")
    fig_m.suptitle(f"Rate over (ηλ, m), D={cfg.heatmap_delay}")
    paths = []
    for fig, name in ((fig_d, "heatmap_lr_delay.png"), (fig_m, "heatmap_lr_momentum.png")):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)
    _write_csv(out / "heatmap_lr_delay.csv", ("method", "delay", "lr_lambda", "rate"), rows_d)
    _write_csv(out / "heatmap_lr_momentum.csv", ("method", "momentum", "lr_lambda", "rate"), rows_m)
    return paths + [out / "heatmap_lr_delay.csv", out / "heatmap_lr_momentum.csv"]


# ------------------------------------------------------------------------------------------------ (c)
def boundaries(cfg: AnalysisConfig, out: Path) -> list[Path]:
    """Largest stable ηλ vs delay per method (and its ratio to no mitigation)."""
    plt = _plt()
    delays = np.unique(np.concatenate([np.arange(17), np.geomspace(16, cfg.boundary_max_delay, 40).round()]).astype(int))
    bounds = {m: stability_boundary(m, cfg.momentum, delays, **cfg.options) for m in cfg.methods}
    fig, (ax, ax_r) = plt.subplots(1, 2, figsize=(10, 3.8))
    base = bounds.get("pb", stability_boundary("pb", cfg.momentum, delays, **cfg.options))
    for m, b in bounds.items():
        ax.loglog(delays[1:], b[1:], color=_COLORS.get(m), label=m)
        ax_r.semilogx(delays[1:], b[1:] / base[1:], color=_COLORS.get(m), label=m)
    ax.set_xlabel("delay D")
    ax.set_ylabel("largest stable ηλ")
    ax.legend(fontsize=7)
    ax.set_title(f"Stability boundary (m={cfg.momentum})")
    ax_r.axhline(1.0, color="k", lw=0.6, ls=":")
    ax_r.set_xlabel("delay D")
    ax_r.set_ylabel("ratio to pb (no mitigation)")
    ax_r.set_yscale("log")
    ax_r.set_title("> 1: larger stable range than pb")
    fig.tight_layout()
    fig.savefig(out / "max_stable_lr.png", dpi=110)
    plt.close(fig)
    _write_csv(out / "max_stable_lr.csv", ("delay", *bounds), ((int(d), *(float(b[i]) for b in bounds.values())) for i, d in enumerate(delays)))
    return [out / "max_stable_lr.png", out / "max_stable_lr.csv"]


# ------------------------------------------------------------------------------------------------ (d)
def quadratic(cfg: AnalysisConfig, out: Path) -> list[Path]:
    """Loss vs steps on a random-PSD-spectrum quadratic, every method at the same (η, m, D)."""
    plt = _plt()
    lam = random_psd_spectrum(cfg.quadratic_dim, 2 * cfg.quadratic_dim, seed=cfg.seed)
    D = cfg.quadratic_delay
    # η at 1.2× the no-mitigation boundary for the top eigenvalue: pb diverges, mitigations may not
    lr_div = 1.2 * float(stability_boundary("pb", cfg.momentum, D, **cfg.options)) / lam.max()
    lr_ok = 0.5 * float(stability_boundary("pb", cfg.momentum, D, **cfg.options)) / lam.max()
    w0 = np.random.default_rng(cfg.seed).standard_normal(lam.shape)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    rows = []
    for ax, lr, tag in ((axes[0], lr_ok, "0.5×"), (axes[1], lr_div, "1.2×")):
        ref = quadratic_loss_curve(lam, lr, cfg.momentum, 0, "sgd", cfg.quadratic_steps, w0)
        ax.semilogy(ref.live_loss, color="k", ls="--", lw=1, label=f"sgd, D=0 (rate {ref.rate:.4f})")
        for m in cfg.methods:
            run = quadratic_loss_curve(lam, lr, cfg.momentum, D, m, cfg.quadratic_steps, w0, **cfg.options)
            loss = np.clip(np.nan_to_num(run.live_loss, nan=1e30, posinf=1e30), 1e-30, 1e30)
            ax.semilogy(loss, color=_COLORS.get(m), label=f"{m} (rate {run.rate:.4f})")
            rows.extend((tag, float(lr), m, t, float(v)) for t, v in enumerate(run.live_loss))
        rows.extend((tag, float(lr), "sgd(D=0)", t, float(v)) for t, v in enumerate(ref.live_loss))
        ax.set_ylim(1e-12, 1e6)
        ax.set_xlabel("step")
        ax.set_title(f"η = {tag} pb's largest stable η (ηλ_max = {lr * lam.max():.4g})")
        ax.legend(fontsize=6.5)
    axes[0].set_ylabel("loss ½ Σ λ_i w_i²")
    fig.suptitle(f"{cfg.quadratic_dim}-dim quadratic, random PSD spectrum (κ = {lam.max() / lam.min():.1f}), D={D}, m={cfg.momentum}")
    fig.tight_layout()
    fig.savefig(out / "quadratic_loss.png", dpi=110)
    plt.close(fig)
    _write_csv(out / "quadratic_loss.csv", ("lr_setting", "lr", "method", "step", "loss"), rows)
    _write_csv(out / "quadratic_spectrum.csv", ("eigenvalue",), ((float(x),) for x in lam))
    return [out / "quadratic_loss.png", out / "quadratic_loss.csv", out / "quadratic_spectrum.csv"]


# ------------------------------------------------------------------------------------------------ bridge
def bridge(cfg: AnalysisConfig, out: Path) -> list[Path]:
    """The real simulator on a linear pipeline next to the recurrence's prediction."""
    from .bridge import BRIDGE_METHODS, make_problem, run_bridge

    plt = _plt()
    problem = make_problem(num_stages=cfg.bridge_stages, seed=cfg.seed)
    lam, _ = problem.eigen()
    D = problem.delay
    lr = 1.15 * float(stability_boundary("pb", cfg.momentum, D)) / lam.max()  # pb diverges here
    methods = [m for m in ("sgd", *cfg.methods) if m in BRIDGE_METHODS and m in ("sgd", *MAIN_METHODS)]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    rows = []
    worst = 0.0
    for m in methods:
        res = run_bridge(problem, m, lr, cfg.momentum, cfg.bridge_steps)
        t = np.arange(len(res.simulator_loss))
        ax.semilogy(t[::6], res.simulator_loss[::6], "o", ms=3, color=_COLORS.get(m), alpha=0.7)
        ax.semilogy(t, res.predicted_loss, "-", lw=1, color=_COLORS.get(m), label=f"{m} (D={res.delay}, rate {res.rate:.4f})")
        rel = np.abs(res.simulator_loss - res.predicted_loss) / np.maximum(np.abs(res.predicted_loss), 1e-300)
        worst = max(worst, float(rel.max()))
        rows.extend((m, res.delay, int(i), float(a), float(b)) for i, a, b in zip(t, res.simulator_loss, res.predicted_loss))
    ax.set_xlabel("step (micro-batch)")
    ax.set_ylabel("MSE loss")
    ax.set_title(
        f"Simulator (dots) vs analysis (lines): linear {problem.num_stages}-stage pipeline, "
        f"η={lr:.3g}, m={cfg.momentum}\nmax relative difference {worst:.1e}",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "bridge.png", dpi=110)
    plt.close(fig)
    _write_csv(out / "bridge.csv", ("method", "delay", "step", "simulator_loss", "predicted_loss"), rows)
    return [out / "bridge.png", out / "bridge.csv"]


ANALYSIS_TASKS: dict[str, Callable[[AnalysisConfig, Path], list[Path]]] = {
    "rates": rate_curves,
    "heatmaps": heatmaps,
    "boundary": boundaries,
    "quadratic": quadratic,
    "bridge": bridge,
}


def write_analysis(out: Path | str, cfg: AnalysisConfig | None = None, tasks: Sequence[str] | None = None,
                   progress: bool = True) -> list[Path]:
    """Write the selected figures and CSVs into ``out``; returns the files written."""
    cfg = cfg or AnalysisConfig()
    tasks = list(ANALYSIS_TASKS) if tasks is None else list(tasks)
    unknown = [t for t in tasks if t not in ANALYSIS_TASKS]
    if unknown:
        raise ValueError(f"unknown analysis part(s) {unknown}; choose from {', '.join(ANALYSIS_TASKS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    from tqdm.auto import tqdm

    bar = tqdm(tasks, desc="analyze", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        written.extend(ANALYSIS_TASKS[name](cfg, out))
    return written
