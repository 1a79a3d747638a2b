"""The run folder, shared by both engines: who may write into it, and the files every run leaves there.

::

    config.json      the resolved config, the scaled recipe, stages and delays, versions, command
    metrics.jsonl    one JSON record per evaluation (samples, lr, train/test loss and accuracy, time; language
                     models: test loss in nats/char, test_bpc in bits/char, test_ppl perplexity, no accuracy)
    summary.json     status ("completed", "diverged", "interrupted", "stopped"), final and best numbers
    checkpoint.pt    (simulator) or checkpoint/rank<r>.pt (distributed): checksummed, written atomically
    curves.png       loss and accuracy against samples
    tensorboard/     event files, with ``logger = "tensorboard"``

A folder is used only by the run its ``config.json`` describes: :func:`claim_run_folder` refuses a folder
holding another run (naming the differing keys) unless ``overwrite`` is given, and refuses to restart a
started run without ``resume`` or ``overwrite``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from .checkpoint import atomic_write_text, remove_temporary_files
from .config import ConfigError, ExperimentConfig, read_config_file

__all__ = ["RunDirError", "RUN_FILES", "stored_config", "check_run_folder", "claim_run_folder", "write_config_json",
           "write_metrics", "write_summary", "make_summary", "TrainWindow"]

#: what a run leaves in its folder (``--overwrite`` removes exactly these)
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "checkpoint.pt", "checkpoint", "curves.png", "tensorboard",
             "model.pt", "errors", "result.json")
_STARTED = ("checkpoint.pt", "checkpoint", "summary.json", "metrics.jsonl", "model.pt", "result.json")


class RunDirError(RuntimeError):
    """The run folder cannot be used as asked (it holds another run, or this run was already started)."""


def stored_config(run_dir: Path | str) -> Optional[ExperimentConfig]:
    """The config of the run in ``run_dir`` (``None`` when it has no ``config.json``)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        return ExperimentConfig(**read_config_file(path))
    except ConfigError as err:
        raise RunDirError(f"{path} cannot be read as a run config ({err}); use --overwrite or another --out") from err


def check_run_folder(run_dir: Path | str, config: ExperimentConfig, *, resume: bool = False, overwrite: bool = False) -> None:
    """Raise :class:`RunDirError` unless ``config`` may run in ``run_dir`` (reads only, safe on every rank)."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: give one")
    if resume and not run_dir.is_dir():
        raise RunDirError(f"--resume: {run_dir} holds no run; start it without --resume")
    if overwrite or not run_dir.exists():
        return
    started = [name for name in _STARTED if (run_dir / name).exists()]
    stored = stored_config(run_dir)
    if stored is None:
        if started:
            raise RunDirError(f"{run_dir} holds files of another run ({', '.join(started)}) but no config.json: "
                              "pass --overwrite to replace them, or choose another --out")
        if resume:
            raise RunDirError(f"--resume: {run_dir} holds no run; start it without --resume")
        return
    diff = config.differences(stored)
    if diff:
        raise RunDirError(
            f"{run_dir} holds a run with a different config ({'; '.join(f'{d} stored' for d in diff)}): pass "
            "--overwrite to replace it, or choose another --out"
        )
    if resume and not started:
        raise RunDirError(f"--resume: the run in {run_dir} has no checkpoint yet; start it without --resume")
    if not resume and started:
        raise RunDirError(f"{run_dir} already holds this run: continue it with --resume, or pass --overwrite to start "
                          "again (or choose another --out)")


def claim_run_folder(run_dir: Path | str, config: ExperimentConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Check ``run_dir`` (:func:`check_run_folder`), then make it ready: temporaries of killed writes are
    removed, and with ``overwrite`` the files of the previous run too."""
    run_dir = Path(run_dir)
    check_run_folder(run_dir, config, resume=resume, overwrite=overwrite)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_temporary_files(run_dir)
    if overwrite:
        for name in RUN_FILES:
            p = run_dir / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    return run_dir


def write_config_json(run_dir: Path, config: ExperimentConfig, *, recipe: Any, delays: Sequence[int], train_size: int,
                      test_size: int, **extra: Any) -> None:
    """``config.json``: the config (what :func:`stored_config` reads back) and what was derived from it."""
    import torch

    import pipeprop

    info = {
        "config": config.to_dict(),
        "scaled_recipe": recipe.to_dict(),
        "num_stages": len(delays),
        "delays": list(delays),
        "train_size": train_size,
        "test_size": test_size,
        **extra,
        "pipeprop_version": pipeprop.__version__,
        "torch_version": torch.__version__,
        "command": sys.argv,
    }
    atomic_write_text(run_dir / "config.json", json.dumps(info, indent=2, default=str) + "\n")


def write_metrics(run_dir: Path, metrics: Sequence[dict[str, Any]]) -> None:
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))


class TrainWindow:
    """Training loss and accuracy over the last ``size`` samples (the definition of the final train numbers)."""

    def __init__(self, size: int, entries: Optional[list[list[float]]] = None) -> None:
        self.size = int(size)
        self.entries: list[list[float]] = [list(e) for e in entries or []]  # [samples, loss_sum, correct] per step

    def add(self, samples: int, loss_sum: float, correct: float) -> None:
        self.entries.append([samples, loss_sum, correct])
        held = sum(e[0] for e in self.entries)
        while self.entries and held - self.entries[0][0] >= self.size:
            held -= self.entries.pop(0)[0]

    def value(self) -> tuple[Optional[float], Optional[float], int]:
        """``(mean loss, accuracy, samples)`` over the window."""
        n = sum(e[0] for e in self.entries)
        if not n:
            return None, None, 0
        return sum(e[1] for e in self.entries) / n, sum(e[2] for e in self.entries) / n, int(n)


def make_summary(config: ExperimentConfig, *, status: str, metrics: Sequence[dict[str, Any]], recipe: Any, samples: int,
                 steps: int, elapsed: float, delays: Sequence[int], window: TrainWindow,
                 diverged_at: Optional[int] = None, **extra: Any) -> dict[str, Any]:
    """The ``summary.json`` of a run (the same keys for both engines).

    ``metric`` is the headline metric (``"accuracy"``: higher is better, ``"loss"``: lower is better);
    language-modelling runs add the final ``test_bpc`` and ``test_ppl`` and have no accuracies.
    """
    evaluated = [m for m in metrics if m.get("test_acc") is not None or m.get("test_loss") is not None]
    tests = [m["test_acc"] for m in evaluated if m.get("test_acc") is not None]
    losses = [m["test_loss"] for m in evaluated if m.get("test_loss") is not None]
    last_test = evaluated[-1] if evaluated else {}
    loss, acc, n = window.value()
    lm = config.task == "language-modelling"
    if lm:
        extra = {"final_test_bpc": last_test.get("test_bpc"), "final_test_ppl": last_test.get("test_ppl"), **extra}
    return {
        "name": config.name,
        "status": status,
        "engine": config.engine,
        "method": config.method,
        "optimizer": config.optimizer,
        "micro_batch": config.micro_batch,
        "seed": config.seed,
        "model": config.model,
        "dataset": config.dataset,
        "task": config.task,
        "metric": config.headline_metric,
        "samples": samples,
        "steps": steps,
        "total_samples": recipe.total_samples,
        "final_test_acc": last_test.get("test_acc"),
        "final_test_loss": last_test.get("test_loss"),
        "final_test_at_samples": last_test.get("samples"),
        "final_train_loss": loss,
        "final_train_acc": None if lm else acc,
        "final_train_window": n,
        "best_test_acc": max(tests) if tests else None,
        "best_test_loss": min(losses) if losses else None,
        "evaluations": len(evaluated),
        "diverged_at": diverged_at,
        "wall_seconds": round(elapsed, 3),
        "samples_per_second": round(samples / elapsed, 2) if elapsed > 0 else None,
        "num_stages": len(delays),
        "max_delay": max(delays) if delays else 0,
        "lr": recipe.lr,
        "momentum": recipe.momentum,
        **extra,
    }


def write_summary(run_dir: Path, summary: dict[str, Any], metrics: Sequence[dict[str, Any]], title: str) -> None:
    """``metrics.jsonl``, ``summary.json`` and ``curves.png`` at the end of a run (a plotting failure only warns)."""
    from .plots import plot_run

    write_metrics(run_dir, metrics)
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    if metrics:
        try:
            plot_run(list(metrics), run_dir / "curves.png", title=title)
        except Exception as err:  # noqa: BLE001 - a plotting failure must not lose the run
            print(f"warning: could not plot {run_dir}: {err}", file=sys.stderr)
