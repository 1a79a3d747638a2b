"""``launch(nproc, config)``: run the distributed engine on this machine through ``torchrun`` and return its results.

This is the stable Python entry point behind ``pipeprop train --engine distributed --nproc N``::

    from pipeprop.distributed import launch
    result = launch(2, ["--model", "mlp", "--method", "pb+sc+lwp", "--samples", "1000", "--out", "runs/d"])
    result["losses"][-1], result["samples_per_second"], result["ranks"][0]["busy_fraction"]

The configuration is checked here first (unknown backend or method, more processes than stages, ...),
so bad input raises ``ValueError`` before any process starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from .config import DistributedConfig, parse_args

__all__ = ["launch", "DistributedRunError", "as_config"]

ConfigLike = Union[Sequence[str], DistributedConfig, Mapping[str, Any], Any]


class DistributedRunError(RuntimeError):
    """A distributed run failed; ``errors`` maps rank to its error message, ``returncode`` is torchrun's."""

    def __init__(self, message: str, returncode: int, errors: dict[int, str], output: str = "") -> None:
        super().__init__(message)
        self.returncode, self.errors, self.output = returncode, errors, output


def as_config(argv_or_config: ConfigLike, **overrides: Any) -> DistributedConfig:
    """A :class:`DistributedConfig` from argv, itself, an ``ExperimentConfig`` or a dict of experiment keys."""
    if isinstance(argv_or_config, DistributedConfig):
        cfg = argv_or_config
    elif isinstance(argv_or_config, (list, tuple)):
        cfg = parse_args([str(a) for a in argv_or_config])
    elif hasattr(argv_or_config, "to_dict") or isinstance(argv_or_config, Mapping):
        data = argv_or_config.to_dict() if hasattr(argv_or_config, "to_dict") else dict(argv_or_config)
        if "out" not in overrides:
            overrides["out"] = str(Path("runs") / f"{data.get('name', 'run')}-{str(data.get('method', 'pb')).replace('+', '-')}-distributed")
        return DistributedConfig.from_experiment(data, **overrides)
    else:
        raise TypeError(f"launch() takes argv (a list of strings) or a config, got {type(argv_or_config).__name__}")
    if overrides:
        cfg = DistributedConfig(**{**cfg.to_dict(), **overrides})
    return cfg


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


def launch(
    nproc: int,
    argv_or_config: ConfigLike,
    *,
    timeout: Optional[float] = None,
    env: Optional[Mapping[str, str]] = None,
    capture_output: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Run ``torchrun --standalone --nproc_per_node=nproc -m pipeprop.distributed ...`` and return ``result.json``.

    Args:
        nproc: processes (ranks) on this machine; at most the number of pipeline stages.
        argv_or_config: ``python -m pipeprop.distributed`` arguments, a :class:`DistributedConfig`, a
            :class:`pipeprop.experiments.ExperimentConfig` (as ``pipeprop train`` builds it) or a dict of
            its keys.
        timeout: seconds for the whole run (``None``: no limit; each rank has its own per-wait timeout).
        env: extra environment variables (``OMP_NUM_THREADS`` defaults to 1 per process).
        capture_output: capture torchrun's output (it is then attached to a :class:`DistributedRunError`).
        overrides: :class:`DistributedConfig` fields, e.g. ``out="runs/x"``, ``backend="gloo"``.

    Returns:
        The run's ``result.json``: ``losses`` (per micro-batch), ``ranks`` (per-rank wall, compute, wait,
        busy fraction, stages), ``samples_per_second``, ``final_test_acc``, ``completed`` and the config.
        The final weights are in ``<out>/model.pt``.
    """
    from .worker import EXIT_CONFIG, prepare

    if int(nproc) < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    cfg = as_config(argv_or_config, **overrides)
    prepare(cfg, int(nproc))  # bad configuration fails here, before any process starts
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [out / "result.json", *(out / "errors").glob("rank*.txt")]:
        stale.unlink(missing_ok=True)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={int(nproc)}",
        "--max_restarts=0", "-m", "pipeprop.distributed", *cfg.to_argv(),
    ]
    run_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
    try:
        proc = subprocess.run(cmd, env=run_env, timeout=timeout, capture_output=capture_output, text=True)
    except subprocess.TimeoutExpired as err:
        raise DistributedRunError(f"the distributed run exceeded {timeout}s and was stopped", -1, _errors(out)) from err
    output = ((proc.stdout or "") + (proc.stderr or "")) if capture_output else ""
    if proc.returncode != 0:
        errors = _errors(out)
        detail = "; ".join(f"rank {r}: {m}" for r, m in sorted(errors.items())) or "see the output above"
        kind = "configuration rejected" if proc.returncode == EXIT_CONFIG else "failed"
        raise DistributedRunError(f"distributed run {kind} (torchrun exit {proc.returncode}): {detail}", proc.returncode, errors, output)
    result_path = out / "result.json"
    if not result_path.is_file():
        raise DistributedRunError(f"the run ended without writing {result_path}", proc.returncode, _errors(out), output)
    result = json.loads(result_path.read_text())
    result["out"] = str(out)
    return result
