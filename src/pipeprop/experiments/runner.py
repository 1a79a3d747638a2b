"""Run one experiment: seeded, deterministic, resumable, with progress bar, metrics, checkpoints and plots.

A run directory holds::

    config.json      the resolved config, the scaled recipe and the stage delays
    metrics.jsonl    one JSON record per evaluation (samples, lr, train/test loss and accuracy, time)
    summary.json     status ("completed", "diverged", "interrupted", "stopped"), final and best numbers
    checkpoint.pt    everything needed to continue bit-exactly (written atomically)
    curves.png       loss and accuracy against samples

``--resume`` restores the model, the optimizer (velocities), the simulator (weight-version rings and
step), the data stream (order and random state), the learning-rate scheduler, the metrics so far and the
running training statistics, so an interrupted and resumed run ends with the same weights and metrics
(except wall-clock times) as one that was never interrupted.
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
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..api import build_simulator
from ..data import ImageDataset, MicroBatchStream
from ..simulator import DivergenceError
from .builders import ModelFactory, build_augment, build_dataset, build_model
from .checkpoint import CheckpointError, atomic_write_text, load_checkpoint, save_checkpoint
from .config import ExperimentConfig
from .lr_schedule import make_scheduler

__all__ = ["Runner", "run_experiment", "evaluate", "RunDirError", "STATUSES"]

STATUSES = ("completed", "diverged", "interrupted", "stopped")
CHECKPOINT = "checkpoint.pt"


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (e.g. it already holds another run)."""


class _TrackedCrossEntropy:
    """Cross-entropy that also counts the correct predictions of the last call (the simulator returns only the loss)."""

    def __init__(self) -> None:
        self.correct = 0

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        self.correct = int((output.detach().argmax(dim=1) == target).sum())
        return F.cross_entropy(output, target)


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageDataset, *, batch: int = 500, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (live weights, eval mode) on the test split."""
    was_training = model.training
    model.eval()
    split = data.test
    loss_sum, correct = 0.0, 0
    try:
        for start in range(0, len(split), batch):
            x = data.normalize(split.images[start : start + batch], dtype).to(device)
            y = split.labels[start : start + batch].to(device)
            out = model(x)
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(dim=1) == y).sum())
    finally:
        model.train(was_training)
    n = max(1, len(split))
    return loss_sum / n, correct / n


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


class Runner:
    """One training run of ``config`` in ``run_dir`` (build with :meth:`setup`, then :meth:`run`)."""

    def __init__(self, config: ExperimentConfig, run_dir: Path | str, *, model_factory: Optional[ModelFactory] = None) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.model_factory = model_factory
        self.metrics: list[dict[str, Any]] = []
        self.progress = _Progress()
        self._stop_requested = False

    # ------------------------------------------------------------------ construction
    def setup(self) -> "Runner":
        cfg = self.config
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        torch.manual_seed(cfg.seed)
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but CUDA is not available; use device='cpu'")
        self.dtype = getattr(torch, cfg.dtype)
        self.data = build_dataset(cfg)
        self.train_size = len(self.data.train)
        self.recipe = cfg.scaled(self.train_size)
        self.model = build_model(cfg, self.data, self.model_factory).to(self.device)
        self.loss_fn = _TrackedCrossEntropy()
        self.sim = build_simulator(
            self.model,
            self.loss_fn,
            method=cfg.method,
            lr=self.recipe.lr,
            weight_decay=self.recipe.weight_decay,
            **self.recipe.optimizer_kwargs(),
            partition=cfg.partition,
            delay_offset=cfg.delay_offset,
            **cfg.method_options,
        )
        b = cfg.micro_batch
        steps_per_epoch = self.train_size // b
        if steps_per_epoch == 0:
            raise ValueError(f"micro_batch {b} is larger than the training set ({self.train_size} examples)")
        self.total_steps = self.recipe.total_samples // b
        self.stream = MicroBatchStream(
            self.data,
            batch_size=b,
            epochs=self.total_steps / steps_per_epoch,
            seed=cfg.seed,
            augment=build_augment(cfg, self.data),
            dtype=self.dtype,
            device=self.device,
        )
        self.stream.total_steps = self.total_steps  # exact, independent of float rounding
        self.scheduler = make_scheduler(self.sim.optimizer, self.recipe)
        self.eval_every = cfg.eval_every or max(b, self.recipe.total_samples // 20)
        self.checkpoint_every = cfg.checkpoint_every or self.eval_every
        return self

    @property
    def delays(self) -> list[int]:
        return [int(g.get("delay", 0)) for g in self.sim.optimizer.param_groups]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        sched = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        return {
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.sim.optimizer.state_dict(),
            "simulator": self.sim.state_dict(),
            "stream": self.stream.state_dict(),
            "scheduler": sched,
            "metrics": json.dumps(self.metrics),
            "progress": dict(vars(self.progress)),
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = ExperimentConfig(**state["config"]).result_dict()
        mine = self.config.result_dict()
        diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if diff:
            detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {mine.get(k)!r}" for k in diff)
            raise CheckpointError(
                f"the checkpoint in {self.run_dir} was written by a different config ({detail}); resume with the "
                "same settings or use a new output directory"
            )
        self.model.load_state_dict(state["model"])
        self.sim.optimizer.load_state_dict(state["optimizer"])
        self.sim.load_state_dict(state["simulator"])
        self.stream.load_state_dict(state["stream"])
        sched = dict(state["scheduler"])
        sched["lr_lambdas"] = [None] * len(self.sim.optimizer.param_groups)
        self.scheduler.load_state_dict(sched)
        self.metrics = json.loads(state["metrics"])
        self.progress = _Progress(**state["progress"])
        torch.set_rng_state(state["torch_rng"])

    def save(self) -> None:
        save_checkpoint(self.run_dir / CHECKPOINT, self.state_dict())

    # ------------------------------------------------------------------ files
    def _write_config(self) -> None:
        import pipeprop

        info = {
            "config": self.config.to_dict(),
            "scaled_recipe": self.recipe.to_dict(),
            "num_stages": len(self.delays),
            "delays": self.delays,
            "train_size": self.train_size,
            "test_size": len(self.data.test),
            "pipeprop_version": pipeprop.__version__,
            "torch_version": torch.__version__,
            "command": sys.argv,
        }
        atomic_write_text(self.run_dir / "config.json", json.dumps(info, indent=2, default=str) + "\n")

    def _write_metrics(self) -> None:
        atomic_write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in self.metrics))

    def summary(self, status: str) -> dict[str, Any]:
        tests = [m["test_acc"] for m in self.metrics if m.get("test_acc") is not None]
        last = self.metrics[-1] if self.metrics else {}
        elapsed = self.progress.elapsed
        return {
            "name": self.config.name,
            "status": status,
            "method": self.config.method,
            "micro_batch": self.config.micro_batch,
            "seed": self.config.seed,
            "model": self.config.model,
            "dataset": self.config.dataset,
            "samples": self.progress.samples,
            "steps": self.progress.steps,
            "total_samples": self.recipe.total_samples,
            "final_test_acc": last.get("test_acc"),
            "final_test_loss": last.get("test_loss"),
            "final_train_loss": last.get("train_loss"),
            "final_train_acc": last.get("train_acc"),
            "best_test_acc": max(tests) if tests else None,
            "diverged_at": self.progress.diverged_at,
            "wall_seconds": round(elapsed, 3),
            "samples_per_second": round(self.progress.samples / elapsed, 2) if elapsed > 0 else None,
            "num_stages": len(self.delays),
            "max_delay": max(self.delays) if self.delays else 0,
            "lr": self.recipe.lr,
            "momentum": self.recipe.momentum,
        }

    def _finish(self, status: str) -> dict[str, Any]:
        from .plots import plot_run

        self._write_metrics()
        summary = self.summary(status)
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        if self.metrics:
            try:
                plot_run(self.metrics, self.run_dir / "curves.png", title=f"{self.config.name}: {self.config.method} (b={self.config.micro_batch})")
            except Exception as err:  # noqa: BLE001 - a plotting failure must not lose the run
                print(f"warning: could not plot {self.run_dir}: {err}", file=sys.stderr)
        return summary

    # ------------------------------------------------------------------ training
    def _record(self, t0: float) -> None:
        p = self.progress
        test_loss, test_acc = evaluate(self.model, self.data, batch=self.config.eval_batch, dtype=self.dtype, device=self.device)
        rec = {
            "samples": p.samples,
            "step": p.steps,
            "epoch": round(p.samples / self.train_size, 6),
            "lr": self.sim.optimizer.param_groups[0]["lr"],
            "train_loss": p.loss_sum / p.count if p.count else None,
            "train_acc": p.correct / p.count if p.count else None,
            "test_loss": test_loss if math.isfinite(test_loss) else None,
            "test_acc": test_acc,
            "time": round(p.elapsed + time.perf_counter() - t0, 3),
        }
        self.metrics.append(rec)
        p.loss_sum, p.correct, p.count = 0.0, 0, 0
        self._write_metrics()
        if not math.isfinite(test_loss):
            raise DivergenceError(p.steps, test_loss)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_requested:  # second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self._stop_requested = True

    def run(self, *, resume: bool = False, overwrite: bool = False, stop_after_steps: Optional[int] = None,
            show_progress: Optional[bool] = None) -> dict[str, Any]:
        """Train to the end (or until stopped); returns the summary (also written to ``summary.json``)."""
        ckpt = self.run_dir / CHECKPOINT
        if resume:
            self.load_state_dict(load_checkpoint(ckpt))
            prev = self.run_dir / "summary.json"
            if self.progress.samples >= self.recipe.total_samples and prev.is_file():
                return json.loads(prev.read_text())
        elif (ckpt.exists() or (self.run_dir / "summary.json").exists()) and not overwrite:
            raise RunDirError(
                f"{self.run_dir} already holds a run: continue it with --resume, or pass --overwrite "
                "(or choose another --out)"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        handlers = self._install_signal_handlers()
        try:
            status = self._loop(stop_after_steps, self.config.progress if show_progress is None else show_progress)
        finally:
            self._restore_signal_handlers(handlers)
        return self._finish(status)

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

    def _loop(self, stop_after_steps: Optional[int], show_progress: bool) -> str:
        from tqdm.auto import tqdm

        p = self.progress
        total = self.recipe.total_samples
        t0 = time.perf_counter()
        limit = self.config.divergence_loss
        postfix_every = max(1, 256 // self.config.micro_batch)
        status = "completed"
        try:
            if not self.metrics:
                self._record(t0)
            with tqdm(total=total, initial=p.samples, unit="sample", unit_scale=True, dynamic_ncols=True,
                      disable=not show_progress, desc=f"{self.config.method} b={self.config.micro_batch}",
                      file=sys.stderr) as bar:
                for x, y in self.stream:
                    loss = self.sim.step(x, y)
                    self.scheduler.step()
                    n = int(y.shape[0])
                    before = p.samples
                    p.samples += n
                    p.steps += 1
                    p.loss_sum += loss * n
                    p.correct += self.loss_fn.correct
                    p.count += n
                    if limit is not None and p.loss_sum / p.count > limit:
                        raise DivergenceError(p.steps, p.loss_sum / p.count)
                    if p.samples // self.eval_every > before // self.eval_every or p.samples >= total:
                        self._record(t0)
                    bar.update(n)
                    if p.steps % postfix_every == 0 or p.samples >= total:
                        last = self.metrics[-1]
                        if p.count:
                            bar.set_postfix(loss=f"{p.loss_sum / p.count:.3f}", acc=f"{p.correct / p.count:.3f}",
                                            test_acc=f"{last['test_acc']:.3f}", refresh=False)
                    stopping = self._stop_requested or (stop_after_steps is not None and p.steps >= stop_after_steps)
                    if stopping or p.samples // self.checkpoint_every > before // self.checkpoint_every:
                        p.elapsed += time.perf_counter() - t0
                        t0 = time.perf_counter()
                        self.save()
                    if stopping and p.samples < total:
                        status = "interrupted" if self._stop_requested else "stopped"
                        break
        except DivergenceError as err:
            p.diverged_at = p.samples
            status = "diverged"
            print(f"\n{self.run_dir}: {err}", file=sys.stderr)
        except KeyboardInterrupt:
            p.elapsed += time.perf_counter() - t0
            t0 = time.perf_counter()
            status = "interrupted"
            print(f"\ninterrupted; the last checkpoint in {self.run_dir} may be behind", file=sys.stderr)
        p.elapsed += time.perf_counter() - t0
        if status == "completed":
            self.save()
        return status


def run_experiment(config: ExperimentConfig, run_dir: Path | str, *, resume: bool = False, overwrite: bool = False,
                   stop_after_steps: Optional[int] = None, model_factory: Optional[ModelFactory] = None,
                   show_progress: Optional[bool] = None) -> dict[str, Any]:
    """Build and run one experiment; returns its summary (see :class:`Runner`)."""
    runner = Runner(config, run_dir, model_factory=model_factory).setup()
    return runner.run(resume=resume, overwrite=overwrite, stop_after_steps=stop_after_steps, show_progress=show_progress)
