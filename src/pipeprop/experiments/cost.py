"""Rough cost estimates of configs for ``reproduce --list`` (no data is loaded)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .config import ExperimentConfig, method_entry

__all__ = ["DATASET_SHAPES", "CostEstimate", "count_macs", "estimate_cost", "format_seconds"]

#: (image shape, classes, training examples) of the data sets the configs use
DATASET_SHAPES: dict[str, tuple[tuple[int, int, int], int, int]] = {
    "digits": ((1, 8, 8), 10, 1348),
    "mnist": ((1, 28, 28), 10, 60_000),
    "fashion-mnist": ((1, 28, 28), 10, 60_000),
    "cifar10": ((3, 32, 32), 10, 50_000),
    "cifar100": ((3, 32, 32), 100, 50_000),
    "imagenet": ((3, 64, 64), 1000, 1_281_167),  # image_size from data_options (loader default 64)
}
#: (vocabulary, training characters) of the language-modelling data sets (a sample is one sequence of ``context``)
TEXT_SHAPES: dict[str, tuple[int, int]] = {"tinyshakespeare": (65, 1_003_854)}
_DATASET_ALIASES = {"imagenet-folder": "imagenet", "cifar-10": "cifar10", "cifar-100": "cifar100", "fashion": "fashion-mnist",
                    "mnist-10k": "mnist"}

# Throughput assumptions (documented in docs/experiments.md): sustained FLOP/s at batch size one, and a
# fixed per-stage cost of the simulator per step (kernel launches, weight swaps, ring-buffer copies).
_FLOPS = {"cpu": 1e10, "cuda": 4e12}
_STAGE_OVERHEAD_S = {"cpu": 1.2e-3, "cuda": 3e-4}


@dataclass
class CostEstimate:
    """Runs, samples and an estimated time of one config's sweep (``methods x seeds``)."""

    runs: int
    samples: int
    macs_per_sample: Optional[int]
    stages: Optional[int]
    seconds: Optional[float]
    longest_run_seconds: Optional[float] = None


def count_macs(model: nn.Module, image_shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> int:
    """Multiply-accumulates of one forward pass of one sample of shape ``image_shape`` (for a language model:
    ``(context,)`` with ``dtype=torch.long``), from torch's FLOP counter, halved."""
    from ..distributed.assignment import forward_flops

    was_training = model.training
    model.eval()
    try:
        flops, _ = forward_flops(model, torch.zeros(1, *image_shape, dtype=dtype))
    finally:
        model.train(was_training)
    return int(flops) // 2


def _samples(config: ExperimentConfig, train_size: int) -> int:
    size = min(train_size, config.train_subset) if config.train_subset else train_size
    return config.total_samples(size)


def estimate_cost(config: ExperimentConfig, *, with_model: bool = True) -> CostEstimate:
    """Training samples of the whole sweep and a rough wall-clock time on ``config.device``.

    Each step costs ``3 x forward FLOPs / throughput`` plus a per-stage simulator overhead; evaluation
    is ignored. A measured ``est_sample_seconds`` in the config replaces the model.
    """
    from ..data.registry import canonical_dataset

    key = config.dataset.lower()
    shape, classes, train_size = DATASET_SHAPES.get(_DATASET_ALIASES.get(key, key), (None, 10, 0))
    text = TEXT_SHAPES.get(canonical_dataset(key)) if config.task == "language-modelling" else None
    if text is not None:
        classes, shape = text[0], (config.sequence_length,)
        train_size = (text[1] - 1) // config.sequence_length
    if shape is not None and "image_size" in config.data_options:
        size = int(config.data_options["image_size"])
        shape = (shape[0], size, size)
    if "max_per_class" in config.data_options:
        train_size = min(train_size, classes * int(config.data_options["max_per_class"]))
    entries = [method_entry(config, m)[1] for m in config.methods]
    runs = len(entries) * len(config.seeds)
    samples = sum(_samples(c, train_size) for c in entries) * len(config.seeds) if train_size else 0
    macs = stages = None
    seconds = longest = None
    if config.est_sample_seconds is not None:
        seconds = samples * config.est_sample_seconds
        longest = max(_samples(c, train_size) for c in entries) * config.est_sample_seconds
    elif with_model and shape is not None:
        try:
            from ..partition import partition
            from .builders import _zoo_model

            if text is not None:
                candidates = {"norm": config.norm, "vocab_size": classes, "context": config.sequence_length}
            else:
                candidates = {"norm": config.norm, "num_classes": classes, "image_shape": shape}
            model = _zoo_model(config.model, candidates, dict(config.model_options))
            macs = count_macs(model, shape, torch.long if text is not None else torch.float32)
            stages = len(partition(model, config.partition))
        except Exception:  # noqa: BLE001 - an estimate must never break a listing
            macs = stages = None
        if macs is not None and train_size:
            dev = "cuda" if config.device.startswith("cuda") else "cpu"
            per_run = []
            for c in entries:
                steps = _samples(c, train_size) / c.micro_batch
                step_s = 6.0 * macs * c.micro_batch / _FLOPS[dev] + (stages or 1) * _STAGE_OVERHEAD_S[dev]
                per_run.append(steps * step_s)
            seconds, longest = sum(per_run) * len(config.seeds), max(per_run)
    return CostEstimate(runs, samples, macs, stages, seconds, longest)


def format_seconds(seconds: Optional[float]) -> str:
    """``"3.2 h"``, ``"12 min"``, ``"40 s"`` or ``"?"``."""
    if seconds is None:
        return "?"
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"
