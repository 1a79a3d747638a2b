"""Run the distributed engine on this machine through ``torchrun``, into an ordinary run folder.

This is what ``pipeprop train --engine distributed`` (and :func:`pipeprop.experiments.run_experiment`
with ``engine = "distributed"``) runs::

    from pipeprop.distributed import launch
    summary = launch(2, {"model": "mlp", "method": "pb+sc+lwp", "samples": 1000}, "runs/d")
    summary["final_test_acc"], summary["samples_per_second"], summary["ranks"][0]["busy_fraction"]

The launcher checks the configuration and the run folder first (so bad input raises before any process
starts), writes the run's ``config.json`` and hands every rank that file (``--config RUN/config.json``):
the config is never re-serialised into command-line options.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from ..experiments.config import ExperimentConfig

__all__ = ["launch", "run_distributed", "DistributedRunError"]


class DistributedRunError(RuntimeError):
    """A distributed run failed; ``errors`` maps rank to its error message, ``returncode`` is torchrun's."""

    def __init__(self, message: str, returncode: int, errors: dict[int, str], output: str = "") -> None:
        super().__init__(message)
        self.returncode, self.errors, self.output = returncode, errors, output


def _errors(out: Path) -> dict[int, str]:
    found: dict[int, str] = {}
    folder = out / "errors"
    if folder.is_dir():
        for path in sorted(folder.glob("rank*.txt")):
            try:
                found[int(path.stem[4:])] = path.read_text().strip()
            except (ValueError, OSError):
                continue
    return found


def run_distributed(
    config: ExperimentConfig,
    run_dir: Path | str,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after_steps: Optional[int] = None,
    show_progress: Optional[bool] = None,
    timeout: Optional[float] = None,
    env: Optional[Mapping[str, str]] = None,
    capture_output: bool = False,
) -> dict[str, Any]:
    """Run ``config`` with ``config.nproc`` processes into ``run_dir``; returns its ``summary.json``.

    ``stop_after_steps`` stops every rank after that many pipeline steps, with checkpoints (status
    ``"stopped"``); ``resume`` continues from them. ``timeout`` bounds the whole run (each rank also has
    its own per-wait ``config.timeout``); ``env`` adds environment variables (``OMP_NUM_THREADS``
    defaults to 1 per process).
    """
    from ..experiments.run_folder import check_run_folder, claim_run_folder
    from .worker import prepare, verify_rank_checkpoints, write_run_config

    if config.engine != "distributed":
        config = config.replace(engine="distributed")
    out = Path(run_dir)
    check_run_folder(out, config, resume=resume, overwrite=overwrite)
    # bad configuration fails here, before any process starts (a resumed 'measured' run: its stored ranges too)
    setup = prepare(config, config.nproc, resumed_from=out if resume else None)
    claim_run_folder(out, config, resume=resume, overwrite=overwrite)
    if resume:
        previous = _summary(out)
        if previous is not None and previous.get("status") == "completed":
            return previous
        verify_rank_checkpoints(out, config, config.nproc)
    write_run_config(setup, out)
    for stale in [out / "summary.json", *(out / "errors").glob("rank*.txt")]:
        stale.unlink(missing_ok=True)
    progress = config.progress if show_progress is None else show_progress
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={config.nproc}",
        "--max_restarts=0", "-m", "pipeprop.distributed", "--config", str(out / "config.json"), "--out", str(out),
        *(["--resume"] if resume else []), *(["--no-progress"] if not progress else []),
        *(["--stop-after-steps", str(stop_after_steps)] if stop_after_steps is not None else []),
    ]
    run_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
    try:
        proc = subprocess.run(cmd, env=run_env, timeout=timeout, capture_output=capture_output, text=True)
    except subprocess.TimeoutExpired as err:
        raise DistributedRunError(f"the distributed run exceeded {timeout}s and was stopped", -1, _errors(out)) from err
    output = ((proc.stdout or "") + (proc.stderr or "")) if capture_output else ""
    summary_path = out / "summary.json"
    summary = _summary(out)
    if proc.returncode != 0 and summary is not None and summary.get("status") == "diverged":
        return summary  # the last rank recorded the divergence; the others followed
    if proc.returncode != 0:
        errors = _errors(out)
        detail = "; ".join(f"rank {r}: {m}" for r, m in sorted(errors.items())) or "see the output above"
        raise DistributedRunError(f"distributed run failed (torchrun exit {proc.returncode}): {detail}", proc.returncode,
                                  errors, output)
    if summary is None:
        raise DistributedRunError(f"the run ended without writing {summary_path}", proc.returncode, _errors(out), output)
    return summary


def _summary(run_dir: Path) -> Optional[dict[str, Any]]:
    """The run folder's ``summary.json`` (None if there is none yet)."""
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def launch(nproc: int, config: Union[ExperimentConfig, Mapping[str, Any]], run_dir: Path | str, **kwargs: Any) -> dict[str, Any]:
    """:func:`run_distributed` of ``config`` (an ``ExperimentConfig`` or a dict of its keys) on ``nproc`` processes."""
    if isinstance(config, Mapping):
        config = ExperimentConfig(**dict(config))
    if not isinstance(config, ExperimentConfig):
        raise TypeError(f"launch() takes an ExperimentConfig or a dict of its keys, got {type(config).__name__}")
    return run_distributed(config.replace(engine="distributed", nproc=int(nproc)), run_dir, **kwargs)
