"""Learning-rate schedules measured in samples, applied through ``torch.optim.lr_scheduler.LambdaLR``."""

from __future__ import annotations

import math

import torch

from ..scaling import ScaledRecipe

__all__ = ["lr_factor", "SampleSchedule", "make_scheduler"]


def lr_factor(samples: int, recipe: ScaledRecipe) -> float:
    """Multiplier of the base learning rate for the step that ends after ``samples`` samples.

    Linear warm-up over ``recipe.warmup_samples`` (reaching 1 at its end), then ``"step"`` (times
    ``gamma`` at each milestone passed), ``"cosine"`` (to 0 at ``total_samples``) or ``"constant"``.
    """
    warm = recipe.warmup_samples
    if warm > 0 and samples < warm:
        return samples / warm
    if recipe.schedule == "step":
        passed = sum(1 for m in recipe.milestone_samples if samples > m)
        return recipe.gamma**passed
    if recipe.schedule == "cosine":
        total = recipe.total_samples or 0
        if total <= warm:
            return 1.0
        progress = min(1.0, max(0.0, (samples - warm) / (total - warm)))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if recipe.schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {recipe.schedule!r}; choose step, cosine or constant")


class SampleSchedule:
    """``LambdaLR`` lambda: step index -> factor of the step's *last* sample (picklable, no closures)."""

    def __init__(self, recipe: ScaledRecipe) -> None:
        self.recipe = recipe

    def __call__(self, step: int) -> float:
        return lr_factor((step + 1) * self.recipe.batch_size, self.recipe)


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: ScaledRecipe) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` whose ``step()`` is called after every micro-batch."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, SampleSchedule(recipe))
