"""Tables (mean ± std over seeds) and plots from stored run directories.

Runs are counted by status: completed, interrupted (stopped or Ctrl-C; resumable), killed (a run folder
with ``config.json`` but no ``summary.json``: the process died, or is still running) and diverged.
Means and spreads are taken over the completed runs only. Runs compared by accuracy (image classification)
and runs compared by loss (language models: validation loss in nats per character, bits per character and
perplexity, lower is better, next to the loss of predicting the character frequencies) get one table each.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .checkpoint import atomic_write_text
from .config import DEFAULT_METHODS

__all__ = ["RunRecord", "load_run", "collect_runs", "aggregate", "format_table", "write_report"]


@dataclass
class RunRecord:
    """One finished (or stopped) run read back from its directory."""

    path: Path
    summary: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        s = self.summary
        return f"{s.get('method')} (b={s.get('micro_batch')})"


def load_run(run_dir: Path | str) -> RunRecord:
    """Read ``summary.json`` and ``metrics.jsonl`` of a run directory (a run without ``summary.json`` but
    with ``config.json`` was killed: its summary is rebuilt from the config with status ``"killed"``)."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
    elif (run_dir / "config.json").is_file():
        cfg = json.loads((run_dir / "config.json").read_text()).get("config", {})
        summary = {k: cfg.get(k) for k in ("name", "method", "micro_batch", "seed", "model", "dataset", "engine")}
        summary["status"] = "killed"
    else:
        raise FileNotFoundError(f"{run_dir} has no summary.json or config.json: it is not a pipeprop run")
    metrics_path = run_dir / "metrics.jsonl"
    metrics = []
    if metrics_path.is_file():
        metrics = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return RunRecord(run_dir, summary, metrics)


def collect_runs(root: Path | str) -> list[RunRecord]:
    """Every run under ``root`` (``root`` itself may be a run directory)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    paths = sorted({p.parent for name in ("summary.json", "config.json") for p in root.rglob(name)})
    return [load_run(p) for p in paths]


def _method_rank(method: str) -> tuple[int, str]:
    order = list(DEFAULT_METHODS) + ["pb+stash"]
    return (order.index(method) if method in order else len(order), method)


def _mean_std(values: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """One row per (experiment, method, micro-batch): runs per status, mean/std over the completed runs."""
    groups: dict[tuple[str, str, int], list[RunRecord]] = {}
    for r in runs:
        s = r.summary
        groups.setdefault((s.get("name", ""), s.get("method", "?"), int(s.get("micro_batch", 0))), []).append(r)
    rows = []
    for (name, method, b), members in sorted(groups.items(), key=lambda kv: (kv[0][0], _method_rank(kv[0][1]), kv[0][2])):
        ok = [r.summary for r in members if r.summary.get("status") == "completed"]
        status = [r.summary.get("status") for r in members]
        row: dict[str, Any] = {
            "experiment": name,
            "method": method,
            "micro_batch": b,
            "runs": len(members),
            "completed": len(ok),
            "interrupted": sum(s in ("interrupted", "stopped") for s in status),
            "killed": sum(s == "killed" for s in status),
            "diverged": sum(s == "diverged" for s in status),
            "seeds": sorted(r.summary.get("seed") for r in members if r.summary.get("seed") is not None),
            "task": members[0].summary.get("task", "classification"),
            "metric": members[0].summary.get("metric", "accuracy"),
        }
        for key in ("final_test_acc", "best_test_acc", "final_train_loss", "samples_per_second", "final_test_loss",
                    "best_test_loss", "final_test_bpc", "final_test_ppl"):
            vals = [s[key] for s in ok if s.get(key) is not None]
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std(vals)
        baselines = {r.summary["baseline_test_loss"] for r in members if r.summary.get("baseline_test_loss") is not None}
        row["baseline_test_loss"] = baselines.pop() if len(baselines) == 1 else None
        rows.append(row)
    return rows


def _pm(mean: Optional[float], std: Optional[float], n: int, scale: float = 1.0, digits: int = 2) -> str:
    if mean is None:
        return "–"
    if n < 2:
        return f"{mean * scale:.{digits}f} (1 run)"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table: runs per status, then final/best test accuracy (%) and final train loss as
    mean ± std over the completed runs (the train loss is the mean over each run's final train window).
    Rows compared by loss (language models) go into a second table (:func:`format_loss_table`)."""
    by_loss = [r for r in rows if r.get("metric") == "loss"]
    rows = [r for r in rows if r.get("metric") != "loss"]
    if not rows:
        return format_loss_table(by_loss)
    header = ("| experiment | method | b | completed | interrupted | killed | diverged | final test acc (%) | "
              "best test acc (%) | final train loss |")
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        n = r["completed"]
        lines.append(
            f"| {r['experiment']} | {r['method']} | {r['micro_batch']} | {n} | {r['interrupted']} | {r['killed']} | "
            f"{r['diverged']} | {_pm(r['final_test_acc_mean'], r['final_test_acc_std'], n, 100)} | "
            f"{_pm(r['best_test_acc_mean'], r['best_test_acc_std'], n, 100)} | "
            f"{_pm(r['final_train_loss_mean'], r['final_train_loss_std'], n, 1, 3)} |"
        )
    return "\n".join(lines) + "\n" + ("\n" + format_loss_table(by_loss) if by_loss else "")


def format_loss_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of runs compared by test loss (lower is better): final loss, bits per character and
    perplexity (language models), best loss and final train loss, mean ± std over the completed runs; below
    it the loss of a model that predicts only the training split's character frequencies."""
    lm = all(r.get("task") == "language-modelling" for r in rows)
    unit = "nats/char" if lm else "nats"
    what = "val" if lm else "test"
    header = (f"| experiment | method | b | completed | interrupted | killed | diverged | final {what} loss ({unit}) ↓ | "
              + ("bits/char | perplexity | " if lm else "") + f"best {what} loss | final train loss |")
    lines = [header, "|" + "---|" * (12 if lm else 10)]
    for r in rows:
        n = r["completed"]
        lines.append(
            f"| {r['experiment']} | {r['method']} | {r['micro_batch']} | {n} | {r['interrupted']} | {r['killed']} | "
            f"{r['diverged']} | {_pm(r['final_test_loss_mean'], r['final_test_loss_std'], n, 1, 3)} | "
            + (f"{_pm(r['final_test_bpc_mean'], r['final_test_bpc_std'], n, 1, 3)} | "
               f"{_pm(r['final_test_ppl_mean'], r['final_test_ppl_std'], n, 1, 2)} | " if lm else "")
            + f"{_pm(r['best_test_loss_mean'], r['best_test_loss_std'], n, 1, 3)} | "
            f"{_pm(r['final_train_loss_mean'], r['final_train_loss_std'], n, 1, 3)} |"
        )
    baselines: dict[float, list[str]] = {}
    for r in rows:
        if r.get("baseline_test_loss") is not None and r["experiment"] not in baselines.get(r["baseline_test_loss"], []):
            baselines.setdefault(r["baseline_test_loss"], []).append(r["experiment"])
    notes = [f"Predicting only the training split's character frequencies scores {loss:.3f} nats/char "
             f"({loss / math.log(2):.3f} bits/char) on the validation windows of {', '.join(names)}."
             for loss, names in sorted(baselines.items())]
    return "\n".join(lines) + "\n\nLower is better." + "".join(" " + n for n in notes) + "\n"


def write_report(root: Path | str, runs: Optional[Sequence[RunRecord]] = None, *, out: Optional[Path | str] = None,
                 title: str = "") -> dict[str, Path]:
    """Write ``results.md``, ``results.csv``, ``results.json`` and ``comparison.png`` for the runs under ``root``."""
    from .plots import plot_comparison

    root = Path(root)
    out = Path(out) if out is not None else root
    out.mkdir(parents=True, exist_ok=True)
    runs = list(runs) if runs is not None else collect_runs(root)
    if not runs:
        raise FileNotFoundError(f"no runs (summary.json files) under {root}")
    rows = aggregate(runs)
    table = format_table(rows)
    paths = {"table": out / "results.md", "csv": out / "results.csv", "json": out / "results.json", "plot": out / "comparison.png"}
    atomic_write_text(paths["table"], (f"# {title}\n\n" if title else "") + table)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (";".join(map(str, v)) if isinstance(v, list) else v) for k, v in r.items()})
    atomic_write_text(paths["csv"], buf.getvalue())
    atomic_write_text(paths["json"], json.dumps({"rows": rows, "runs": [{"path": str(r.path), **r.summary} for r in runs]}, indent=2) + "\n")
    curves: dict[str, list[list[dict[str, Any]]]] = {}
    multi = len({r.summary.get("name") for r in runs}) > 1
    for r in sorted(runs, key=lambda r: _method_rank(r.summary.get("method", ""))):
        label = (f"{r.summary.get('name')}: " if multi else "") + r.label
        curves.setdefault(label, []).append(r.metrics)
    plot_comparison(curves, paths["plot"], title=title or str(root.name))
    return paths
