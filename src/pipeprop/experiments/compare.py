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

__all__ = ["run_sweep", "run_sweeps", "run_plan", "sweep_dirs", "headline", "DEFAULT_BATCH_RUNS"]

#: runs trained as one batched simulation by default (see docs/experiments.md, "Batched runs")
DEFAULT_BATCH_RUNS = 8


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
    batch_runs: Optional[int] = None,
    echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Run (or reuse) every method x seed; returns the summaries and the report files.

    A run whose ``summary.json`` says completed or diverged is reused, and a stopped or interrupted one
    resumed from its checkpoint, only when its stored config equals the requested one (anything else
    raises :class:`~pipeprop.experiments.run_folder.RunDirError` naming the differing keys); ``overwrite``
    reruns everything. An interrupted run ends the sweep.

    ``batch_runs`` (default :data:`DEFAULT_BATCH_RUNS`): runs that differ only in seed (or learning rate)
    are trained up to that many at a time as one batched simulation
    (:class:`~pipeprop.experiments.run_group.RunGroup`), each in its own run folder; 1 trains them one by
    one. Runs that cannot be batched fall back to one by one with a notice. By default a group smaller than
    :meth:`~pipeprop.multi_run.MultiRunSimulator.min_runs_to_batch` (where batching would be slower: a fixed
    rule by model form and device) also runs one by one, with a notice; an explicit ``batch_runs`` batches
    it anyway. A run checkpointed in a group resumes in a group (and one checkpointed alone, alone).
    """
    return run_sweeps([(config, out_dir)], methods=methods, seeds=seeds, overwrite=overwrite,
                      model_factory=model_factory, show_progress=show_progress, batch_runs=batch_runs, echo=echo)[0]


def run_sweeps(
    sweeps: Sequence[tuple[ExperimentConfig, Path | str]],
    *,
    methods: Optional[Sequence[str]] = None,
    seeds: Optional[Sequence[int]] = None,
    overwrite: bool = False,
    model_factory: Optional[Callable[..., Any]] = None,
    show_progress: Optional[bool] = None,
    batch_runs: Optional[int] = None,
    echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> list[tuple[list[dict[str, Any]], dict[str, Path]]]:
    """:func:`run_sweep` for several experiments ``(config, out_dir)`` as one plan: runs of different
    experiments that differ only in seed and learning rate (e.g. a config and its larger-lr variant) are
    batched together. Returns each experiment's summaries and report files, in order."""
    plans = [sweep_dirs(cfg, Path(out), list(methods or cfg.methods), list(seeds if seeds is not None else cfg.seeds))
             for cfg, out in sweeps]
    results = run_plan([item for plan in plans for item in plan], overwrite=overwrite, model_factory=model_factory,
                       show_progress=show_progress, batch_runs=batch_runs, echo=echo)
    out: list[tuple[list[dict[str, Any]], dict[str, Path]]] = []
    start = 0
    for (cfg, out_dir), plan in zip(sweeps, plans):
        mine = results[start : start + len(plan)]
        start += len(plan)
        runs = [load_run(d) for *_, d in plan if (d / "summary.json").is_file()]
        out.append(([s for s in mine if s is not None], write_report(Path(out_dir), runs, title=cfg.name)))
    return out


def run_plan(
    plan: Sequence[tuple[str, int, ExperimentConfig, Path]],
    *,
    overwrite: bool = False,
    model_factory: Optional[Callable[..., Any]] = None,
    show_progress: Optional[bool] = None,
    batch_runs: Optional[int] = None,
    echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    default_batch_runs: int = DEFAULT_BATCH_RUNS,
) -> list[Optional[dict[str, Any]]]:
    """Run (or reuse) the runs of ``plan`` (``(label, seed, config, run_dir)`` as from :func:`sweep_dirs`).

    The engine of :func:`run_sweep` (same reuse, resume and batching rules) for plans whose configs differ in
    more than method and seed, e.g. the learning rates of a map: runs of equal
    :func:`~pipeprop.experiments.run_group.group_key` are batched wherever they sit in the plan. Returns the
    summaries in plan order; ``None`` for the runs not started because an earlier one was interrupted.
    ``default_batch_runs``: the group size when ``batch_runs`` is not given.
    """
    from .run_group import RunGroup, group_key, is_batched_checkpoint, why_not_batched

    k_max = default_batch_runs if batch_runs is None else int(batch_runs)
    if k_max < 1:
        raise ValueError(f"batch_runs must be >= 1, got {batch_runs}")
    summaries: dict[int, dict[str, Any]] = {}
    todo: list[tuple[int, bool, bool]] = []  # (plan index, resume, batched checkpoint)
    for i, (label, seed, cfg, run_dir) in enumerate(plan):
        summary_path = run_dir / "summary.json"
        started = (run_dir / CHECKPOINT).is_file() or (run_dir / "checkpoint").is_dir()
        if not overwrite and (started or summary_path.is_file()):
            check_run_folder(run_dir, cfg, resume=True)  # a different config is refused, naming the keys
        previous = json.loads(summary_path.read_text()) if summary_path.is_file() and not overwrite else None
        if previous is not None and previous.get("status") in ("completed", "diverged"):
            echo(f"[{i + 1}/{len(plan)}] {label} seed {seed}: reusing {run_dir} ({previous['status']})")
            summaries[i] = previous
            continue
        resume = not overwrite and started
        todo.append((i, resume, resume and cfg.engine == "simulator" and is_batched_checkpoint(run_dir)))

    # batches: runs of one group key and the same start (fresh / resumed from a group checkpoint), <= k_max each
    batches: list[list[tuple[int, bool, bool]]] = []
    open_batches: dict[tuple[str, bool, bool], list[tuple[int, bool, bool]]] = {}
    noticed: set[str] = set()
    for item in todo:
        i, resume, batched = item
        cfg = plan[i][2]
        reason = why_not_batched(cfg)
        if reason and k_max > 1 and group_key(cfg) not in noticed:
            noticed.add(group_key(cfg))
            echo(f"notice: {plan[i][0]} runs cannot be batched ({reason}); running them one by one")
        if (resume and not batched) or reason or (k_max == 1 and not batched):
            batches.append([item])
            continue
        key = (group_key(cfg), resume, batched)
        current = open_batches.get(key)
        if current is None or len(current) >= k_max:
            current = open_batches[key] = []
            batches.append(current)
        current.append(item)

    interrupted = False
    for batch in batches:
        if interrupted:
            break
        results: Optional[list[dict[str, Any]]] = None
        resume = batch[0][1]
        if len(batch) > 1 or batch[0][2]:
            idx = [i for i, _, _ in batch]
            lr_differs = len({plan[i][2].lr for i in idx}) > 1
            names = ", ".join(f"{plan[i][0]}{f' lr {plan[i][2].lr:g}' if lr_differs else ''} seed {plan[i][1]}" for i in idx)
            group: Optional[RunGroup] = None
            try:
                group = RunGroup([plan[i][2] for i in idx], [plan[i][3] for i in idx], model_factory=model_factory).setup()
            except ValueError as err:
                if batch[0][2]:
                    raise
                echo(f"notice: {names} cannot be batched ({err}); running them one by one")
            else:
                pays = group.multi.min_runs_to_batch()
                if batch_runs is None and not batch[0][2] and len(idx) < pays:
                    echo(f"notice: {names}: not batched, {len(idx)} runs of this model train faster one by one "
                         f"(batching pays from {pays} runs here, docs/experiments.md \"Batched runs\"); "
                         f"--batch-runs {len(idx)} batches them anyway")
                    group = None
            if group is not None:
                echo(f"[{', '.join(str(i + 1) for i in idx)}/{len(plan)}] {names}: {len(idx)} runs batched"
                     f"{' (resuming)' if resume else ''} -> {plan[idx[0]][3].parent}/")
                results = group.run(resume=resume, overwrite=overwrite, show_progress=show_progress)
                for i, summary in zip(idx, results):
                    summaries[i] = summary
                    _echo_result(echo, plan[i], summary)
        if results is None:
            for i, resume, _ in batch:
                label, seed, cfg, run_dir = plan[i]
                echo(f"[{i + 1}/{len(plan)}] {label} seed {seed}{' (resuming)' if resume else ''} -> {run_dir}")
                summary = run_experiment(cfg, run_dir, resume=resume, overwrite=overwrite, model_factory=model_factory,
                                         show_progress=show_progress)
                summaries[i] = summary
                _echo_result(echo, plan[i], summary)
                if summary["status"] == "interrupted":
                    break
        interrupted = any(summaries[i]["status"] == "interrupted" for i, _, _ in batch if i in summaries)
    return [summaries.get(i) for i in range(len(plan))]


def _echo_result(echo: Callable[[str], None], entry: tuple[str, int, ExperimentConfig, Path], summary: dict[str, Any]) -> None:
    echo(f"    {entry[0]} seed {entry[1]}: {summary['status']}: {headline(summary)}")


def headline(summary: dict[str, Any]) -> str:
    """``"final test acc 91.20%"`` or, for runs compared by loss, ``"final val loss 2.617 nats/char"``."""
    if summary.get("metric") == "loss":
        loss = summary.get("final_test_loss")
        lm = summary.get("task") == "language-modelling"
        unit = " nats/char" if lm else ""
        return f"final {'val' if lm else 'test'} loss {'–' if loss is None else f'{loss:.3f}{unit}'}"
    acc = summary.get("final_test_acc")
    return f"final test acc {'–' if acc is None else f'{100 * acc:.2f}%'}"
