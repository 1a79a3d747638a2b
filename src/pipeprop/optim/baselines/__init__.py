"""The other mitigations of asynchronous pipelines, as :class:`~pipeprop.optim.PipelineSGD` subclasses.

Their method names (``pipemare``, ``spectrain``, ``pb+shrink``, ``pb+ab``, ``pb+sc+ab``, ``pb+sc+lwp+ab``)
are in the table of :mod:`pipeprop.methods`. Formulas, options and sources: docs/methods.md.
"""

from __future__ import annotations

from .braking import AdaptiveBrakingSGD
from .pipemare import PipeMare, pipemare_decay, pipemare_lr_factor
from .shrink import GradientShrinkSGD, shrink_factor
from .spectrain import SpecTrain

__all__ = [
    "PipeMare",
    "SpecTrain",
    "GradientShrinkSGD",
    "AdaptiveBrakingSGD",
    "pipemare_lr_factor",
    "pipemare_decay",
    "shrink_factor",
]
