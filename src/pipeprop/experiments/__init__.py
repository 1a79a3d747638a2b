"""Experiments: configs, the resumable runner, sweeps over methods and seeds, reports.

Needs the ``cli`` extra (tqdm, matplotlib); ``import pipeprop`` does not import this package.
"""

from .config import DEFAULT_METHODS, ExperimentConfig, apply_overrides, list_configs, load_config, method_entry
from .runner import Runner, evaluate, run_experiment

__all__ = [
    "DEFAULT_METHODS",
    "ExperimentConfig",
    "apply_overrides",
    "list_configs",
    "load_config",
    "method_entry",
    "Runner",
    "evaluate",
    "run_experiment",
]
