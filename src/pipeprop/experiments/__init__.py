"""Experiments: configs, the resumable runner, sweeps over methods and seeds, reports.

Needs the ``cli`` extra (pydantic, tqdm, matplotlib; ``track`` for TensorBoard); ``import pipeprop`` does
not import this package. :func:`run_experiment` runs a config with either engine into a run folder.
"""

from .config import DEFAULT_METHODS, ConfigError, ExperimentConfig, apply_overrides, list_configs, load_config, method_entry
from .run_folder import RunDirError
from .runner import Runner, evaluate, run_experiment

__all__ = [
    "DEFAULT_METHODS",
    "ConfigError",
    "ExperimentConfig",
    "RunDirError",
    "apply_overrides",
    "list_configs",
    "load_config",
    "method_entry",
    "Runner",
    "evaluate",
    "run_experiment",
]
