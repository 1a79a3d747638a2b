"""Build the data set, model and loss of a run from its config."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..data import ImageDataset, load_digits
from .config import ExperimentConfig

__all__ = ["build_dataset", "build_model", "build_augment", "ModelFactory"]

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
