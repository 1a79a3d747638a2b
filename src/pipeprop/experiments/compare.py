"""Sweeps: one config under several methods and seeds, each in its own run directory, then a report."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .config import ExperimentConfig, method_entry
from .report import load_run, write_report
from .run_folder import check_run_folder
from .runner import CHECKPOINT, run_experiment

__all__ = ["run_sweep", "sweep_dirs"]


def sweep_dirs(config: ExperimentConfig, out_dir: Path, methods: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, int, ExperimentConfig, Path]]:
    """``(label, seed, config, run_dir)`` of every run; run dirs are ``out_dir/<label>/seed<k>``."""
    plan = []
    for entry in methods:
        label, cfg = method_entry(config, entry)
        for seed in seeds:
            plan.append((label, seed, cfg.replace(seed=seed), Path(out_dir) / label.replace("@", "_b") / f"seed{seed}"))
    return plan


def run_sweep(
    config: ExperimentConfig,
    out_dir: Path | str,
    *,
    methods: Optional[Sequence[str]] = None,
    seeds: Optional[Sequence[int]] = None,
    overwrite: bool = False,
    model_factory: Optional[Callable[..., Any]] = None,
    show_progress: Optional[bool] = None,
    echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Run (or reuse) every method x seed; returns the summaries and the report files.

    A run whose ``summary.json`` says completed or diverged is reused, and a stopped or interrupted one
    resumed from its checkpoint, only when its stored config equals the requested one (anything else
    raises :class:`~pipeprop.experiments.run_folder.RunDirError` naming the differing keys); ``overwrite``
    reruns everything. An interrupted run ends the sweep.
    """
    out_dir = Path(out_dir)
    methods = list(methods or config.methods)
    seeds = list(seeds if seeds is not None else config.seeds)
    plan = sweep_dirs(config, out_dir, methods, seeds)
    summaries = []
    for i, (label, seed, cfg, run_dir) in enumerate(plan, 1):
        summary_path = run_dir / "summary.json"
        started = (run_dir / CHECKPOINT).is_file() or (run_dir / "checkpoint").is_dir()
        if not overwrite and (started or summary_path.is_file()):
            check_run_folder(run_dir, cfg, resume=True)  # a different config is refused, naming the keys
        previous = json.loads(summary_path.read_text()) if summary_path.is_file() and not overwrite else None
        if previous is not None and previous.get("status") in ("completed", "diverged"):
            echo(f"[{i}/{len(plan)}] {label} seed {seed}: reusing {run_dir} ({previous['status']})")
            summaries.append(previous)
            continue
        resume = not overwrite and started
        echo(f"[{i}/{len(plan)}] {label} seed {seed}{' (resuming)' if resume else ''} -> {run_dir}")
        summary = run_experiment(cfg, run_dir, resume=resume, overwrite=overwrite, model_factory=model_factory,
                                 show_progress=show_progress)
        summaries.append(summary)
        acc = summary.get("final_test_acc")
        echo(f"    {summary['status']}: final test acc {acc if acc is None else f'{100 * acc:.2f}%'}")
        if summary["status"] == "interrupted":
            break
    runs = [load_run(d) for *_, d in plan if (d / "summary.json").is_file()]
    paths = write_report(out_dir, runs, title=config.name)
    return summaries, paths
