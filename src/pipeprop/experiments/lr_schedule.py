"""Learning-rate schedules measured in samples, applied inside the optimizer at each stage's update count
(:meth:`pipeprop.optim.PipelineOptimizer.set_lr_schedule`)."""

from __future__ import annotations

import math

from ..scaling import ScaledRecipe

__all__ = ["lr_factor", "SampleSchedule"]


def lr_factor(samples: int, recipe: ScaledRecipe) -> float:
    """Multiplier of the base learning rate for the step that ends after ``samples`` samples.

    Linear warm-up over ``recipe.warmup_samples`` (reaching 1 at its end), then ``"step"`` (times
    ``gamma`` at each milestone passed), ``"cosine"`` (to ``recipe.min_lr_factor``, default 0, at
    ``total_samples``) or ``"constant"``.
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
        floor = recipe.min_lr_factor
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if recipe.schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {recipe.schedule!r}; choose step, cosine or constant")


class SampleSchedule:
    """Update index ``k`` of a stage (the update of micro-batch ``k``) -> factor at the update's *last*
    sample (picklable, no closures)."""

    def __init__(self, recipe: ScaledRecipe) -> None:
        self.recipe = recipe

    def __call__(self, update: int) -> float:
        return lr_factor((update + 1) * self.recipe.batch_size, self.recipe)
