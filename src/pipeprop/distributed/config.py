"""Options of a distributed run: the single-process training config plus the distributed knobs.

The training part is a :class:`pipeprop.experiments.ExperimentConfig` (model, data, method, recipe, seed;
the same keys and command-line options as ``pipeprop train``), kept as a plain dict so that the config
travels to every rank as command-line arguments. The distributed part says how to run it: backend,
timeout, stage-to-rank assignment, checkpoints and the output folder.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Sequence

__all__ = ["DistributedConfig", "parse_args", "BACKENDS", "EXPERIMENT_OPTIONS"]

BACKENDS = ("auto", "gloo", "nccl")

#: (command-line option, ExperimentConfig key, type, help): the options shared with ``pipeprop train``
EXPERIMENT_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--model", "model", str, "model name (pipeprop.models) or 'module:function'"),
    ("--norm", "norm", str, "normalization: gn, online, ws+gn, bn, none (default: the model's)"),
    ("--dataset", "dataset", str, "digits (embedded), cifar10, mnist, fashion-mnist, ..."),
    ("--data-dir", "data_dir", str, "folder with the data set files"),
    ("--train-subset", "train_subset", int, "use the first N training examples"),
    ("--method", "method", str, "pipelined method: pb, pb+sc, pb+lwp, pb+sc+lwp, pb+stash, ..."),
    ("--micro-batch", "micro_batch", int, "micro-batch size b"),
    ("--batch-size", "batch_size", int, "batch size B of the reference recipe (scaled to b by --rule)"),
    ("--lr", "lr", float, "reference learning rate (at --batch-size)"),
    ("--momentum", "momentum", float, "reference momentum (at --batch-size)"),
    ("--weight-decay", "weight_decay", float, "L2 weight decay"),
    ("--rule", "rule", str, "scaling rule from B to b"),
    ("--schedule", "schedule", str, "learning-rate schedule: step, cosine, constant"),
    ("--epochs", "epochs", float, "training length in epochs"),
    ("--samples", "samples", int, "training length in samples (overrides --epochs)"),
    ("--partition", "partition", str, "stages: layer, block or a number"),
    ("--seed", "seed", int, "random seed (model init, data order)"),
    ("--dtype", "dtype", str, "float32 or float64"),
    ("--device", "device", str, "cpu or cuda (cuda: one GPU per rank, LOCAL_RANK)"),
]


@dataclass
class DistributedConfig:
    """A distributed run.

    Attributes:
        experiment: ``ExperimentConfig`` keys (overrides of its defaults), e.g. ``{"model": "mlp"}``.
        config: a named config or TOML file the experiment keys start from (as ``pipeprop train --config``).
        out: output folder (results, final model, per-rank checkpoints).
        backend: ``"gloo"``, ``"nccl"`` or ``"auto"`` (NCCL for ``device="cuda"``, else gloo).
        timeout: seconds any rank waits for a neighbour (or the rendezvous) before it exits with an error.
        assignment: stages per rank: ``"flops"``, ``"params"``, ``"uniform"`` or counts such as ``"2,1,1"``.
        queue_capacity: messages in flight per channel before a sender waits.
        checkpoint_every: pipeline steps between per-rank checkpoints (``None``: none).
        resume: continue from the checkpoints in ``out``.
        stop_after_step: stop (with a checkpoint) after this pipeline step, as an interruption would.
        progress: show a progress bar on the last rank.
        evaluate: rank 0 evaluates the final model on the test split.
    """

    experiment: dict[str, Any] = field(default_factory=dict)
    config: Optional[str] = None
    out: str = "runs/distributed"
    backend: str = "auto"
    timeout: float = 60.0
    assignment: str = "flops"
    queue_capacity: int = 2
    checkpoint_every: Optional[int] = None
    resume: bool = False
    stop_after_step: Optional[int] = None
    progress: bool = True
    evaluate: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")
        if self.queue_capacity < 1:
            raise ValueError(f"queue capacity must be >= 1, got {self.queue_capacity}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 pipeline steps, got {self.checkpoint_every}")
        if self.stop_after_step is not None and self.stop_after_step < 0:
            raise ValueError(f"stop_after_step must be >= 0, got {self.stop_after_step}")

    @classmethod
    def from_experiment(cls, experiment: Any, **distributed: Any) -> "DistributedConfig":
        """From a :class:`pipeprop.experiments.ExperimentConfig` (or its dict) plus distributed options."""
        data = experiment.to_dict() if hasattr(experiment, "to_dict") else dict(experiment)
        if data.get("checkpoint_every") and "checkpoint_every" not in distributed:
            distributed["checkpoint_every"] = max(1, int(data["checkpoint_every"]) // int(data.get("micro_batch", 1)))
        if "progress" in data and "progress" not in distributed:
            distributed["progress"] = bool(data["progress"])
        keep = {k: v for k, v in data.items() if k not in ("checkpoint_every", "progress")}
        return cls(experiment=keep, **distributed)

    def experiment_config(self) -> Any:
        """The :class:`~pipeprop.experiments.ExperimentConfig` of the run."""
        from ..experiments.config import load_config

        return load_config(self.config, dict(self.experiment))

    def to_argv(self) -> list[str]:
        """Command-line arguments of ``python -m pipeprop.distributed`` that rebuild this config."""
        argv = ["--out", self.out, "--backend", self.backend, "--timeout", repr(float(self.timeout)),
                "--assignment", str(self.assignment), "--queue", str(self.queue_capacity)]
        if self.config is not None:
            argv += ["--config", self.config]
        for key, value in self.experiment.items():
            argv += ["--set", f"{key}={json.dumps(value)}"]
        if self.checkpoint_every is not None:
            argv += ["--checkpoint-every", str(self.checkpoint_every)]
        if self.resume:
            argv.append("--resume")
        if self.stop_after_step is not None:
            argv += ["--stop-after-step", str(self.stop_after_step)]
        if not self.progress:
            argv.append("--no-progress")
        if not self.evaluate:
            argv.append("--no-eval")
        return argv

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torchrun --nproc_per_node=N -m pipeprop.distributed",
        description="Train with real asynchronous Pipelined Backpropagation, one process per group of stages.",
    )
    p.add_argument("--config", default=None, metavar="NAME|FILE", help="named config or TOML file (as pipeprop train)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="set any config key")
    for opt, key, typ, text in EXPERIMENT_OPTIONS:
        p.add_argument(opt, dest=f"exp_{key}", type=typ, default=None, metavar=key.upper(), help=text)
    p.add_argument("--out", default="runs/distributed", help="output folder (results, model, checkpoints)")
    p.add_argument("--backend", default="auto", help="gloo, nccl or auto (nccl on cuda, else gloo)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a neighbour before failing")
    p.add_argument("--assignment", default="flops", help="stages per rank: flops, params, uniform or counts '2,1,1'")
    p.add_argument("--queue", dest="queue_capacity", type=int, default=2, help="messages in flight per channel")
    p.add_argument("--checkpoint-every", type=int, default=None, help="pipeline steps between per-rank checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--stop-after-step", type=int, default=None, help="stop (with a checkpoint) after this step")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--no-eval", dest="evaluate", action="store_false", help="skip the final test evaluation")
    return p


def parse_args(argv: Sequence[str]) -> DistributedConfig:
    """Parse ``python -m pipeprop.distributed`` arguments (raises ``ValueError`` on bad input)."""
    parser = _parser()
    try:
        ns = parser.parse_args(list(argv))
    except SystemExit as exc:  # argparse printed the problem
        if exc.code == 0:
            raise
        raise ValueError("invalid command-line arguments (see the message above)") from None
    experiment: dict[str, Any] = {}
    for text in ns.sets:
        if "=" not in text:
            raise ValueError(f"--set {text!r} must look like key=value, e.g. --set lr=0.05")
        key, value = text.split("=", 1)
        key = key.strip().split(".")[-1]
        try:
            experiment[key] = json.loads(value)
        except json.JSONDecodeError:
            experiment[key] = value
    for _, key, _, _ in EXPERIMENT_OPTIONS:
        value = getattr(ns, f"exp_{key}")
        if value is not None:
            experiment[key] = int(value) if key == "partition" and str(value).isdigit() else value
    names = {f.name for f in fields(DistributedConfig)}
    rest = {k: v for k, v in vars(ns).items() if k in names and k not in ("experiment", "config")}
    return DistributedConfig(experiment=experiment, config=ns.config, **rest)
