"""The one option list of the training commands (``pipeprop train``/``compare`` and the distributed ranks,
``torchrun -m pipeprop.distributed``): config file < ``--set`` < explicit options, all checked by
:class:`~pipeprop.experiments.config.ExperimentConfig`."""

from __future__ import annotations

from typing import Any, Callable, Optional

import click

from ..scaling import RULES
from .config import ExperimentConfig, load_config, parse_override

__all__ = ["config_options", "resolve_config", "friendly_errors"]

# (option, config key, click type, help)
_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--model", "model", str, "model name (pipeprop.models) or 'module:function'"),
    ("--norm", "norm", str, "normalization: gn, online, ws+gn, bn, none (default: the model's)"),
    ("--dataset", "dataset", str, "digits (embedded), cifar10, mnist, fashion-mnist, ..."),
    ("--data-dir", "data_dir", click.Path(file_okay=False), "folder with the data set files"),
    ("--train-subset", "train_subset", int, "use the first N training examples"),
    ("--test-subset", "test_subset", int, "evaluate on the first N test examples"),
    ("--augment/--no-augment", "augment", None, "random crop + flip"),
    ("--dtype", "dtype", click.Choice(["float32", "float64"]), "parameter and data type"),
    ("--method", "method", str, "training method (see `pipeprop methods`)"),
    ("--micro-batch", "micro_batch", int, "micro-batch size b (1 = the paper's setting)"),
    ("--batch-size", "batch_size", int, "batch size B of the reference recipe"),
    ("--optimizer", "optimizer", click.Choice(["sgd", "adam", "adamw", "nadam"]),
     "per-stage optimizer, independent of --method (adam family: square-root scaling rule)"),
    ("--lr", "lr", float, "reference learning rate (at --batch-size)"),
    ("--momentum", "momentum", float, "reference momentum (at --batch-size; sgd only)"),
    ("--betas", "betas", str, "reference Adam betas 'beta1,beta2' (at --batch-size; adam family only)"),
    ("--eps", "eps", float, "reference Adam eps (adam family only)"),
    ("--weight-decay", "weight_decay", float, "L2 weight decay (kept by both scaling rules)"),
    ("--rule", "rule", click.Choice(list(RULES) + ["effective_lr", "linear_lr"]), "scaling rule from B to b"),
    ("--schedule", "schedule", click.Choice(["step", "cosine", "constant"]), "learning-rate schedule"),
    ("--milestones", "milestones", str, "step-schedule milestones in epochs, comma separated"),
    ("--warmup-epochs", "warmup_epochs", float, "linear warm-up length in epochs"),
    ("--epochs", "epochs", float, "training length in epochs"),
    ("--samples", "samples", int, "training length in samples (overrides --epochs)"),
    ("--partition", "partition", str, "stages: layer, block or a number"),
    ("--device", "device", str, "cpu or cuda"),
    ("--threads", "num_threads", int, "torch CPU threads (1 is fastest for b=1 on a shared machine)"),
    ("--eval-every", "eval_every", int, "evaluate every N samples (default: <= max_evals evaluations, "
     ">= min_eval_every samples apart)"),
    ("--checkpoint-every", "checkpoint_every", int, "checkpoint every N samples (default: at each evaluation)"),
    ("--logger", "logger", click.Choice(["none", "tensorboard"]), "experiment tracking next to metrics.jsonl"),
    ("--engine", "engine", click.Choice(["simulator", "distributed"]),
     "exact sequential simulator, or the real asynchronous pipeline on torch.distributed"),
    ("--nproc", "nproc", int, "processes of --engine distributed"),
    ("--backend", "backend", click.Choice(["auto", "gloo", "nccl"]), "torch.distributed backend (auto: nccl on cuda)"),
    ("--timeout", "timeout", float, "seconds a rank waits for a neighbour before failing"),
    ("--assignment", "assignment", str, "stages per process: flops, params, uniform, measured (timed at the start, kept on resume) or counts '2,1,1'"),
    ("--queue", "queue_capacity", int, "messages in flight per channel before a sender waits"),
]


def config_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--config``, ``--set`` and one option per common config key."""
    for opt, key, typ, text in reversed(_OPTIONS):
        if typ is None:
            fn = click.option(opt, key, default=None, help=text)(fn)
        else:
            fn = click.option(opt, key, type=typ, default=None, help=text)(fn)
    fn = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                      help="set any config key, e.g. --set method_options='{\"lwp_mode\": \"momentum-decay\"}'")(fn)
    fn = click.option("--config", "config_name", default=None, metavar="NAME|FILE",
                      help="a named config (configs/NAME.toml, see `pipeprop reproduce --list`) or a TOML file")(fn)
    return fn


def resolve_config(config_name: Optional[str], sets: tuple[str, ...], **explicit: Any) -> ExperimentConfig:
    """The config file, then ``--set`` overrides, then the explicitly given options."""
    overrides = [parse_override(s) for s in sets]
    keys = {key for _, key, _, _ in _OPTIONS}
    overrides += [(k, v) for k, v in explicit.items() if k in keys and v is not None]
    return load_config(config_name, overrides)


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected errors (bad config, missing data, broken checkpoint) into ``Error: ...`` messages."""
    import functools

    from .checkpoint import CheckpointError
    from .run_folder import RunDirError

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, CheckpointError, RunDirError, TypeError) as err:
            raise click.ClickException(str(err)) from err
        except RuntimeError as err:
            if type(err).__name__ != "DistributedRunError":
                raise
            raise click.ClickException(str(err)) from err

    return wrapper
