"""Stability map: the largest reference learning rate at which each method trains without diverging.

For one config and a list of methods, :func:`stability_search` runs each method for a fixed sample budget
at reference learning rates taken from an ascending (usually geometric) grid, scaled from the reference
batch to ``b`` by the config's rule, with a constant schedule. A run **diverges** when a loss is NaN/inf or
the running mean training loss since the last evaluation exceeds ``threshold`` (the runner's
``divergence_loss``). Divergence is assumed monotone in the learning rate, so the grid is searched by
bisection (``⌈log₂(n+1)⌉`` runs per method and seed instead of ``n``); a learning rate counts as stable
only when every seed is stable. Every run goes through :func:`~pipeprop.experiments.compare.run_sweep`, so
finished runs are reused and interrupted ones resumed.

:func:`predicted_ratios` gives what the quadratic analysis (:func:`pipeprop.analysis.stability_boundary`,
as ``pipeprop analyze``) predicts for the same momentum and delay: the largest stable learning rate of a
method relative to undelayed SGD, for one curvature.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .checkpoint import atomic_write_text
from .compare import run_sweep
from .config import ExperimentConfig, method_entry

__all__ = ["StabilityPoint", "StabilityResult", "stability_search", "predicted_ratios", "quadratic_name",
           "write_stability_report", "DEFAULT_THRESHOLD"]

#: running training loss that counts as divergence (≈ 4.3 × the chance-level loss ln 10 of 10 classes)
DEFAULT_THRESHOLD = 10.0


@dataclass
class StabilityPoint:
    """One run of the search."""

    method: str
    lr: float  # reference learning rate (at the reference batch size)
    seed: int
    status: str  # "completed" | "diverged" | ...
    lr_scaled: float  # learning rate at the run's micro-batch
    momentum_scaled: float
    final_train_loss: Optional[float]
    final_test_acc: Optional[float]
    diverged_at: Optional[int]
    samples: int
    wall_seconds: float

    @property
    def stable(self) -> bool:
        return self.status == "completed"


@dataclass
class StabilityResult:
    """Per method: the largest stable grid learning rate and the smallest divergent one (``None``: not found)."""

    method: str
    max_stable_lr: Optional[float]
    min_diverged_lr: Optional[float]
    max_delay: int
    momentum_scaled: float
    points: list[StabilityPoint] = field(default_factory=list)

    def bracket(self) -> str:
        lo = "<" if self.max_stable_lr is None else f"{self.max_stable_lr:g}"
        hi = ">" if self.min_diverged_lr is None else f"{self.min_diverged_lr:g}"
        if self.max_stable_lr is None:
            return f"< {self.min_diverged_lr:g}"
        if self.min_diverged_lr is None:
            return f">= {self.max_stable_lr:g}"
        return f"[{lo}, {hi})"


def _point(method: str, lr: float, seed: int, summary: dict[str, Any]) -> StabilityPoint:
    return StabilityPoint(
        method=method, lr=lr, seed=seed, status=summary["status"], lr_scaled=summary.get("lr"),
        momentum_scaled=summary.get("momentum"), final_train_loss=summary.get("final_train_loss"),
        final_test_acc=summary.get("final_test_acc"), diverged_at=summary.get("diverged_at"),
        samples=summary.get("samples", 0), wall_seconds=summary.get("wall_seconds", 0.0),
    )


def stability_search(
    config: ExperimentConfig,
    out_dir: Path | str,
    *,
    methods: Sequence[str],
    lrs: Sequence[float],
    seeds: Sequence[int] = (0,),
    samples: int,
    threshold: float = DEFAULT_THRESHOLD,
    show_progress: Optional[bool] = None,
    echo: Callable[[str], None] = lambda s: None,
    model_factory: Optional[Callable[..., Any]] = None,
) -> list[StabilityResult]:
    """Bisect the ascending grid ``lrs`` for each method; runs go to ``out_dir/lr<lr>/<method>/seed<k>``."""
    lrs = [float(v) for v in lrs]
    if not lrs or any(v <= 0 for v in lrs) or lrs != sorted(set(lrs)):
        raise ValueError(f"lrs must be positive, strictly increasing reference learning rates, got {lrs}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not threshold > 0:
        raise ValueError(f"threshold must be a positive loss, got {threshold}")
    base = config.replace(samples=samples, schedule="constant", milestones=[], warmup_epochs=0.0,
                          divergence_loss=threshold)
    out_dir = Path(out_dir)
    results = []
    for entry in methods:
        label, _ = method_entry(base, entry)
        points: list[StabilityPoint] = []

        def stable_at(i: int) -> bool:
            ok = True
            for seed in seeds:
                cfg = base.replace(lr=lrs[i])
                summaries, _ = run_sweep(cfg, out_dir / f"lr{lrs[i]:g}", methods=[entry], seeds=[seed],
                                         show_progress=show_progress, echo=echo, model_factory=model_factory)
                summary = summaries[0]
                if summary["status"] == "interrupted":
                    raise KeyboardInterrupt
                points.append(_point(label, lrs[i], seed, summary))
                echo(f"{label} lr {lrs[i]:g} seed {seed}: {summary['status']}")
                if summary["status"] != "completed":
                    ok = False
                    break  # one divergent seed decides
            return ok

        lo, hi = -1, len(lrs)  # invariant: lrs[lo] stable (or lo = -1), lrs[hi] diverged (or hi = n)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if stable_at(mid):
                lo = mid
            else:
                hi = mid
        first = points[0] if points else None
        results.append(StabilityResult(
            method=label,
            max_stable_lr=lrs[lo] if lo >= 0 else None,
            min_diverged_lr=lrs[hi] if hi < len(lrs) else None,
            max_delay=_max_delay(out_dir, lrs, label, seeds),
            momentum_scaled=first.momentum_scaled if first else float("nan"),
            points=sorted(points, key=lambda p: (p.lr, p.seed)),
        ))
    return results


def _max_delay(out_dir: Path, lrs: Sequence[float], label: str, seeds: Sequence[int]) -> int:
    for lr in lrs:
        for seed in seeds:
            path = out_dir / f"lr{lr:g}" / label.replace("@", "_b") / f"seed{seed}" / "summary.json"
            if path.is_file():
                return int(json.loads(path.read_text()).get("max_delay", 0))
    return 0


def quadratic_name(method: str) -> Optional[str]:
    """The method of the quadratic analysis that models ``method`` (``None``: no model, e.g. Adaptive Braking)."""
    from ..analysis.recurrence import get_quadratic_method
    from ..methods import get_method

    name, _, _ = method.partition("@")
    spec = get_method(name)
    if not spec.pipelined:
        return "pb"  # at delay 0
    try:
        return get_quadratic_method(spec.name).name
    except ValueError:
        return None


def predicted_ratios(methods: Sequence[str], momentum: float, max_delay: int, **options: Any) -> dict[str, Optional[float]]:
    """Quadratic-model largest stable ``ηλ`` at ``max_delay`` relative to undelayed heavy ball, per method.

    Non-pipelined methods (``sgd``) get 1; methods without a quadratic model get ``None``. ``options``
    (e.g. ``lwp_mode``) go to :func:`pipeprop.analysis.stability_boundary`.
    """
    from ..analysis import stability_boundary
    from ..methods import get_method

    reference = float(stability_boundary("pb", momentum, 0))
    out: dict[str, Optional[float]] = {}
    for method in methods:
        q = quadratic_name(method)
        if q is None:
            out[method] = None
            continue
        delay = max_delay if get_method(method.partition("@")[0]).pipelined else 0
        out[method] = float(stability_boundary(q, momentum, delay, **options)) / reference
    return out


def write_stability_report(results: Sequence[StabilityResult], out_dir: Path | str, *, title: str,
                           samples: int, threshold: float, lwp_mode: str = "linear") -> dict[str, Path]:
    """``stability.json`` (every run), ``stability.csv`` and ``stability.md`` (table), ``stability.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reference = next((r for r in results if r.method == "sgd"), None)  # sgd at the config's micro-batch
    pipelined = [r for r in results if r.max_delay > 0]
    delay = max((r.max_delay for r in pipelined), default=0)
    momentum = results[0].momentum_scaled if results else float("nan")
    predicted = predicted_ratios([r.method for r in results], momentum, delay, lwp_mode=lwp_mode) if results else {}
    pb = next((r for r in results if r.method == "pb"), None)
    rows = []
    for r in results:
        rows.append({
            "method": r.method,
            "max_stable_lr": r.max_stable_lr,
            "min_diverged_lr": r.min_diverged_lr,
            "ratio_to_sgd": _ratio(r, reference),
            "predicted_ratio_to_sgd": predicted.get(r.method),
            "ratio_to_pb": _ratio(r, pb),
            "predicted_ratio_to_pb": _ratio_of(predicted.get(r.method), predicted.get("pb")),
            "max_delay": r.max_delay,
            "momentum_b": r.momentum_scaled,
            "train_loss_at_max_stable": next((p.final_train_loss for p in r.points if p.lr == r.max_stable_lr), None),
            "runs": len(r.points),
        })
    data = {"title": title, "samples": samples, "threshold": threshold, "max_delay": delay, "momentum_b": momentum,
            "rows": rows, "points": [asdict(p) for r in results for p in r.points]}
    paths = {"json": out_dir / "stability.json", "csv": out_dir / "stability.csv", "table": out_dir / "stability.md",
             "plot": out_dir / "stability.png"}
    atomic_write_text(paths["json"], json.dumps(data, indent=2) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["method"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(paths["csv"], buf.getvalue())
    fmt = lambda v, f="{:g}": "—" if v is None else f.format(v)  # noqa: E731
    lines = [
        f"{title}: {samples} samples per run, constant lr, diverged = NaN/inf or running train loss > {threshold:g}; "
        f"b=1 momentum {momentum:.5f}, max delay {delay}",
        "",
        "| method | largest stable ref. lr | smallest diverged ref. lr | ÷ sgd (b=1) | quadratic ÷ sgd | ÷ pb | quadratic ÷ pb | final train loss there | runs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    censored = {row["method"] for row in rows if row["min_diverged_lr"] is None}  # stable up to the grid's top
    for row in rows:
        top = "≥ " if row["method"] in censored else ""
        lines.append(f"| {row['method']} | {top}{fmt(row['max_stable_lr'])} | {fmt(row['min_diverged_lr'])} | "
                     f"{_bounded(row, 'sgd', censored, 'ratio_to_sgd')} | {fmt(row['predicted_ratio_to_sgd'], '{:.2g}')} | "
                     f"{_bounded(row, 'pb', censored, 'ratio_to_pb')} | {fmt(row['predicted_ratio_to_pb'], '{:.2f}')} | "
                     f"{fmt(row['train_loss_at_max_stable'], '{:.3f}')} | {row['runs']} |")
    atomic_write_text(paths["table"], "\n".join(lines) + "\n")
    _plot(results, rows, paths["plot"], title)
    return paths


def _ratio(r: StabilityResult, reference: Optional[StabilityResult]) -> Optional[float]:
    """Measured largest stable lr of ``r`` over that of ``reference`` (``None`` when either is unknown)."""
    if reference is None or not reference.max_stable_lr or not r.max_stable_lr:
        return None
    return r.max_stable_lr / reference.max_stable_lr


def _bounded(row: dict[str, Any], reference: str, censored: set[str], key: str) -> str:
    """A measured ratio with its direction when a threshold lies above the grid ("≥", "≤"; "?" if both do)."""
    value = row[key]
    if value is None:
        return "—"
    if row["method"] == reference:
        return f"{value:.2f}"
    mine, theirs = row["method"] in censored, reference in censored and row["method"] != reference
    if mine and theirs:
        return "?"
    return ("≥ " if mine else "≤ " if theirs else "") + f"{value:.2f}"


def _ratio_of(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or not b else a / b


def _plot(results: Sequence[StabilityResult], rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    from .plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.5 * len(results) + 1.6))
    anchor = next((row["max_stable_lr"] for row in rows if row["method"] == "pb"), None)
    for y, (r, row) in enumerate(zip(results, rows)):
        for p in r.points:
            ax.plot(p.lr, y, "o" if p.stable else "x", color="tab:green" if p.stable else "tab:red", ms=7)
        if r.max_stable_lr and r.min_diverged_lr:
            ax.plot([r.max_stable_lr, r.min_diverged_lr], [y, y], color="0.6", lw=3, alpha=0.5, zorder=0)
        if anchor and row["predicted_ratio_to_pb"] and r.max_delay > 0:
            ax.plot(anchor * row["predicted_ratio_to_pb"], y, "|", color="tab:blue", ms=16, mew=2)
    ax.set_yticks(range(len(results)), [r.method for r in results])
    ax.set_xscale("log")
    ax.set_xlabel("reference learning rate (scaled to b=1 by the config's rule)")
    ax.invert_yaxis()
    ax.plot([], [], "o", color="tab:green", label="trained (no divergence)")
    ax.plot([], [], "x", color="tab:red", label="diverged")
    ax.plot([], [], "|", color="tab:blue", ms=12, mew=2, label="quadratic prediction (pb's lr × predicted ratio)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
