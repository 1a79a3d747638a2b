"""Several runs of one architecture (seeds, learning rates) trained as one batched simulation.

A :class:`RunGroup` prepares one :class:`~pipeprop.experiments.runner.Runner` per run (data, seeded model,
stream, run folder), stacks their models with :func:`pipeprop.build_multi_simulator` and trains them with
the runner's own loop (:func:`~pipeprop.experiments.runner.train_loop`). Each run keeps its run folder with
the usual files; its ``checkpoint.pt`` holds its own state plus its slice of the stacked simulator and
optimizer state, so a stopped group resumes bit for bit (with the same grouping).

The runs must share every setting except ``seed`` and ``lr`` (:func:`group_key`); :func:`why_not_batched`
names what prevents batching (the distributed engine, dropout, a method ``train_many`` refuses, ...).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..multi_run import build_multi_simulator
from .builders import ModelFactory, build_lr_schedule, optimizer_options
from .checkpoint import load_checkpoint, save_checkpoint
from .config import ExperimentConfig
from .run_folder import RunDirError, claim_run_folder
from .runner import CHECKPOINT, Runner, _StopOnSignal, train_loop

__all__ = ["RunGroup", "group_key", "why_not_batched", "is_batched_checkpoint"]

#: config keys in which the runs of one group may differ
PER_RUN_KEYS = ("seed", "lr")

#: config keys that describe the experiment a run belongs to, not its training: runs of two named
#: experiments that differ only in these (and in seed and lr) may share a group
LABEL_KEYS = ("name", "description", "scale", "methods", "seeds", "est_sample_seconds", "progress")


def group_key(config: ExperimentConfig) -> str:
    """Runs with equal keys can be trained as one group (they differ at most in seed and learning rate, and in
    the labels of the experiment they belong to)."""
    d = config.to_dict()
    for k in PER_RUN_KEYS + LABEL_KEYS:
        d.pop(k, None)
    return json.dumps(d, sort_keys=True, default=str)


def why_not_batched(config: ExperimentConfig) -> Optional[str]:
    """Why runs of ``config`` cannot be batched before building anything (``None`` if they may be)."""
    if config.engine != "simulator":
        return f"engine {config.engine!r} trains one run per process group"
    if config.optimizer != "sgd":
        return f"optimizer {config.optimizer!r}: train_many supports the SGD-family update only"
    if config.precision != "32":
        return f"precision {config.precision!r}: batched runs use precision '32' (set the dtype with --dtype)"
    return None


def is_batched_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir/checkpoint.pt`` was written by a :class:`RunGroup` (it then resumes batched)."""
    path = Path(run_dir) / CHECKPOINT
    return path.is_file() and "batched" in load_checkpoint(path)


def _has_dropout(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())


def _slice_state(state: Any, k: int, num_runs: int) -> dict[str, Any]:
    """Run ``k``'s part of a stacked state: every tensor with leading dimension ``num_runs`` indexed at ``k``."""
    leaves, spec = tree_flatten(state)
    sliced = [isinstance(t, Tensor) and t.dim() >= 1 and t.shape[0] == num_runs for t in leaves]
    leaves = [t[k].clone() if s else t for t, s in zip(leaves, sliced)]
    return {"state": tree_unflatten(leaves, spec), "sliced": sliced}


def _stack_states(parts: Sequence[dict[str, Any]]) -> Any:
    """Inverse of :func:`_slice_state` over the runs' parts (exact: stacking the slices back)."""
    flat = [tree_flatten(p["state"]) for p in parts]
    sliced = parts[0]["sliced"]
    if any(p["sliced"] != sliced or len(f[0]) != len(flat[0][0]) for p, f in zip(parts, flat)):
        raise RunDirError("the checkpoints of these runs come from differently built simulators; rerun them with "
                          "--overwrite")
    leaves = [torch.stack([f[0][i] for f in flat]) if s else flat[0][0][i] for i, s in enumerate(sliced)]
    return tree_unflatten(leaves, flat[0][1])


class RunGroup(_StopOnSignal):
    """K runs (configs that differ at most in seed and lr) trained as one batched simulation."""

    def __init__(self, configs: Sequence[ExperimentConfig], run_dirs: Sequence[Path | str], *,
                 model_factory: Optional[ModelFactory] = None) -> None:
        if not configs or len(configs) != len(run_dirs):
            raise ValueError("RunGroup needs one run folder per config (and at least one run)")
        keys = {group_key(c) for c in configs}
        if len(keys) != 1:
            raise ValueError("the runs of a group may differ only in " + " and ".join(PER_RUN_KEYS))
        reason = why_not_batched(configs[0])
        if reason:
            raise ValueError(f"these runs cannot be batched: {reason}")
        self.runs = [Runner(c, d, model_factory=model_factory) for c, d in zip(configs, run_dirs)]
        self._stop_requested = False

    def setup(self) -> "RunGroup":
        for r in self.runs:
            r.prepare()
        lead = self.runs[0]
        cfg = lead.config
        if any(_has_dropout(r.model) for r in self.runs):
            raise ValueError("the model has dropout, whose random numbers one vmapped simulation cannot draw per run")
        shared = dataclasses.replace(lead.recipe, lr=0.0)
        if any(dataclasses.replace(r.recipe, lr=0.0) != shared for r in self.runs):
            raise ValueError("the scaled recipes of these runs differ in more than the learning rate")
        self.loss_fn = lead.task.stacked_loss_fn()
        self.multi = build_multi_simulator(
            [r.model for r in self.runs], self.loss_fn, loss_is_stacked=True, method=cfg.method,
            lr=[r.recipe.lr for r in self.runs], weight_decay=lead.recipe.weight_decay,
            partition=cfg.partition, delay_offset=cfg.delay_offset, check_finite=False,
            **lead.recipe.optimizer_kwargs(), **optimizer_options(cfg),
        )
        self.multi.optimizer.set_lr_schedule(build_lr_schedule(lead.recipe))
        for k, r in enumerate(self.runs):
            r.sim = self.multi.simulator
            r.run_index = k
        return self

    # ------------------------------------------------------------------ checkpoints
    def _save(self, runs: list[Runner]) -> None:
        group = self.multi.state_dict()
        for r in runs:
            state = {**r.run_state(), "batched": _slice_state(group, r.run_index, self.multi.num_runs)}
            save_checkpoint(r.run_dir / CHECKPOINT, state, config_hash=r.config.config_hash())

    def _load(self) -> None:
        states = [load_checkpoint(r.run_dir / CHECKPOINT, r.config.config_hash()) for r in self.runs]
        for r, st in zip(self.runs, states):
            if "batched" not in st:
                raise RunDirError(f"{r.run_dir} was started as a single run; resume it alone (--batch-runs 1)")
            r.load_run_state(st)
        group = _stack_states([st["batched"] for st in states])
        group["num_runs"] = len(self.runs)
        self.multi.load_state_dict(group)

    def _step(self, xs: list[Any], ys: list[Any]) -> tuple[Tensor, Tensor]:
        return self.multi.step(xs, ys), self.loss_fn.correct  # K losses and counts, read by train_loop in blocks

    # ------------------------------------------------------------------ training
    def run(self, *, resume: bool = False, overwrite: bool = False, stop_after_steps: Optional[int] = None,
            show_progress: Optional[bool] = None) -> list[dict[str, Any]]:
        """Train all runs to the end (or until stopped); returns their summaries (also in each ``summary.json``)."""
        for r in self.runs:
            claim_run_folder(r.run_dir, r.config, resume=resume, overwrite=overwrite)
        if resume:
            self._load()
        for r in self.runs:
            r.open_files(resume)
        handlers = self._install_signal_handlers()
        show = self.runs[0].config.progress if show_progress is None else show_progress
        try:
            statuses = train_loop(self.runs, self._step, self._save, self.multi.write_back,
                                  stop_requested=lambda: self._stop_requested, stop_after_steps=stop_after_steps,
                                  show_progress=show)
        finally:
            self._restore_signal_handlers(handlers)
            for r in self.runs:
                r.close_files()
        return [r._finish(s) for r, s in zip(self.runs, statuses)]
