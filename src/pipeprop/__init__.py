"""pipeprop: fine-grained asynchronous Pipelined Backpropagation at batch size one.

Quick use::

    import pipeprop
    losses = pipeprop.train(model, batches, loss_fn, method="pb+sc+lwp", lr=0.01, momentum=0.9)
    losses = pipeprop.train(model, batches, loss_fn, method="pb+sc+lwp", optimizer="adamw", lr=1e-3)
"""

from .api import build_simulator, stage_param_groups, train
from .methods import Method, available_methods, available_optimizers, get_method, register_method
from .multi_run import build_multi_simulator, train_many
from .optim import PipelineAdam, PipelineOptimizer, PipelineSGD
from .partition import Partition, Stage, partition
from .regime_warnings import LWPRegimeWarning
from .schedule import stage_delay, stage_delays
from .simulator import DivergenceError, PipelineSimulator
from .tick_engine import TickPipeline, build_tick_pipeline

__version__ = "0.1.0"

__all__ = [
    "train",
    "train_many",
    "build_simulator",
    "build_multi_simulator",
    "build_tick_pipeline",
    "TickPipeline",
    "stage_param_groups",
    "Method",
    "available_methods",
    "get_method",
    "register_method",
    "available_optimizers",
    "PipelineOptimizer",
    "PipelineSGD",
    "PipelineAdam",
    "Partition",
    "Stage",
    "partition",
    "stage_delay",
    "stage_delays",
    "PipelineSimulator",
    "DivergenceError",
    "LWPRegimeWarning",
]
