"""Per-stage optimizers for pipeline training (``torch.optim.Optimizer`` subclasses)."""

from .base import PipelineOptimizer
from .pipeline_adam import PipelineAdam, adam_sc_coefficient
from .pipeline_sgd import PipelineSGD, lwp_coefficient, spike_coefficients

__all__ = ["PipelineOptimizer", "PipelineSGD", "PipelineAdam", "spike_coefficients", "lwp_coefficient", "adam_sc_coefficient"]
