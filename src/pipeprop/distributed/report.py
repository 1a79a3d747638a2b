"""Rank 0's end of a distributed run: the final weights, the test evaluation and the run folder files.

The records of ``metrics.jsonl`` follow the simulator's (``samples``, ``lr``, ``train_loss``,
``train_acc`` over each evaluation interval); the ranks do not stop to evaluate mid-run, so only the
last record carries ``test_loss``/``test_acc`` (of the completed run). ``summary.json`` has the
simulator's keys plus the distributed ones (``world_size``, ``backend``, ``assignment``, per-rank
``ranks`` timings, ``bubble_fill_drain``); ``model.pt`` holds the final ``state_dict``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

__all__ = ["write_rank0_results", "interval_records"]


def interval_records(losses: list[float], corrects: list[int], *, micro_batch: int, every: int, train_size: int,
                     lr_at: Any) -> list[dict[str, Any]]:
    """One record per ``every`` samples (and one at the end) with the training loss/accuracy since the last."""
    b, records, start = micro_batch, [], 0
    done = len(losses)
    bounds = sorted({min(done, k * every // b) for k in range(1, done * b // every + 1)} | {done}) if done else []
    for stop in bounds:
        if stop <= start:
            continue
        n = (stop - start) * b
        records.append({
            "samples": stop * b,
            "step": stop,
            "epoch": round(stop * b / train_size, 6),
            "lr": lr_at(stop),
            "train_loss": sum(losses[start:stop]) * b / n,
            "train_acc": sum(corrects[start:stop]) / n,
            "test_loss": None,
            "test_acc": None,
            "time": None,
        })
        start = stop
    return records


def write_rank0_results(setup: Any, run_dir: Path, gathered: list[dict[str, Any]], status: str,
                        diverged_at: Optional[int] = None) -> dict[str, Any]:
    """Assemble the final model from every rank's stages, evaluate it (when completed) and write the run
    folder's files; ``gathered`` holds each rank's stages, timings and (last rank) losses."""
    import math

    from ..experiments.builders import build_lr_schedule
    from ..experiments.checkpoint import atomic_save
    from ..experiments.run_folder import TrainWindow, make_summary, write_summary
    from ..experiments.runner import evaluate
    from ..experiments.tracking import open_logger
    from ..schedule import fill_bubble_fraction

    cfg, recipe = setup.config, setup.recipe
    for item in gathered:
        for s, sd in item["stages"].items():
            setup.partition.stages[s].load_state_dict(sd)
    last = gathered[-1]
    losses, corrects = last["losses"], last["corrects"]
    b, train_size = cfg.micro_batch, len(setup.data.train)
    every = cfg.eval_interval(recipe.total_samples)
    schedule = build_lr_schedule(recipe)
    metrics = interval_records(losses, corrects, micro_batch=b, every=every, train_size=train_size,
                               lr_at=lambda k: recipe.lr * schedule(k))
    ranks = [it["stats"] for it in gathered]
    wall = max(r["wall"] for r in ranks)
    if metrics:
        metrics[-1]["time"] = round(wall, 3)
    if status == "completed":
        atomic_save(setup.model.state_dict(), run_dir / "model.pt")
        loss, acc = evaluate(setup.model, setup.data, batch=cfg.eval_batch, dtype=setup.dtype)
        if metrics:
            metrics[-1].update(test_loss=loss if math.isfinite(loss) else None, test_acc=acc)
    window = TrainWindow(cfg.train_window or every)
    for value, correct in zip(losses, corrects):
        window.add(b, value * b, correct)
    delays = list(setup.partition.delays)
    summary = make_summary(
        cfg, status=status, metrics=metrics, recipe=recipe, samples=len(losses) * b,
        steps=len(losses), elapsed=wall, delays=delays, window=window, diverged_at=diverged_at,
        world_size=cfg.nproc, backend=setup.backend, assignment=[[r.start, r.stop - 1] for r in setup.ranges],
        bubble_fill_drain=fill_bubble_fraction(setup.total_steps, len(setup.partition)), ranks=ranks,
    )
    logger = open_logger(cfg.logger, run_dir, resume_at=0)
    if logger is not None:
        for rec in metrics:
            logger.log(rec)
        logger.close()
    write_summary(run_dir, summary, metrics, f"{cfg.name}: {cfg.method} (b={b}, {len(gathered)} processes)")
    return summary
