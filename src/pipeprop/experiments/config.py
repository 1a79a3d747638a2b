"""Experiment configuration: one typed model (pydantic), read from TOML plus ``key=value`` overrides.

A config describes one training set-up: model, data, method, micro-batch size ``b``, the *reference*
recipe at batch size ``batch_size`` that the scaling rule turns into the recipe for ``b``, the engine
(the exact simulator or the real pipeline on ``torch.distributed``) and how the run is observed. The keys
``methods`` and ``seeds`` list what ``compare``/``reproduce`` sweep over. TOML tables (``[model]``,
``[recipe]`` ...) may be used to group keys; they are flattened, so ``[recipe] lr = 0.1`` is ``lr = 0.1``.

The data set decides the task (:attr:`ExperimentConfig.task`): image classification (metric: test
accuracy) or character-level language modelling (``dataset = "tinyshakespeare"``; one sample is one
sequence of ``context`` characters, the metric is the validation loss in nats per character, reported
with bits per character and perplexity; lower is better).

Every value is checked when a config is built, whatever its source (TOML, ``--set``, command-line options
or ``ExperimentConfig(...)`` in Python): a wrong key, type or range raises :class:`ConfigError`, whose
message names the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..scaling import Recipe, ScaledRecipe, normalize_rule, scale_recipe

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "load_config",
    "apply_overrides",
    "parse_override",
    "configs_dir",
    "find_config",
    "list_configs",
    "method_entry",
    "DEFAULT_METHODS",
    "RUN_CONTROL_KEYS",
    "DEFAULT_CONTEXT",
]

DEFAULT_METHODS = ("sgd", "pb", "pb+sc", "pb+lwp", "pb+sc+lwp")

#: keys that only steer how a run is executed or observed; changing them does not change its results
RUN_CONTROL_KEYS = frozenset(
    {"checkpoint_every", "progress", "methods", "seeds", "description", "scale", "name", "est_sample_seconds", "device",
     "num_threads", "backend", "timeout", "queue_capacity", "nproc", "assignment", "logger"}
)

ASSIGNMENT_KINDS = ("flops", "params", "uniform", "measured")

#: characters per sequence of a language-modelling run when ``context`` is not set
DEFAULT_CONTEXT = 128

#: keys added after runs were stored: left out of :meth:`ExperimentConfig.result_dict` (and so of the checkpoint
#: hash) while they hold these defaults, so runs stored before the keys existed keep resuming
_LATER_KEYS = {"metric": "auto", "context": None, "warmup_samples": None, "min_lr_factor": 0.0}


class ConfigError(ValueError):
    """A config key, type or value is not allowed (the message names the key, the value and the choices)."""


def _check_counts(text: str) -> str:
    if text in ASSIGNMENT_KINDS:
        return text
    try:
        counts = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ValueError(f"use one of {', '.join(ASSIGNMENT_KINDS)} or stages per process such as '2,1,1'")
    return ",".join(map(str, counts))


class ExperimentConfig(BaseModel):
    """Everything that defines a run (see ``docs/experiments.md`` for each key)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    name: str = "run"
    description: str = ""
    scale: Literal["paper", "budget", "custom"] = "custom"
    # model
    model: str = "mlp"
    norm: Optional[str] = None
    model_options: dict[str, Any] = Field(default_factory=dict)
    partition: Union[int, Literal["layer", "block"]] = "layer"
    delay_offset: int = Field(0, ge=0)
    # data
    dataset: str = "digits"  # decides the task: image classification, or language modelling (tinyshakespeare)
    context: Optional[int] = Field(None, ge=1)  # language modelling: characters per sequence (default DEFAULT_CONTEXT)
    data_dir: Optional[str] = None
    data_options: dict[str, Any] = Field(default_factory=dict)  # extra load_dataset keywords
    train_subset: Optional[int] = Field(None, ge=1)
    test_subset: Optional[int] = Field(None, ge=1)
    augment: bool = False
    dtype: Literal["float32", "float64"] = "float32"
    precision: Literal["32", "64", "bf16-mixed", "16-mixed"] = "32"  # compute precision (pipeprop.precision)
    # method and optimizer at micro-batch size b
    method: str = "pb+sc+lwp"
    method_options: dict[str, Any] = Field(default_factory=dict)
    optimizer: str = "sgd"  # "sgd" | "adam" | "adamw" | "nadam" (independent of the method)
    betas: Optional[tuple[float, float]] = None  # Adam family; None: the method's (asyncpp: 0.99, 0.999) or (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)  # Adam family
    micro_batch: int = Field(1, ge=1)
    # reference recipe at batch size B, scaled to b by `rule`
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.1, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    rule: str = "momentum"
    schedule: Literal["step", "cosine", "constant"] = "step"
    milestones: list[float] = Field(default_factory=list)  # epochs
    gamma: float = Field(0.1, gt=0)
    warmup_epochs: float = Field(0.0, ge=0)
    warmup_samples: Optional[int] = Field(None, ge=0)  # overrides warmup_epochs
    min_lr_factor: float = Field(0.0, ge=0, le=1)  # cosine schedule: decay to this fraction of lr (not to 0)
    epochs: float = Field(1.0, ge=0)
    samples: Optional[int] = Field(None, ge=1)  # overrides epochs
    # engine
    engine: Literal["simulator", "distributed"] = "simulator"
    nproc: int = Field(2, ge=1)  # processes of the distributed engine
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout: float = Field(60.0, gt=0)  # seconds a rank waits for a neighbour
    assignment: str = "flops"  # stages per rank: flops, params, uniform, measured (timed once) or counts "2,1,1"
    queue_capacity: int = Field(2, ge=1)
    # execution and observation
    seed: int = 0
    device: str = "cpu"
    num_threads: Optional[int] = Field(None, ge=1)  # torch intra-op threads (1 is fastest for b=1 on a shared CPU)
    metric: Literal["auto", "accuracy", "loss"] = "auto"  # headline metric; auto: accuracy or (language) loss
    eval_every: Optional[int] = Field(None, ge=1)  # samples; default: see max_evals and min_eval_every
    max_evals: int = Field(20, ge=1)  # default eval_every: at most this many evaluations per run ...
    min_eval_every: int = Field(1000, ge=1)  # ... but at least this many samples apart
    eval_batch: int = Field(500, ge=1)
    train_window: Optional[int] = Field(None, ge=1)  # samples averaged into final train loss/acc (default: eval_every)
    checkpoint_every: Optional[int] = Field(None, ge=1)  # samples; default: at every evaluation
    divergence_loss: Optional[float] = Field(None, gt=0)  # a running train loss above this counts as divergence
    logger: Literal["none", "tensorboard"] = "none"  # experiment tracking next to metrics.jsonl
    progress: bool = True
    # sweeps (compare / reproduce)
    methods: list[str] = Field(default_factory=lambda: list(DEFAULT_METHODS), min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    sgd_batch: Union[Literal["reference"], int] = "reference"  # micro-batch of "sgd": "reference" (= batch_size) or b
    est_sample_seconds: Optional[float] = Field(None, gt=0)  # measured seconds per sample, for cost estimates

    def __init__(self, **data: Any) -> None:
        unknown = [k for k in data if k not in type(self).model_fields]
        if unknown:
            raise ConfigError(_unknown_keys_message(unknown))
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise ConfigError(_format_errors(err, data.get("name", "run"))) from None

    # ------------------------------------------------------------------ checks
    @field_validator("method")
    @classmethod
    def _canonical_method(cls, value: str) -> str:
        from ..methods import get_method

        return get_method(value).name

    @field_validator("methods")
    @classmethod
    def _canonical_methods(cls, entries: list[str]) -> list[str]:
        return [_canonical_entry(e) for e in entries]

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if ":" in value:  # "module:function", imported when the run is built
            return value
        from ..models import _canonical, list_models

        if _canonical(value) not in list_models():
            raise ValueError(f"unknown model; choose one of {', '.join(list_models())} or give 'module:function'")
        return value

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        from ..data import registry

        names = list(registry.available_datasets())
        key = value.strip().lower().replace("_", "-")
        if key not in names and key not in getattr(registry, "_ALIASES", {}):
            raise ValueError(f"unknown data set; choose one of {', '.join(names)}")
        return value

    @field_validator("rule")
    @classmethod
    def _known_rule(cls, value: str) -> str:
        normalize_rule(value)
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value != "cpu" and not value.startswith("cuda"):
            raise ValueError("use 'cpu', 'cuda' or 'cuda:N'")
        return value

    @field_validator("assignment", mode="before")
    @classmethod
    def _known_assignment(cls, value: Any) -> str:
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        if not isinstance(value, str):
            raise ValueError(f"use one of {', '.join(ASSIGNMENT_KINDS)} or stages per process such as '2,1,1'")
        return _check_counts(value)

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        from ..methods import normalize_optimizer

        return normalize_optimizer(value)

    @field_validator("betas", mode="before")
    @classmethod
    def _betas_from_text(cls, value: Any) -> Any:
        if isinstance(value, str):  # "0.9,0.99" from the command line
            return [b for b in value.split(",") if b.strip()]
        return value

    @field_validator("betas")
    @classmethod
    def _beta_range(cls, value: Optional[tuple[float, float]]) -> Optional[tuple[float, float]]:
        if value is not None and not all(0.0 <= b < 1.0 for b in value):
            raise ValueError("both betas must lie in [0, 1)")
        return value

    @field_validator("partition", mode="before")
    @classmethod
    def _known_partition(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if not (value in ("layer", "block") or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)):
            raise ValueError("use 'layer', 'block' or a number of stages >= 1")
        return value

    @field_validator("sgd_batch")
    @classmethod
    def _positive(cls, value: Any) -> Any:
        if isinstance(value, int) and value < 1:
            raise ValueError("a number must be >= 1")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "ExperimentConfig":
        if not (self.epochs > 0 or self.samples):
            raise ValueError("set epochs > 0 or samples > 0")
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must increase, got {self.milestones}")
        from ..methods import get_method

        get_method(self.method).optimizer_class(self.optimizer)  # a method defined for other optimizers: clear error
        if self.min_lr_factor > 0 and self.schedule != "cosine":
            raise ValueError(f"min_lr_factor = {self.min_lr_factor} is the floor of the cosine schedule; set "
                             f"schedule = 'cosine' or min_lr_factor = 0 (schedule is {self.schedule!r})")
        if self.task == "language-modelling":
            what = f"dataset {self.dataset!r} is for language modelling"
            if self.metric == "accuracy":
                raise ValueError(f"metric = 'accuracy': {what}, whose metric is the validation loss (nats per "
                                 "character, also reported as bits per character and perplexity); set metric = 'auto' "
                                 "or 'loss'")
            if self.engine != "simulator":
                raise ValueError(f"engine = {self.engine!r}: {what}, which the simulator engine runs; set "
                                 "engine = 'simulator'")
            if self.augment:
                raise ValueError(f"augment = true: {what}; image augmentation does not apply, set augment = false")
        elif self.context is not None:
            raise ValueError(f"context = {self.context}: context is the sequence length of language-modelling data "
                             f"sets, and dataset {self.dataset!r} is image classification; remove context")
        return self

    # ------------------------------------------------------------------ task
    @property
    def task(self) -> str:
        """``"classification"`` or ``"language-modelling"``, from the data set."""
        from ..data.registry import dataset_task

        return dataset_task(self.dataset)

    @property
    def headline_metric(self) -> str:
        """The metric runs are compared by: ``"accuracy"`` (higher is better) or ``"loss"`` (lower is better)."""
        if self.metric != "auto":
            return self.metric
        return "loss" if self.task == "language-modelling" else "accuracy"

    @property
    def sequence_length(self) -> int:
        """Characters per sequence of a language-modelling run (``context`` or :data:`DEFAULT_CONTEXT`)."""
        return self.context if self.context is not None else DEFAULT_CONTEXT

    # ------------------------------------------------------------------ derived
    def total_samples(self, train_size: int) -> int:
        """Training length in samples, a whole number of micro-batches."""
        samples = self.samples if self.samples is not None else int(round(self.epochs * train_size))
        return max(self.micro_batch, samples - samples % self.micro_batch)

    def scaled(self, train_size: int) -> ScaledRecipe:
        """The reference recipe scaled to ``micro_batch`` with ``rule``; durations in samples of *this* run."""
        recipe = Recipe(
            batch_size=self.batch_size,
            lr=self.lr,
            momentum=self.momentum,
            optimizer=self.optimizer,
            betas=self._reference_betas(),
            eps=self.eps,
            weight_decay=self.weight_decay,
            epochs=self.total_samples(train_size) / train_size,
            warmup_epochs=self.warmup_epochs,
            milestones=list(self.milestones),
            gamma=self.gamma,
            schedule=self.schedule,
            dataset_size=train_size,
        )
        out = scale_recipe(recipe, self.micro_batch, self.rule)
        out.total_samples = self.total_samples(train_size)
        if self.warmup_samples is not None:
            out.warmup_samples = self.warmup_samples
        out.min_lr_factor = self.min_lr_factor
        return out

    def eval_interval(self, total_samples: int) -> int:
        """Samples between evaluations: ``eval_every``, else at most ``max_evals`` evaluations but at least
        ``min_eval_every`` samples apart (never more than the run), rounded up to whole micro-batches."""
        every = self.eval_every or max(min(self.min_eval_every, total_samples), -(-total_samples // self.max_evals))
        return max(self.micro_batch, every)

    def _reference_betas(self) -> tuple[float, float]:
        """The reference betas (Adam family): ``betas``, else the method's (asyncpp: 0.99, 0.999)."""
        if self.betas is not None:
            return float(self.betas[0]), float(self.betas[1])
        from ..methods import get_method

        b1, b2 = get_method(self.method).options.get("betas", (0.9, 0.999))
        return float(b1), float(b2)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def replace(self, **changes: Any) -> "ExperimentConfig":
        return apply_overrides(self, changes)

    def result_dict(self) -> dict[str, Any]:
        """The keys that determine the results (a run folder is reused or resumed only when these agree)."""
        return {k: v for k, v in self.to_dict().items()
                if k not in RUN_CONTROL_KEYS and not (k in _LATER_KEYS and v == _LATER_KEYS[k])}

    def config_hash(self) -> str:
        """SHA-256 of :meth:`result_dict` (stored in checkpoints)."""
        return hashlib.sha256(json.dumps(self.result_dict(), sort_keys=True).encode()).hexdigest()

    def differences(self, other: "ExperimentConfig") -> list[str]:
        """``"key: mine vs other"`` for every result key on which the two configs differ."""
        a, b = self.result_dict(), other.result_dict()
        return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _canonical_entry(entry: str) -> str:
    from ..methods import get_method

    name, at, batch = str(entry).partition("@")
    if at and (not batch.isdigit() or int(batch) < 1):
        raise ValueError(f"bad entry {entry!r}: after '@' give a micro-batch size, e.g. sgd@128")
    return get_method(name).name + (f"@{int(batch)}" if at else "")


def _unknown_keys_message(keys: Iterable[str]) -> str:
    valid = list(ExperimentConfig.model_fields)
    parts = []
    for key in keys:
        close = difflib.get_close_matches(str(key), valid, n=1)
        parts.append(f"unknown config key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return "; ".join(parts) + f". Valid keys: {', '.join(sorted(valid))}"


def _format_errors(err: ValidationError, name: Any) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"] if not isinstance(p, int) or len(e["loc"]) == 1]
        key = loc[0] if loc else "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "literal_error" or "union" in e["type"]:
            msg = msg.replace("Input should be", "allowed:")
        shown = f" = {e['input']!r}" if loc else ""
        lines.append(f"{key}{shown}: {msg}")
    return f"config {name!r}: " + "; ".join(dict.fromkeys(lines))


def _is_textual(key: str) -> bool:
    """Whether field ``key`` holds text (command-line values for it are not parsed as JSON)."""
    ann = ExperimentConfig.model_fields[key].annotation
    args = [a for a in typing.get_args(ann) if a is not type(None)] if typing.get_origin(ann) is Union else [ann]
    return all(a is str or (typing.get_origin(a) is Literal and all(isinstance(v, str) for v in typing.get_args(a)))
               for a in args)


def _is_sequence(key: str) -> bool:
    return typing.get_origin(ExperimentConfig.model_fields[key].annotation) in (list, tuple)


def parse_value(key: str, text: str) -> Any:
    """A command-line value for key ``key``: JSON when it parses (numbers, true/false, null, lists, tables),
    else the text; comma-separated lists (``milestones=50,75``) for list keys. The config checks the type."""
    text = text.strip()
    if _is_textual(key):
        return None if text.lower() == "null" else text
    if text.lower() in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if _is_sequence(key):
            return [_json_or_text(v.strip()) for v in text.split(",") if v.strip()]
        return text


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_override(text: str) -> tuple[str, Any]:
    """``"lr=0.05"`` -> ``("lr", 0.05)``: the one parser of ``--set`` values (dotted TOML-style prefixes are
    dropped, so ``recipe.lr=0.05`` works too)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r} must look like key=value, e.g. --set lr=0.05")
    key, value = text.split("=", 1)
    key = key.strip().split(".")[-1]
    if key not in ExperimentConfig.model_fields:
        raise ConfigError(_unknown_keys_message([key]))
    return key, parse_value(key, value)


def apply_overrides(config: ExperimentConfig, overrides: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> ExperimentConfig:
    """A checked copy of ``config`` with ``overrides`` applied."""
    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    data = config.to_dict()
    data.update(dict(items))
    return ExperimentConfig(**data)


def _flatten(table: Mapping[str, Any], source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping) and key not in ("model_options", "method_options", "data_options"):
            items = _flatten(value, source).items()
        else:
            items = [(key, value)]
        for k, v in items:
            if k in flat:
                raise ConfigError(f"{source}: key {k!r} is set twice")
            flat[k] = v
    return flat


def configs_dir() -> Path:
    """The folder of named configs: ``$PIPEPROP_CONFIGS``, else ``configs/`` of the source checkout or cwd."""
    env = os.environ.get("PIPEPROP_CONFIGS")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[3] / "configs"
    if here.is_dir():
        return here
    return Path.cwd() / "configs"


def list_configs(directory: Optional[Path] = None) -> list[str]:
    """Names of the named configs (``configs/*.toml`` without the suffix)."""
    directory = directory or configs_dir()
    return sorted(p.stem for p in directory.glob("*.toml")) if directory.is_dir() else []


def find_config(name_or_path: str | Path) -> Path:
    """A config file from a path or a name in :func:`configs_dir`; unknown names list the choices."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = configs_dir() / f"{name_or_path}.toml"
    if candidate.is_file():
        return candidate
    names = list_configs()
    raise FileNotFoundError(
        f"no config file or named config {str(name_or_path)!r}; named configs in {configs_dir()}: "
        f"{', '.join(names) if names else '(none)'} (see `pipeprop reproduce --list`)"
    )


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The flat keys of a TOML config or of a run folder's ``config.json``."""
    path = Path(path)
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON ({err}); restore it or start a new run with another --out") from err
        return dict(data.get("config", data))
    import tomllib

    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from err
    flat = _flatten(data, str(path))
    flat.setdefault("name", path.stem)
    return flat


def load_config(name_or_path: str | Path | None = None, overrides: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()) -> ExperimentConfig:
    """Read a TOML config (or a run folder's ``config.json``), then apply ``overrides``."""
    data: dict[str, Any] = {}
    if name_or_path is not None:
        path = find_config(name_or_path)
        data = read_config_file(path)
        if path.suffix != ".json" and set(data) - set(ExperimentConfig.model_fields):
            raise ConfigError(f"{path}: " + _unknown_keys_message(sorted(set(data) - set(ExperimentConfig.model_fields))))
    data.update(dict(overrides.items() if isinstance(overrides, Mapping) else overrides))
    return ExperimentConfig(**data)


def method_entry(config: ExperimentConfig, entry: str) -> tuple[str, ExperimentConfig]:
    """The config of one sweep entry: ``"pb+sc"``, or ``"sgd@128"`` (method at micro-batch 128).

    Method ``"sgd"`` without ``@`` runs at ``sgd_batch`` (default: the reference batch size, as in the
    paper's baseline); other methods run at the config's ``micro_batch``. Returns ``(label, config)``.
    """
    name, _, batch = _canonical_entry(entry).partition("@")
    if batch:
        b = int(batch)
    elif name == "sgd":
        b = config.batch_size if config.sgd_batch == "reference" else int(config.sgd_batch)
    else:
        b = config.micro_batch
    label = name if b == config.micro_batch else f"{name}@{b}"
    return label, config.replace(method=name, micro_batch=b)
