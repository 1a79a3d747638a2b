"""Build what a run needs from its config, the same way for both engines: data set, model, micro-batch
stream, learning-rate schedule and the optimizer keywords (what depends on the task: :mod:`.tasks`)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..data import ImageDataset, TextDataset, load_digits
from .config import ExperimentConfig
from .tasks import StackedTrackedCrossEntropy, Task, TrackedCrossEntropy, task_of

__all__ = ["build_dataset", "build_model", "build_augment", "build_stream", "build_lr_schedule", "optimizer_options",
           "ModelFactory", "TrackedCrossEntropy",
           "StackedTrackedCrossEntropy"]

ModelFactory = Callable[..., nn.Module]


_CACHE: dict[str, ImageDataset | TextDataset] = {}


def build_dataset(config: ExperimentConfig, task: Optional[Task] = None) -> ImageDataset | TextDataset:
    """The config's data set, cut to ``train_subset``/``test_subset`` examples (loaded once per process)."""
    key = repr((config.dataset.lower(), config.data_dir, sorted(config.data_options.items())))
    if key not in _CACHE:
        _CACHE.clear()  # keep at most one data set in memory
        _CACHE[key] = _load(config)
    return (task or task_of(config)).cut(config, dataclasses.replace(_CACHE[key]))


def _load(config: ExperimentConfig) -> ImageDataset | TextDataset:
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


def build_model(config: ExperimentConfig, dataset: ImageDataset | TextDataset, factory: Optional[ModelFactory] = None,
                task: Optional[Task] = None) -> nn.Module:
    """The config's model (``pipeprop.models.get(name, ...)`` or an importable ``"module:function"``).

    The builder receives, when it accepts them, ``norm``, ``num_classes``, ``in_channels``,
    ``image_size`` and ``image_shape`` (classification) or ``norm``, ``vocab_size`` and ``context``
    (language modelling), plus ``model_options``. Parameters are initialised from the global torch seed
    (set by the runner), so a run is reproducible.
    """
    candidates = (task or task_of(config)).model_candidates(config, dataset)
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
    """``pipeprop.models.get(name, norm=, num_classes=, in_channels=, in_features=)`` (classification) or
    ``get(name, norm=, vocab_size=, context=)`` (language modelling), dropping keywords it rejects."""
    try:
        from ..models import get
    except ImportError as err:
        raise ValueError(
            f"model {name!r} needs pipeprop.models, which this install lacks; give model as 'module:function'"
        ) from err
    if "image_shape" in candidates:
        c, h, w = candidates["image_shape"]
        extra = {"in_channels": c, "in_features": c * h * w}
        fixed = {"num_classes": candidates["num_classes"]}
    else:
        extra = {"vocab_size": candidates["vocab_size"], "context": candidates["context"]}
        fixed = {}
    extra = {k: v for k, v in extra.items() if k not in options}
    while True:
        try:
            return get(name, norm=candidates["norm"], **fixed, **extra, **options)
        except TypeError as err:
            rejected = [k for k in extra if f"'{k}'" in str(err)]
            if not rejected:
                raise
            for k in rejected:
                extra.pop(k)


def build_stream(config: ExperimentConfig, data: ImageDataset | TextDataset, total_steps: int,
                 device: torch.device | str = "cpu", task: Optional[Task] = None) -> Any:
    """The seeded, resumable stream of ``total_steps`` micro-batches of the run."""
    return (task or task_of(config)).stream(config, data, total_steps, device)


def build_lr_schedule(recipe: Any) -> Callable[[int], float]:
    """The schedule a :class:`~pipeprop.optim.PipelineOptimizer` applies at each stage's update count."""
    from .lr_schedule import SampleSchedule

    return SampleSchedule(recipe)


def optimizer_options(config: ExperimentConfig) -> dict[str, Any]:
    """Extra keywords for the method's optimizer (the optimizer choice itself travels in the scaled recipe,
    :meth:`~pipeprop.scaling.ScaledRecipe.optimizer_kwargs`, since its betas are scaled too)."""
    return dict(config.method_options)
