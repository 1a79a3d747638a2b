"""pipeprop: fine-grained asynchronous Pipelined Backpropagation at batch size one.

Quick use::

    import pipeprop
    losses = pipeprop.train(model, batches, loss_fn, method="pb+sc+lwp", lr=0.01, momentum=0.9)
"""

from .api import build_simulator, stage_param_groups, train
from .methods import Method, available_methods, get_method, register_method
from .optim import PipelineOptimizer, PipelineSGD
from .partition import Partition, Stage, partition
from .regime_warnings import LWPRegimeWarning
from .schedule import stage_delay, stage_delays
from .simulator import DivergenceError, PipelineSimulator

__version__ = "0.1.0"

__all__ = [
    "train",
    "build_simulator",
    "stage_param_groups",
    "Method",
    "available_methods",
    "get_method",
    "register_method",
    "PipelineOptimizer",
    "PipelineSGD",
    "Partition",
    "Stage",
    "partition",
    "stage_delay",
    "stage_delays",
    "PipelineSimulator",
    "DivergenceError",
    "LWPRegimeWarning",
]
