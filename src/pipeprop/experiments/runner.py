"""Run one experiment: seeded, deterministic, resumable, with progress bar, metrics, checkpoints and plots.

:func:`run_experiment` is the one entry point for both engines (``config.engine``): the exact simulator
runs here in :class:`Runner`; the distributed engine runs through :mod:`pipeprop.distributed.launcher`.
Both use the same run folder (:mod:`.run_folder`), builders (:mod:`.builders`) and checkpoint files
(:mod:`.checkpoint`). What depends on the task (image classification or language modelling: data
stream, loss, evaluation) comes from :mod:`.tasks`.

``--resume`` restores the model, the optimizer (velocities, each stage's update count and so its
learning rate), the simulator (weight-version rings and step), the data stream (order and random state),
the metrics so far and the running training statistics, so an interrupted and resumed run ends with the
same weights and metrics (except wall-clock times) as one that was never interrupted.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..api import build_simulator
from ..rng import get_rng_state, set_rng_state
from ..simulator import DivergenceError
from .builders import ModelFactory, build_dataset, build_lr_schedule, build_model, build_stream, optimizer_options
from .checkpoint import load_checkpoint, save_checkpoint
from .config import ExperimentConfig
from .run_folder import RunDirError, TrainWindow, claim_run_folder, make_summary, write_config_json, write_metrics, write_summary
from .tasks import evaluate, task_of
from .tracking import open_logger

__all__ = ["Runner", "StepResults", "run_experiment", "train_loop", "evaluate", "RunDirError", "STATUSES"]

STATUSES = ("completed", "diverged", "interrupted", "stopped")
CHECKPOINT = "checkpoint.pt"


@dataclass
class _Progress:
    """Counters that a checkpoint must carry besides the module states."""

    samples: int = 0
    steps: int = 0
    loss_sum: float = 0.0  # training statistics since the last evaluation
    correct: int = 0
    count: int = 0
    elapsed: float = 0.0
    diverged_at: Optional[int] = None


class StepResults:
    """The losses and correct counts of the steps since the last host read, kept as tensors.

    The training loop adds each step's ``(loss, correct)`` as the engine returns them (a loss tensor, one
    entry per run or a scalar; ``correct`` a tensor or an ``int``) without reading them, and :meth:`read`
    brings the whole block to the host in one ``.tolist()``: one device synchronisation per block instead of
    one per step. The values read are the ``float``/``int`` of each entry, exactly as per-step reads give.
    """

    def __init__(self, num_runs: int) -> None:
        self.num_runs = num_runs
        self.sizes: list[int] = []
        self.losses: list[torch.Tensor] = []
        self.corrects: list[Any] = []

    def __len__(self) -> int:
        return len(self.sizes)

    def add(self, loss: Any, correct: Any, samples: int) -> None:
        """One step's results (not read) for ``samples`` samples per run."""
        self.sizes.append(samples)
        self.losses.append(loss if isinstance(loss, torch.Tensor) else torch.tensor(float(loss)))
        self.corrects.append(correct)

    def read(self) -> list[tuple[int, list[float], list[int]]]:
        """Per step: ``(samples, loss of each run, correct of each run)``; empties the block."""
        if not self.sizes:
            return []
        k, steps = self.num_runs, len(self.sizes)
        losses = torch.stack(self.losses).reshape(steps, k)
        dtype = torch.promote_types(losses.dtype, torch.float32)  # exact for both: a float's float, a count < 2**24
        if all(isinstance(c, torch.Tensor) for c in self.corrects):
            corrects = torch.stack(self.corrects).reshape(steps, k).to(losses.device, dtype)
            loss_rows, correct_rows = torch.stack((losses.to(dtype), corrects)).tolist()  # the one host read
        else:
            loss_rows = losses.tolist()
            correct_rows = [c.reshape(-1).expand(k).tolist() if isinstance(c, torch.Tensor) else [int(c)] * k
                            for c in self.corrects]
        out = [(n, [float(v) for v in ls], [int(c) for c in cs])
               for n, ls, cs in zip(self.sizes, loss_rows, correct_rows)]
        self.sizes, self.losses, self.corrects = [], [], []
        return out


class _StopOnSignal:
    """The first Ctrl-C/SIGTERM asks the training loop to stop at the next step (with a checkpoint)."""

    _stop_requested = False

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_requested:  # second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self._stop_requested = True

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, self._on_signal)
        return old

    @staticmethod
    def _restore_signal_handlers(old: dict[int, Any]) -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)


class Runner(_StopOnSignal):
    """One simulator run of ``config`` in ``run_dir`` (build with :meth:`setup`, then :meth:`run`).

    A :class:`~pipeprop.experiments.run_group.RunGroup` trains several prepared runners (:meth:`prepare`)
    as one batched simulation; each keeps its run folder, metrics, stream and checkpoint.
    """

    def __init__(self, config: ExperimentConfig, run_dir: Path | str, *, model_factory: Optional[ModelFactory] = None) -> None:
        if config.engine != "simulator":
            raise ValueError("Runner runs the simulator; use run_experiment() for engine='distributed'")
        self.config = config
        self.run_dir = Path(run_dir)
        self.model_factory = model_factory
        self.metrics: list[dict[str, Any]] = []
        self.progress = _Progress()
        self._stop_requested = False
        self._logger: Any = None
        self.run_index: Optional[int] = None  # this run's index in a batched group (None: trained alone)

    # ------------------------------------------------------------------ construction
    def prepare(self) -> "Runner":
        """Everything of the run except its simulator: data, recipe, model (seeded), stream, intervals."""
        cfg = self.config
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        torch.manual_seed(cfg.seed)
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but CUDA is not available; use device='cpu'")
        self.dtype = getattr(torch, cfg.dtype)
        self.task = task_of(cfg)
        self.data = build_dataset(cfg, self.task)
        self.train_size = self.task.train_size(self.data)
        self.recipe = cfg.scaled(self.train_size)
        self.model = build_model(cfg, self.data, self.model_factory, self.task).to(self.device)
        self.total_steps = self.recipe.total_samples // cfg.micro_batch
        self.stream = build_stream(cfg, self.data, self.total_steps, self.device, self.task)
        self.eval_every = cfg.eval_interval(self.recipe.total_samples)
        self.checkpoint_every = cfg.checkpoint_every or self.eval_every
        self.window = TrainWindow(cfg.train_window or self.eval_every)
        return self

    def setup(self) -> "Runner":
        self.prepare()
        cfg = self.config
        self.loss_fn = self.task.loss_fn()
        self.sim = build_simulator(
            self.model,
            self.loss_fn,
            method=cfg.method,
            lr=self.recipe.lr,
            weight_decay=self.recipe.weight_decay,
            **self.recipe.optimizer_kwargs(),
            partition=cfg.partition,
            delay_offset=cfg.delay_offset,
            precision=cfg.precision,
            example_input=self.task.example_input(cfg, self.data, self.dtype, self.device),
            **optimizer_options(cfg),
        )
        self.sim.optimizer.set_lr_schedule(build_lr_schedule(self.recipe))
        self.sim.check_finite = False  # the training loop checks the losses when it reads them (no read per step)
        return self

    @property
    def delays(self) -> list[int]:
        return [int(g.get("delay", 0)) for g in self.sim.optimizer.param_groups]

    def current_lr(self) -> float:
        """The first stage's learning rate now (this run's entry of a batched group's per-run rates)."""
        lr = self.sim.optimizer._group_lr(self.sim.optimizer.param_groups[0])
        if isinstance(lr, torch.Tensor):
            lr = lr.reshape(-1)[self.run_index or 0] if lr.dim() else lr
            return float(lr)
        return lr

    # ------------------------------------------------------------------ state
    def run_state(self) -> dict[str, Any]:
        """The run's own state (model, stream, metrics, counters), without the simulator's."""
        return {
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "stream": self.stream.state_dict(),
            "metrics": json.dumps(self.metrics),
            "progress": dict(vars(self.progress)),
            "window": json.dumps(self.window.entries),
            "torch_rng": get_rng_state(),
        }

    def load_run_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.stream.load_state_dict(state["stream"])
        self.metrics = json.loads(state["metrics"])
        self.progress = _Progress(**state["progress"])
        self.window = TrainWindow(self.window.size, json.loads(state["window"]))
        set_rng_state(state["torch_rng"])

    def state_dict(self) -> dict[str, Any]:
        return {**self.run_state(), "optimizer": self.sim.optimizer.state_dict(), "simulator": self.sim.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "batched" in state:
            raise RunDirError(f"{self.run_dir} was trained in a batched group of runs: resume it with `pipeprop "
                              "compare`/`reproduce` (the same command), which resumes batched runs batched")
        self.load_run_state(state)
        self.sim.optimizer.load_state_dict(state["optimizer"])
        self.sim.load_state_dict(state["simulator"])

    def save(self) -> None:
        save_checkpoint(self.run_dir / CHECKPOINT, self.state_dict(), config_hash=self.config.config_hash())

    # ------------------------------------------------------------------ files
    def summary(self, status: str) -> dict[str, Any]:
        p = self.progress
        return make_summary(self.config, status=status, metrics=self.metrics, recipe=self.recipe, samples=p.samples,
                            steps=p.steps, elapsed=p.elapsed, delays=self.delays, window=self.window,
                            diverged_at=p.diverged_at, **self.task.info(self.data))

    def _finish(self, status: str) -> dict[str, Any]:
        summary = self.summary(status)
        cfg = self.config
        write_summary(self.run_dir, summary, self.metrics, f"{cfg.name}: {cfg.method} (b={cfg.micro_batch})")
        return summary

    def open_files(self, resume: bool) -> None:
        """Write ``config.json`` and open the experiment logger (after a resume: from the restored sample)."""
        write_config_json(self.run_dir, self.config, recipe=self.recipe, delays=self.delays, train_size=self.train_size,
                          test_size=self.task.test_size(self.data), eval_every=self.eval_every,
                          train_window=self.window.size, task=self.task.name, **self.task.info(self.data))
        self._logger = open_logger(self.config.logger, self.run_dir, resume_at=self.progress.samples if resume else None)

    def close_files(self) -> None:
        if self._logger is not None:
            self._logger.close()

    # ------------------------------------------------------------------ training
    def _record(self, t0: float) -> None:
        p = self.progress
        test = self.task.evaluate(self.model, self.data, self.config, self.dtype, self.device)
        rec = {
            "samples": p.samples,
            "step": p.steps,
            "epoch": round(p.samples / self.train_size, 6),
            "lr": self.current_lr(),
            "train_loss": p.loss_sum / p.count if p.count else None,
        }
        if "test_acc" in self.task.eval_keys:
            rec["train_acc"] = p.correct / p.count if p.count else None
        rec.update(test)
        rec["time"] = round(p.elapsed + time.perf_counter() - t0, 3)
        self.metrics.append(rec)
        if self._logger is not None:
            self._logger.log(rec)
        p.loss_sum, p.correct, p.count = 0.0, 0, 0
        write_metrics(self.run_dir, self.metrics)
        if test["test_loss"] is None:
            raise DivergenceError(p.steps, float("nan"))

    def run(self, *, resume: bool = False, overwrite: bool = False, stop_after_steps: Optional[int] = None,
            show_progress: Optional[bool] = None) -> dict[str, Any]:
        """Train to the end (or until stopped); returns the summary (also written to ``summary.json``)."""
        claim_run_folder(self.run_dir, self.config, resume=resume, overwrite=overwrite)
        if resume:
            self.load_state_dict(load_checkpoint(self.run_dir / CHECKPOINT, self.config.config_hash()))
            prev = self.run_dir / "summary.json"
            if self.progress.samples >= self.recipe.total_samples and prev.is_file():
                return json.loads(prev.read_text())
        self.open_files(resume)
        handlers = self._install_signal_handlers()
        try:
            status = self._loop(stop_after_steps, self.config.progress if show_progress is None else show_progress)
        finally:
            self._restore_signal_handlers(handlers)
            self.close_files()
        return self._finish(status)

    def _step(self, xs: list[Any], ys: list[Any]) -> tuple[Any, Any]:
        loss = self.sim.step(xs[0], ys[0], sync=False)  # a tensor: read by the training loop in blocks
        return loss, self.loss_fn.correct

    def _loop(self, stop_after_steps: Optional[int], show_progress: bool) -> str:
        return train_loop([self], self._step, lambda runs: [r.save() for r in runs], lambda: None,
                          stop_requested=lambda: self._stop_requested, stop_after_steps=stop_after_steps,
                          show_progress=show_progress)[0]


def train_loop(runs: list[Runner], step: Callable[[list[Any], list[Any]], tuple[Any, Any]],
               save: Callable[[list[Runner]], Any], sync_weights: Callable[[], None], *,
               stop_requested: Callable[[], bool], stop_after_steps: Optional[int], show_progress: bool) -> list[str]:
    """The training loop of one run or of a batched group of runs (which share every setting but seed and lr).

    ``step(xs, ys)`` trains on one micro-batch per run and returns ``(loss, correct)``: the loss as a tensor
    (a scalar, or one entry per run) and the correct predictions (a tensor of the same shape, or an ``int``),
    neither read yet. The loop reads them to the host in blocks (:class:`StepResults`): when the progress bar
    shows new numbers (every ``256 // micro_batch`` steps), before an evaluation, a checkpoint, a stop and at
    the end; it then accounts every step of the block as if read one by one. ``sync_weights()`` makes each
    run's model hold its live weights before an evaluation; ``save(runs)`` checkpoints those runs. A run whose
    loss is not finite (or whose running mean exceeds ``divergence_loss``) is diverged at that step, its later
    steps not counted (status ``"diverged"``), while the others go on. Returns each run's status.
    """
    from tqdm.auto import tqdm

    lead = runs[0]
    cfg = lead.config
    total = lead.recipe.total_samples
    samples, steps = lead.progress.samples, lead.progress.steps
    if any((r.progress.samples, r.progress.steps) != (samples, steps) for r in runs):
        raise RunDirError("the runs of a batched group were checkpointed at different steps ("
                          + ", ".join(f"{r.run_dir}: {r.progress.samples}" for r in runs)
                          + " samples); rerun them with --overwrite")
    t0 = time.perf_counter()
    limit = cfg.divergence_loss
    postfix_every = max(1, 256 // cfg.micro_batch)
    status = ["completed"] * len(runs)
    done = [False] * len(runs)
    pending = StepResults(len(runs))

    def active() -> list[int]:
        return [i for i in range(len(runs)) if not done[i]]

    def diverge(i: int, err: DivergenceError) -> None:
        r = runs[i]
        r.progress.diverged_at = r.progress.samples
        r.progress.elapsed += time.perf_counter() - t0
        status[i], done[i] = "diverged", True
        print(f"\n{r.run_dir}: {err}", file=sys.stderr)

    def account() -> None:
        """Read the pending steps (one host read) and add them to each active run, step by step."""
        for n, losses, corrects in pending.read():
            for i in active():
                loss, correct = losses[i], corrects[i]
                p = runs[i].progress
                if not math.isfinite(loss):
                    diverge(i, DivergenceError(p.steps, loss, run=i if len(runs) > 1 else None))
                    continue
                p.samples += n
                p.steps += 1
                p.loss_sum += loss * n
                p.correct += correct
                p.count += n
                runs[i].window.add(n, loss * n, correct)
                if limit is not None and p.loss_sum / p.count > limit:
                    diverge(i, DivergenceError(p.steps, p.loss_sum / p.count))

    def record() -> None:
        sync_weights()
        for i in active():
            try:
                runs[i]._record(t0)
            except DivergenceError as err:
                diverge(i, err)

    def add_elapsed() -> float:
        now = time.perf_counter()
        for i in active():
            runs[i].progress.elapsed += now - t0
        return now

    desc = f"{cfg.method} b={cfg.micro_batch}" + (f" x{len(runs)} runs" if len(runs) > 1 else "")
    try:
        if not lead.metrics:
            record()
        with tqdm(total=total, initial=samples, unit="sample", unit_scale=True, dynamic_ncols=True,
                  disable=not show_progress, desc=desc, file=sys.stderr) as bar:
            for batch in zip(*(r.stream for r in runs)):
                if not active():
                    break
                xs, ys = [x for x, _ in batch], [y for _, y in batch]
                try:
                    loss, correct = step(xs, ys)
                except DivergenceError as err:  # an engine that checks its loss itself
                    account()
                    i = err.run or 0
                    if not done[i]:
                        diverge(i, err)
                    break
                n = int(ys[0].shape[0])
                pending.add(loss, correct, n)
                before = samples
                samples += n
                steps += 1
                bar.update(n)
                evaluate = samples // lead.eval_every > before // lead.eval_every or samples >= total
                checkpoint = samples // lead.checkpoint_every > before // lead.checkpoint_every
                stopping = stop_requested() or (stop_after_steps is not None and steps >= stop_after_steps)
                if not (evaluate or checkpoint or stopping or steps % postfix_every == 0):
                    continue
                account()  # a sync point: the block's losses come to the host here
                if not active():
                    break
                if evaluate:
                    record()
                shown = active()
                if shown and (steps % postfix_every == 0 or samples >= total):
                    r = runs[shown[0]]
                    p, last = r.progress, r.metrics[-1]
                    if p.count:
                        bar.set_postfix(_postfix(p, last), refresh=False)
                if stopping or checkpoint:
                    t0 = add_elapsed()
                    sync_weights()
                    save([runs[i] for i in active()])
                if stopping and samples < total:
                    for i in active():
                        status[i] = "interrupted" if stop_requested() else "stopped"
                    break
            account()  # a stream that ended early
    except KeyboardInterrupt:
        account()
        t0 = add_elapsed()
        for i in active():
            status[i] = "interrupted"
        print(f"\ninterrupted; the last checkpoint in {', '.join(str(runs[i].run_dir) for i in active())} may be behind",
              file=sys.stderr)
    add_elapsed()
    completed = [runs[i] for i in range(len(runs)) if status[i] == "completed"]
    if completed:
        sync_weights()
        save(completed)
    return status


def _postfix(p: _Progress, last: dict[str, Any]) -> dict[str, str]:
    """The progress bar's running numbers: train loss (and accuracy), the last evaluation's headline."""
    shown = {"loss": f"{p.loss_sum / p.count:.3f}"}
    if "test_acc" in last:
        shown["acc"] = f"{p.correct / p.count:.3f}"
        shown["test_acc"] = f"{last['test_acc']:.3f}"
    elif last.get("test_loss") is not None:
        shown["test_loss"] = f"{last['test_loss']:.3f}"
    return shown


def run_experiment(config: ExperimentConfig, run_dir: Path | str, *, resume: bool = False, overwrite: bool = False,
                   stop_after_steps: Optional[int] = None, model_factory: Optional[ModelFactory] = None,
                   show_progress: Optional[bool] = None) -> dict[str, Any]:
    """Build and run one experiment with its engine (``config.engine``); returns its summary.

    ``stop_after_steps`` stops (with a checkpoint, status ``"stopped"``) after that many micro-batches
    (simulator) or pipeline steps (distributed).
    """
    if config.engine == "distributed":
        if model_factory is not None:
            raise ValueError("the distributed engine builds the model on every rank from the config: give the model "
                             "as a name or 'module:function', not model_factory")
        from ..distributed.launcher import run_distributed

        return run_distributed(config, run_dir, resume=resume, overwrite=overwrite, stop_after_steps=stop_after_steps,
                               show_progress=show_progress)
    runner = Runner(config, run_dir, model_factory=model_factory).setup()
    return runner.run(resume=resume, overwrite=overwrite, stop_after_steps=stop_after_steps, show_progress=show_progress)
