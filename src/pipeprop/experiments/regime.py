"""Regime map: when do Spike Compensation and Linear Weight Prediction help, and when do they hurt?

:func:`regime_map` trains one config over a grid of pipeline depth (``delay_offset`` adds the same extra
delay to every stage, so the network stays the same and only the delays grow) × scaling rule (``linear``:
momentum kept at the reference value, e.g. 0.9; ``momentum``: the momentum-preserving rule, m → m^(b/B)) ×
reference learning rate, for several PB methods and seeds, plus SGD at b=1 (no delay) once per rule and
learning rate as the control. Every run goes through :func:`~pipeprop.experiments.compare.run_plan`
(finished runs reused, interrupted ones resumed; the seeds and learning rates of one method, rule and delay
are batched). :func:`write_regime_report` writes the cells (mean ± std final test accuracy, difference to
SGD at b=1, ``D·(1−m)`` and the quadratic analysis' stability gain of each method over plain PB at that
delay and momentum) and a heat map.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .checkpoint import atomic_write_text
from .compare import DEFAULT_BATCH_RUNS, run_plan, sweep_dirs
from .config import ExperimentConfig

__all__ = ["regime_map", "write_regime_report", "REGIME_METHODS"]

REGIME_METHODS = ("pb", "pb+sc", "pb+lwp", "pb+sc+lwp")
CONTROL = "sgd@1"


def _cell_dir(out_dir: Path, rule: str, lr: float, offset: int) -> Path:
    return out_dir / rule / f"lr{lr:g}" / f"offset{offset}"


def regime_map(
    config: ExperimentConfig,
    out_dir: Path | str,
    *,
    offsets: Sequence[int],
    rules: Sequence[str] = ("linear", "momentum"),
    lrs: Sequence[float],
    methods: Sequence[str] = REGIME_METHODS,
    seeds: Sequence[int] = (0, 1, 2),
    batch_runs: Optional[int] = None,
    show_progress: Optional[bool] = None,
    echo: Callable[[str], None] = lambda s: None,
) -> list[dict[str, Any]]:
    """Run the grid; returns one record per (rule, lr, offset, method) with every seed's summary.

    All runs go through one :func:`~pipeprop.experiments.compare.run_plan`, so the runs of one method, rule
    and delay — every seed *and* every learning rate — train as one batched simulation of up to
    ``batch_runs`` runs (default: ``len(lrs) × len(seeds)``, at least
    :data:`~pipeprop.experiments.compare.DEFAULT_BATCH_RUNS`, where batching is faster; 1 trains them one by one).
    """
    if not offsets or min(offsets) < 0:
        raise ValueError(f"offsets must be non-negative extra delays, got {list(offsets)}")
    if not lrs or min(lrs) <= 0:
        raise ValueError(f"lrs must be positive reference learning rates, got {list(lrs)}")
    if not rules or not methods or not seeds:
        raise ValueError("the regime map needs at least one rule, one method and one seed")
    if config.micro_batch != 1:
        raise ValueError("the regime map compares methods at b=1; set micro_batch=1")
    out_dir = Path(out_dir)
    keys: list[tuple[str, float, int, str]] = []  # (rule, lr, offset, method) of every cell, in plan order
    plan: list[tuple[str, int, ExperimentConfig, Path]] = []
    for rule in rules:
        for k, offset in enumerate(offsets):
            entries = list(methods) + ([CONTROL] if k == 0 else [])
            for entry in entries:
                for lr in lrs:
                    base = config.replace(rule=rule, lr=lr, delay_offset=offset)  # sgd@1 has no delay anyway
                    keys.append((rule, lr, offset if entry != CONTROL else 0, entry))
                    plan += sweep_dirs(base, _cell_dir(out_dir, rule, lr, offset), [entry], list(seeds))
    echo(f"regime map: {len(plan)} runs = {len(keys)} (rule, delay, lr, method) entries x {len(seeds)} seeds "
         f"({', '.join(rules)} rule; lr {', '.join(f'{v:g}' for v in lrs)}; delay_offset {', '.join(map(str, offsets))})")
    summaries = run_plan(plan, show_progress=show_progress, batch_runs=batch_runs, echo=echo,
                         default_batch_runs=max(DEFAULT_BATCH_RUNS, len(lrs) * len(seeds)))
    if any(s is None or s.get("status") == "interrupted" for s in summaries):
        raise KeyboardInterrupt
    cells: list[dict[str, Any]] = []
    n = len(seeds)
    for c, (rule, lr, offset, entry) in enumerate(keys):
        part = slice(c * n, (c + 1) * n)
        cells.append({"rule": rule, "lr": lr, "delay_offset": offset, "method": entry, "runs": summaries[part],
                      "dirs": [d for *_, d in plan[part]],
                      "lwp_mode": config.method_options.get("lwp_mode", "linear")})
    return cells


def _mean_std(values: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize_cells(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std final test accuracy per cell, its difference to SGD at b=1, D·(1−m) and the quadratic gain."""
    from ..analysis import stability_boundary
    from .stability import quadratic_name

    control = {(c["rule"], c["lr"]): c for c in cells if c["method"] == CONTROL}
    rows = []
    for c in cells:
        # a diverged run keeps its last evaluated accuracy (near chance) and is counted in "diverged"
        accs = [100 * (s.get("final_test_acc") or 0.0) for s in c["runs"]]
        mean, std = _mean_std(accs)
        ref = control.get((c["rule"], c["lr"]))
        ref_mean = _mean_std([100 * (s.get("final_test_acc") or 0.0) for s in ref["runs"]])[0] if ref else None
        first = c["runs"][0]
        delay, m = int(first.get("max_delay", 0)), float(first.get("momentum", 0.0))
        gain = None
        quadratic = quadratic_name(c["method"]) if c["method"] != CONTROL else None
        if quadratic is not None and delay > 0:
            options = {"lwp_mode": c.get("lwp_mode", "linear")}
            gain = float(stability_boundary(quadratic, m, delay, **options) / stability_boundary("pb", m, delay))
        rows.append({
            "rule": c["rule"], "lr": c["lr"], "method": c["method"], "delay_offset": c["delay_offset"],
            "max_delay": delay, "momentum_b": m, "lr_b": first.get("lr"), "d_one_minus_m": delay * (1 - m),
            "seeds": len(accs), "acc_mean": mean, "acc_std": std, "sgd_acc_mean": ref_mean,
            "delta_vs_sgd": None if mean is None or ref_mean is None else mean - ref_mean,
            "diverged": sum(s.get("status") == "diverged" for s in c["runs"]),
            "quadratic_gain_vs_pb": gain,
        })
    return rows


def write_regime_report(cells: Sequence[dict[str, Any]], out_dir: Path | str, *, title: str) -> dict[str, Path]:
    """``regime.json``, ``regime.csv``, ``regime.md`` and the heat map ``regime.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarize_cells(cells)
    paths = {"json": out_dir / "regime.json", "csv": out_dir / "regime.csv", "table": out_dir / "regime.md",
             "plot": out_dir / "regime.png"}
    keep = ("method", "seed", "status", "final_test_acc", "best_test_acc", "final_train_loss", "diverged_at", "max_delay",
            "lr", "momentum", "samples", "wall_seconds")
    runs = [{"rule": c["rule"], "ref_lr": c["lr"], "delay_offset": c["delay_offset"], **{k: s.get(k) for k in keep}}
            for c in cells for s in c["runs"]]
    atomic_write_text(paths["json"], json.dumps({"title": title, "rows": rows, "runs": runs}, indent=2) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(paths["csv"], buf.getvalue())
    lines = [f"{title}: final test accuracy (%) mean ± std over seeds, and the difference to sgd at b=1 "
             "(same rule and lr)", "",
             "| rule | ref. lr | max delay | m (b=1) | D·(1−m) | method | acc | Δ vs sgd b=1 | quadratic gain vs pb |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["rule"], r["lr"], r["max_delay"], r["method"])):
        acc = "—" if r["acc_mean"] is None else f"{r['acc_mean']:.1f} ± {r['acc_std']:.1f}"
        delta = "—" if r["delta_vs_sgd"] is None else f"{r['delta_vs_sgd']:+.1f}"
        gain = "—" if r["quadratic_gain_vs_pb"] is None else f"{r['quadratic_gain_vs_pb']:.2f}"
        div = f" ({r['diverged']} diverged)" if r["diverged"] else ""
        lines.append(f"| {r['rule']} | {r['lr']:g} | {r['max_delay']} | {r['momentum_b']:.5f} | {r['d_one_minus_m']:.2f} | "
                     f"{r['method']} | {acc}{div} | {delta} | {gain} |")
    lines += ["", *_pivot_tables(rows)]
    atomic_write_text(paths["table"], "\n".join(lines) + "\n")
    _heatmap(rows, paths["plot"], title)
    for curves in _learning_curves(cells, out_dir, title):
        paths[curves.stem.replace("regime-", "")] = curves  # "curves-linear", "curves-momentum"
    return paths


def _pivot_tables(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Per rule, one line per (max delay, method) and one column per lr: "acc (Δ vs sgd b=1)" [diverged runs]."""
    lrs = sorted({r["lr"] for r in rows})
    order = {m: i for i, m in enumerate((CONTROL,) + REGIME_METHODS)}
    lines: list[str] = []
    for rule in sorted({r["rule"] for r in rows}):
        mine = [r for r in rows if r["rule"] == rule]
        m = mine[0]["momentum_b"]
        lines += [f"{rule} rule (m = {m:.5g} at b=1): final test acc % (Δ vs sgd b=1; ✗k = k runs diverged)", "",
                  "| D | D·(1−m) | method | " + " | ".join(f"lr {v:g}" for v in lrs) + " |",
                  "|---|---|---|" + "---|" * len(lrs)]
        keys = sorted({(r["max_delay"], r["method"]) for r in mine}, key=lambda k: (k[0], order.get(k[1], 99), k[1]))
        for delay, method in keys:
            cells = []
            for lr in lrs:
                r = next((r for r in mine if r["max_delay"] == delay and r["method"] == method and r["lr"] == lr), None)
                if r is None or r["acc_mean"] is None:
                    cells.append("—")
                    continue
                text = f"{r['acc_mean']:.1f}"
                if method != CONTROL and r["delta_vs_sgd"] is not None:
                    text += f" ({r['delta_vs_sgd']:+.1f})"
                cells.append(text + (f" ✗{r['diverged']}" if r["diverged"] else ""))
            lines.append(f"| {delay} | {delay * (1 - m):.2f} | {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _learning_curves(cells: Sequence[dict[str, Any]], out_dir: Path, title: str) -> list[Path]:
    """Per rule, test accuracy against samples (mean over seeds) of sgd (b=1) and every PB method in the
    (delay, lr) cell where the methods' final accuracies differ most (``regime-curves-<rule>.png``)."""
    from .plots import plot_comparison
    from .report import load_run

    def acc(c: dict[str, Any]) -> float:
        return statistics.fmean(100 * (s.get("final_test_acc") or 0.0) for s in c["runs"])

    written: list[Path] = []
    for rule in sorted({c["rule"] for c in cells}):
        groups: dict[tuple[int, float], list[dict[str, Any]]] = {}
        for c in cells:
            if c["rule"] == rule and c["method"] != CONTROL and c.get("dirs"):
                groups.setdefault((c["delay_offset"], c["lr"]), []).append(c)
        if not groups:
            continue
        (offset, lr), chosen = max(groups.items(), key=lambda kv: max(map(acc, kv[1])) - min(map(acc, kv[1])))
        control = [c for c in cells if c["rule"] == rule and c["lr"] == lr and c["method"] == CONTROL]
        runs = {}
        for c in control + chosen:
            label = c["method"] if c["method"] == CONTROL else f"{c['method']} (max delay {c['runs'][0].get('max_delay')})"
            runs[label] = [load_run(d).metrics for d in c["dirs"] if (Path(d) / "summary.json").is_file()]
        out = out_dir / f"regime-curves-{rule}.png"
        written.append(plot_comparison(runs, out, title=f"{title}: {rule} rule, reference lr {lr:g}, delay_offset {offset}"))
    return written


def _heatmap(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Rows of panels: scaling rule; columns: method; in a panel, max delay (y) × reference lr (x)."""
    import numpy as np

    from .plots import _pyplot

    plt = _pyplot()
    rules = sorted({r["rule"] for r in rows})
    methods = [m for m in REGIME_METHODS if any(r["method"] == m for r in rows)]
    methods += sorted({r["method"] for r in rows} - set(methods) - {CONTROL})
    lrs = sorted({r["lr"] for r in rows})
    delays = sorted({r["max_delay"] for r in rows if r["method"] != CONTROL})
    fig, axes = plt.subplots(len(rules), len(methods), figsize=(2.6 * len(methods) + 1.2, 2.4 * len(rules) + 0.8),
                             squeeze=False)
    lim = max([abs(r["delta_vs_sgd"]) for r in rows if r["delta_vs_sgd"] is not None] + [1.0])
    image = None
    for i, rule in enumerate(rules):
        for j, method in enumerate(methods):
            grid = np.full((len(delays), len(lrs)), np.nan)
            diverged = np.zeros((len(delays), len(lrs)), dtype=int)
            for r in rows:
                if r["rule"] == rule and r["method"] == method and r["delta_vs_sgd"] is not None:
                    grid[delays.index(r["max_delay"]), lrs.index(r["lr"])] = r["delta_vs_sgd"]
                    diverged[delays.index(r["max_delay"]), lrs.index(r["lr"])] = r["diverged"]
            ax = axes[i][j]
            image = ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim, origin="lower", aspect="auto")
            for (y, x), v in np.ndenumerate(grid):
                if np.isfinite(v):
                    mark = f"\n✗{diverged[y, x]}" if diverged[y, x] else ""
                    ax.text(x, y, f"{v:+.0f}{mark}", ha="center", va="center", fontsize=7)
            bottom = i == len(rules) - 1
            ax.set_xticks(range(len(lrs)), [f"{v:g}" for v in lrs] if bottom else [""] * len(lrs), fontsize=8)
            ax.set_yticks(range(len(delays)), [str(d) for d in delays], fontsize=8)
            m = next((r["momentum_b"] for r in rows if r["rule"] == rule), 0.0)
            ax.set_title(f"{method}\n{rule} rule, m={m:.4g}", fontsize=8)
            if j == 0:
                ax.set_ylabel("max delay D")
            if bottom:
                ax.set_xlabel("reference lr")
    fig.colorbar(image, ax=axes, shrink=0.8, label="final test acc − sgd (b=1), points (✗k: k runs diverged)")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
