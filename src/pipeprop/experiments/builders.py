"""Build what a run needs from its config, the same way for both engines: data set, model, micro-batch
stream, learning-rate schedule and the optimizer keywords."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..data import ImageDataset, MicroBatchStream, load_digits
from .config import ExperimentConfig

__all__ = ["build_dataset", "build_model", "build_augment", "build_stream", "build_lr_schedule", "optimizer_options",
           "ModelFactory", "TrackedCrossEntropy",
           "StackedTrackedCrossEntropy"]

ModelFactory = Callable[..., nn.Module]


_CACHE: dict[str, ImageDataset] = {}


def build_dataset(config: ExperimentConfig) -> ImageDataset:
    """The config's data set, cut to ``train_subset``/``test_subset`` examples (loaded once per process)."""
    key = repr((config.dataset.lower(), config.data_dir, sorted(config.data_options.items())))
    if key not in _CACHE:
        _CACHE.clear()  # keep at most one data set in memory
        _CACHE[key] = _load(config)
    data = dataclasses.replace(_CACHE[key])
    if config.train_subset is not None:
        data.train = data.train.subset(config.train_subset)
    if config.test_subset is not None:
        data.test = data.test.subset(config.test_subset)
    return data


def _load(config: ExperimentConfig) -> ImageDataset:
    try:
        from ..data import load_dataset
    except ImportError:  # pragma: no cover - older installs without the data registry
        if config.dataset.lower() != "digits":
            raise ValueError(f"data set {config.dataset!r} needs pipeprop.data.load_dataset; use dataset='digits'")
        data = load_digits()
    else:
        data = load_dataset(config.dataset, data_dir=config.data_dir, **config.data_options)
    return data


def build_augment(config: ExperimentConfig, dataset: ImageDataset) -> Optional[Callable[..., Any]]:
    """The crop+flip augmentation of ``pipeprop.data`` when ``config.augment`` is on."""
    if not config.augment:
        return None
    try:
        from ..data.augmentation import augment
    except ImportError as err:
        raise ValueError("augment=true needs pipeprop.data.augmentation, which this install lacks; set augment=false") from err
    return augment


def _call_with_supported(fn: Callable[..., Any], candidates: dict[str, Any], options: dict[str, Any]) -> Any:
    """Call ``fn(**options, **candidates it accepts)``."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(**candidates, **options)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in candidates.items() if (k in params or takes_any) and v is not None and k not in options}
    return fn(**kwargs, **options)


def build_model(config: ExperimentConfig, dataset: ImageDataset, factory: Optional[ModelFactory] = None) -> nn.Module:
    """The config's model (``pipeprop.models.get(name, ...)`` or an importable ``"module:function"``).

    The builder receives, when it accepts them, ``norm``, ``num_classes``, ``in_channels``,
    ``image_size`` and ``image_shape``, plus ``model_options``. Parameters are initialised from the
    global torch seed (set by the runner), so a run is reproducible.
    """
    channels, height, width = dataset.image_shape
    candidates = {
        "norm": config.norm,
        "num_classes": dataset.num_classes,
        "in_channels": channels,
        "image_size": height,
        "image_shape": (channels, height, width),
    }
    options = dict(config.model_options)
    if factory is not None:
        model = _call_with_supported(factory, candidates, options)
    elif ":" in config.model:
        module, attr = config.model.split(":", 1)
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"cannot import model builder {config.model!r}: {err}") from err
        model = _call_with_supported(fn, candidates, options)
    else:
        model = _zoo_model(config.model, candidates, options)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model builder for {config.model!r} returned {type(model).__name__}, not an nn.Module")
    return model.to(dtype=getattr(torch, config.dtype))


def _zoo_model(name: str, candidates: dict[str, Any], options: dict[str, Any]) -> nn.Module:
    """``pipeprop.models.get(name, norm=, num_classes=, in_channels=, in_features=)``, dropping keywords it rejects."""
    try:
        from ..models import get
    except ImportError as err:
        raise ValueError(
            f"model {name!r} needs pipeprop.models, which this install lacks; give model as 'module:function'"
        ) from err
    c, h, w = candidates["image_shape"]
    extra = {"in_channels": c, "in_features": c * h * w}
    extra = {k: v for k, v in extra.items() if k not in options}
    while True:
        try:
            return get(name, norm=candidates["norm"], num_classes=candidates["num_classes"], **extra, **options)
        except TypeError as err:
            rejected = [k for k in extra if f"'{k}'" in str(err)]
            if not rejected:
                raise
            for k in rejected:
                extra.pop(k)


def build_stream(config: ExperimentConfig, data: ImageDataset, total_steps: int, device: torch.device | str = "cpu") -> MicroBatchStream:
    """The seeded, resumable stream of ``total_steps`` micro-batches of the run."""
    b = config.micro_batch
    steps_per_epoch = len(data.train) // b
    if steps_per_epoch == 0:
        raise ValueError(f"micro_batch {b} is larger than the training set ({len(data.train)} examples)")
    stream = MicroBatchStream(data, batch_size=b, epochs=total_steps / steps_per_epoch, seed=config.seed,
                              augment=build_augment(config, data), dtype=getattr(torch, config.dtype), device=device)
    stream.total_steps = total_steps  # exact, independent of float rounding
    return stream


def build_lr_schedule(recipe: Any) -> Callable[[int], float]:
    """The schedule a :class:`~pipeprop.optim.PipelineOptimizer` applies at each stage's update count."""
    from .lr_schedule import SampleSchedule

    return SampleSchedule(recipe)


def optimizer_options(config: ExperimentConfig) -> dict[str, Any]:
    """Extra keywords for the method's optimizer (the optimizer choice itself travels in the scaled recipe,
    :meth:`~pipeprop.scaling.ScaledRecipe.optimizer_kwargs`, since its betas are scaled too)."""
    return dict(config.method_options)


class TrackedCrossEntropy:
    """Cross-entropy that also counts the correct predictions of the last call (engines return only the loss)."""

    def __init__(self) -> None:
        self.correct = 0

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        self.correct = int((output.detach().argmax(dim=1) == target).sum())
        return F.cross_entropy(output, target)


class StackedTrackedCrossEntropy:
    """:class:`TrackedCrossEntropy` of K stacked runs: outputs ``[K, b, C]``, targets ``[K, b]`` -> K losses;
    ``correct`` holds each run's correct predictions of the last call (a tensor, read by the caller)."""

    def __init__(self) -> None:
        self.correct: Optional[torch.Tensor] = None

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F
        from torch.func import vmap

        self.correct = (output.detach().argmax(dim=-1) == target).sum(dim=-1)
        return vmap(F.cross_entropy)(output, target)
