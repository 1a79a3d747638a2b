"""The other mitigations of asynchronous pipelines, as :class:`~pipeprop.optim.PipelineSGD` subclasses.

Importing this package registers their method names in :mod:`pipeprop.methods` (done automatically on the
first method lookup): ``pipemare``, ``spectrain``, ``pb+shrink``, ``pb+ab``, ``pb+sc+ab``, ``pb+sc+lwp+ab``,
``pb+nesterov`` and ``sgd+nesterov``. Formulas, options and sources: docs/methods.md.
"""

from __future__ import annotations

from ...methods import Method, get_method, register_method
from ..pipeline_sgd import PipelineSGD
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

_METHODS = (
    Method("pipemare", PipeMare, {}, summary="PipeMare: per-stage lr warm-up + backward discrepancy correction",
           aliases=("pb+pipemare",)),
    Method("spectrain", SpecTrain, {}, summary="SpecTrain: velocity-predicted weights in forward and backward",
           aliases=("pb+spectrain",)),
    Method("pb+shrink", GradientShrinkSGD, {}, summary="PB + delay-dependent gradient shrinking",
           aliases=("shrink", "gradient-shrinking")),
    Method("pb+ab", AdaptiveBrakingSGD, {}, summary="PB + Adaptive Braking", aliases=("ab", "adaptive-braking")),
    Method("pb+sc+ab", AdaptiveBrakingSGD, {"spike_compensation": True}, summary="PB + Spike Compensation + Adaptive Braking",
           aliases=("sc+ab", "pb+ab+sc")),
    Method("pb+sc+lwp+ab", AdaptiveBrakingSGD, {"spike_compensation": True, "weight_prediction": True},
           summary="PB + SC + LWP + Adaptive Braking", aliases=("sc+lwp+ab",)),
    Method("pb+nesterov", PipelineSGD, {"nesterov": True}, summary="PB with Nesterov momentum", aliases=("nesterov",)),
    Method("sgd+nesterov", PipelineSGD, {"nesterov": True}, pipelined=False,
           summary="synchronous SGD with Nesterov momentum (no delay)"),
)


def _register() -> None:
    for method in _METHODS:
        try:
            existing = get_method(method.name)
        except ValueError:
            existing = None
        if existing is None:
            register_method(method)
        elif existing.optimizer is not method.optimizer:
            raise RuntimeError(f"method name {method.name!r} is already taken by {existing.optimizer.__name__}")


_register()
