"""Experiment configuration: one flat dataclass, read from TOML (stdlib ``tomllib``) plus ``key=value`` overrides.

A config describes one training set-up: model, data, method, micro-batch size ``b`` and the *reference*
recipe at batch size ``batch_size`` that the scaling rule turns into the recipe for ``b``. The keys
``methods`` and ``seeds`` list what ``compare``/``reproduce`` sweep over. TOML tables (``[model]``,
``[recipe]`` ...) may be used to group keys; they are flattened, so ``[recipe] lr = 0.1`` is ``lr = 0.1``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

from ..scaling import Recipe, ScaledRecipe, normalize_rule, scale_recipe

__all__ = [
    "ExperimentConfig",
    "load_config",
    "apply_overrides",
    "parse_override",
    "configs_dir",
    "find_config",
    "list_configs",
    "method_entry",
    "DEFAULT_METHODS",
]

DEFAULT_METHODS = ("sgd", "pb", "pb+sc", "pb+lwp", "pb+sc+lwp")

#: keys that only steer how a run is executed or logged; changing them does not change its results
RUN_CONTROL_KEYS = frozenset(
    {"checkpoint_every", "progress", "methods", "seeds", "description", "scale", "name", "est_sample_seconds", "device", "num_threads"}
)


@dataclass
class ExperimentConfig:
    """Everything that defines a run (see ``docs/experiments.md`` for each key)."""

    name: str = "run"
    description: str = ""
    scale: str = "custom"  # "paper" | "budget" | "custom" (for listings)
    # model
    model: str = "mlp"
    norm: Optional[str] = None
    model_options: dict[str, Any] = field(default_factory=dict)
    partition: Union[str, int] = "layer"
    delay_offset: int = 0
    # data
    dataset: str = "digits"
    data_dir: Optional[str] = None
    data_options: dict[str, Any] = field(default_factory=dict)  # extra load_dataset keywords
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    augment: bool = False
    dtype: str = "float32"
    # method at micro-batch size b
    method: str = "pb+sc+lwp"
    method_options: dict[str, Any] = field(default_factory=dict)
    micro_batch: int = 1
    # reference recipe at batch size B, scaled to b by `rule`
    batch_size: int = 128
    optimizer: str = "sgd"  # "sgd" | "adam" | "adamw" | "nadam" (independent of the method)
    lr: float = 0.1
    momentum: float = 0.9  # sgd only
    betas: Optional[list[float]] = None  # adam family only; None: the method's (asyncpp: 0.99, 0.999) or (0.9, 0.999)
    eps: float = 1e-8  # adam family only
    weight_decay: float = 0.0
    rule: str = "momentum"
    schedule: str = "step"  # "step" | "cosine" | "constant"
    milestones: list[float] = field(default_factory=list)  # epochs
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    epochs: float = 1.0
    samples: Optional[int] = None  # overrides epochs
    # execution
    seed: int = 0
    device: str = "cpu"
    num_threads: Optional[int] = None  # torch intra-op threads (1 is fastest for b=1 on a shared CPU)
    eval_every: Optional[int] = None  # samples; default: 20 evaluations per run
    eval_batch: int = 500
    checkpoint_every: Optional[int] = None  # samples; default: at every evaluation
    divergence_loss: Optional[float] = None  # a running train loss above this counts as divergence
    progress: bool = True
    # sweeps (compare / reproduce)
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    seeds: list[int] = field(default_factory=lambda: [0])
    sgd_batch: Union[str, int] = "reference"  # micro-batch of method "sgd": "reference" (= batch_size) or a number
    est_sample_seconds: Optional[float] = None  # measured seconds per sample, for cost estimates

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"config {self.name!r}: {msg}")

        need(self.micro_batch >= 1, f"micro_batch must be >= 1, got {self.micro_batch}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.lr >= 0, f"lr must be >= 0, got {self.lr}")
        need(0 <= self.momentum < 1, f"momentum must lie in [0, 1), got {self.momentum}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        normalize_rule(self.rule)
        from ..methods import normalize_optimizer

        self.optimizer = normalize_optimizer(self.optimizer)
        if isinstance(self.betas, str):  # "0.9,0.99" from the command line
            self.betas = [float(b) for b in self.betas.split(",") if b.strip()]
        need(self.betas is None or (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)),
             f"betas must be two numbers in [0, 1), got {self.betas}")
        need(self.eps >= 0, f"eps must be >= 0, got {self.eps}")
        need(self.schedule in ("step", "cosine", "constant"), f"schedule must be step, cosine or constant, got {self.schedule!r}")
        need(self.epochs > 0 or (self.samples or 0) > 0, "set epochs > 0 or samples > 0")
        need(self.samples is None or self.samples > 0, f"samples must be > 0, got {self.samples}")
        need(list(self.milestones) == sorted(self.milestones), f"milestones must increase, got {self.milestones}")
        need(self.eval_every is None or self.eval_every > 0, "eval_every must be a positive number of samples")
        need(self.checkpoint_every is None or self.checkpoint_every > 0, "checkpoint_every must be > 0 samples")
        need(self.dtype in ("float32", "float64"), f"dtype must be float32 or float64, got {self.dtype!r}")
        need(len(self.seeds) > 0 and len(self.methods) > 0, "methods and seeds must not be empty")
        need(
            self.sgd_batch == "reference" or (isinstance(self.sgd_batch, int) and self.sgd_batch >= 1),
            f"sgd_batch must be 'reference' or a batch size, got {self.sgd_batch!r}",
        )

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
        return out

    def _reference_betas(self) -> tuple[float, float]:
        if self.betas is not None:
            return float(self.betas[0]), float(self.betas[1])
        from ..methods import get_method

        b1, b2 = get_method(self.method).options.get("betas", (0.9, 0.999))
        return float(b1), float(b2)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "ExperimentConfig":
        return apply_overrides(self, changes)

    def result_dict(self) -> dict[str, Any]:
        """The keys that determine the results (used to check that a resumed run is the same run)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUN_CONTROL_KEYS}


_FIELDS = {f.name: f for f in fields(ExperimentConfig)}


def _coerce(key: str, value: Any) -> Any:
    """Convert ``value`` to the type of field ``key`` (strings from the command line are parsed)."""
    default = getattr(ExperimentConfig(), key)
    if isinstance(value, str) and not isinstance(default, str) or (isinstance(value, str) and default is None):
        text = value.strip()
        if text.lower() in ("none", "null", ""):
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            if isinstance(default, list):
                value = [v.strip() for v in text.split(",") if v.strip()]
                value = [_maybe_number(v) for v in value]
            else:
                value = text
    if key == "partition" and isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(default, bool):
        if isinstance(value, str):
            value = value.lower() in ("1", "true", "yes", "on")
        return bool(value)
    if isinstance(default, float) and isinstance(value, (int, float)):
        return float(value)
    if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(default, list) and not isinstance(value, list):
        return [value]
    return value


def _maybe_number(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_override(text: str) -> tuple[str, Any]:
    """``"lr=0.05"`` -> ``("lr", "0.05")`` (coerced later); dotted TOML-style prefixes are dropped."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value, e.g. lr=0.05")
    key, value = text.split("=", 1)
    return key.strip().split(".")[-1], value


def apply_overrides(config: ExperimentConfig, overrides: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> ExperimentConfig:
    """A copy of ``config`` with ``overrides`` applied (values may be strings from the command line)."""
    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    data = config.to_dict()
    for key, value in items:
        if key not in _FIELDS:
            raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(_FIELDS))}")
        data[key] = _coerce(key, value)
    return ExperimentConfig(**data)


def _flatten(table: Mapping[str, Any], source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping) and key not in ("model_options", "method_options", "data_options"):
            for k, v in _flatten(value, source).items():
                if k in flat:
                    raise ValueError(f"{source}: key {k!r} is set twice")
                flat[k] = v
        else:
            if key in flat:
                raise ValueError(f"{source}: key {key!r} is set twice")
            flat[key] = value
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


def load_config(name_or_path: str | Path | None = None, overrides: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()) -> ExperimentConfig:
    """Read a TOML (or a run directory's ``config.json``) config, then apply ``overrides``."""
    base = ExperimentConfig()
    if name_or_path is not None:
        path = find_config(name_or_path)
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            data = data.get("config", data)
        else:
            import tomllib

            try:
                data = tomllib.loads(path.read_text())
            except tomllib.TOMLDecodeError as err:
                raise ValueError(f"{path} is not valid TOML: {err}") from err
        flat = _flatten(data, str(path))
        flat.setdefault("name", path.stem)
        base = apply_overrides(base, flat)
    return apply_overrides(base, overrides)


def method_entry(config: ExperimentConfig, entry: str) -> tuple[str, ExperimentConfig]:
    """The config of one sweep entry: ``"pb+sc"``, or ``"sgd@128"`` (method at micro-batch 128).

    Method ``"sgd"`` without ``@`` runs at ``sgd_batch`` (default: the reference batch size, as in the
    paper's baseline); other methods run at the config's ``micro_batch``. Returns ``(label, config)``.
    """
    from ..methods import get_method

    name, _, batch = entry.partition("@")
    method = get_method(name).name  # validates the name, listing the choices
    if batch:
        if not batch.isdigit() or int(batch) < 1:
            raise ValueError(f"bad method entry {entry!r}: after '@' give a micro-batch size, e.g. sgd@128")
        b = int(batch)
    elif method == "sgd":
        b = config.batch_size if config.sgd_batch == "reference" else int(config.sgd_batch)
    else:
        b = config.micro_batch
    label = method if b == config.micro_batch else f"{method}@{b}"
    return label, config.replace(method=method, micro_batch=b)

