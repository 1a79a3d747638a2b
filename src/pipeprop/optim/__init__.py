"""Per-stage optimizers for pipeline training (``torch.optim.Optimizer`` subclasses)."""

from .base import PipelineOptimizer
from .pipeline_sgd import PipelineSGD, lwp_coefficient, spike_coefficients

__all__ = ["PipelineOptimizer", "PipelineSGD", "spike_coefficients", "lwp_coefficient"]
