"""Training methods by name, and the optimizer as a separate choice.

A *method* says how the pipeline runs: delays on or off, which weights the backward pass uses
(``"pb"``: live, ``"stash"``: the forward's) and which mitigation options the per-stage optimizer gets
(Spike Compensation, Linear Weight Prediction, or a baseline mitigation's own optimizer class). The
*optimizer* (``"sgd"``, ``"adam"``, ``"adamw"``, ``"nadam"``) says which update rule every stage applies.
The two are orthogonal: ``get_method("pb+sc+lwp").build_optimizer(groups, optimizer="adamw", lr=...)``.
Baselines built on heavy-ball SGD (PipeMare, SpecTrain, ...) accept only ``optimizer="sgd"``.

Names are case-insensitive and have aliases, e.g. ``"sc"`` for ``"pb+sc"`` or ``"pipedream"`` for
``"pb+stash"``; :func:`register_method` adds new methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from .optim.base import PipelineOptimizer
from .optim.baselines import AdaptiveBrakingSGD, GradientShrinkSGD, PipeMare, SpecTrain
from .optim.pipeline_adam import PipelineAdam
from .optim.pipeline_sgd import PipelineSGD

__all__ = [
    "Method",
    "OPTIMIZERS",
    "register_method",
    "get_method",
    "available_methods",
    "available_optimizers",
    "normalize_optimizer",
]

#: optimizer name -> (class, fixed options); ``momentum`` is an SGD option, ``betas``/``eps`` Adam options
OPTIMIZERS: dict[str, tuple[type[PipelineOptimizer], dict[str, Any]]] = {
    "sgd": (PipelineSGD, {}),
    "adam": (PipelineAdam, {"variant": "adam"}),
    "adamw": (PipelineAdam, {"variant": "adam", "decoupled_weight_decay": True}),
    "nadam": (PipelineAdam, {"variant": "nadam"}),
}
_OPTIMIZER_ALIASES = {"sgdm": "sgd", "momentum": "sgd", "adam-w": "adamw"}


def available_optimizers() -> list[str]:
    return list(OPTIMIZERS)


def normalize_optimizer(name: str) -> str:
    """Canonical optimizer name; unknown names raise ``ValueError`` listing the choices."""
    key = str(name).strip().lower()
    key = _OPTIMIZER_ALIASES.get(key, key)
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    return key


@dataclass(frozen=True)
class Method:
    """A named training method.

    Attributes:
        name: canonical name, e.g. ``"pb+sc+lwp"``.
        optimizer: a fixed :class:`PipelineOptimizer` class (a baseline's own SGD variant), or ``None`` when
            the class follows the ``optimizer=`` choice (see :data:`OPTIMIZERS`).
        options: keyword arguments for the per-stage optimizer (users may override them).
        pipelined: ``False`` runs every stage with delay 0 (synchronous training).
        weight_mode: ``"pb"`` (backward through live weights) or ``"stash"`` (weight stashing).
        summary: one line for listings.
        aliases: other accepted names.
        optimizers: the optimizer choices this method supports (default: all, or ``("sgd",)`` for a fixed
            SGD-based class).
    """

    name: str
    optimizer: Optional[type[PipelineOptimizer]] = None
    options: Mapping[str, Any] = field(default_factory=dict)
    pipelined: bool = True
    weight_mode: str = "pb"
    summary: str = ""
    aliases: tuple[str, ...] = ()
    optimizers: Optional[tuple[str, ...]] = None

    def __post_init__(self) -> None:
        if self.optimizers is None:  # default: every optimizer, or only SGD for a fixed SGD-based class
            fixed = self.optimizer
            choices = tuple(OPTIMIZERS) if fixed is None else ("sgd",) if issubclass(fixed, PipelineSGD) else tuple(
                o for o in OPTIMIZERS if o != "sgd"
            )
            object.__setattr__(self, "optimizers", choices)
        object.__setattr__(self, "optimizers", tuple(normalize_optimizer(o) for o in self.optimizers))

    @property
    def default_optimizer(self) -> str:
        """The optimizer used when none is given: ``"sgd"``, or the only one the method supports."""
        return "sgd" if "sgd" in self.optimizers else self.optimizers[0]

    def optimizer_class(self, optimizer: str = "sgd") -> tuple[type[PipelineOptimizer], dict[str, Any]]:
        """The class and fixed options built for ``optimizer``; a clear error if the method does not support it."""
        opt = normalize_optimizer(optimizer)
        if opt not in self.optimizers:
            raise ValueError(
                f"method {self.name!r} is defined for optimizer(s) {', '.join(self.optimizers)} only, not {opt!r}; "
                f"use optimizer={self.optimizers[0]!r} or one of the methods {', '.join(_adaptive_methods())}"
            )
        if self.optimizer is not None:
            fixed = {k: v for k, v in OPTIMIZERS[opt][1].items()} if issubclass(self.optimizer, PipelineAdam) else {}
            return self.optimizer, fixed
        cls, fixed = OPTIMIZERS[opt]
        return cls, dict(fixed)

    def build_optimizer(
        self,
        groups: Sequence[dict[str, Any]],
        *,
        optimizer: Optional[str] = None,
        lr: float,
        momentum: Optional[float] = None,
        betas: Optional[Sequence[float]] = None,
        eps: Optional[float] = None,
        weight_decay: float = 0.0,
        **options: Any,
    ) -> PipelineOptimizer:
        """This method's per-stage optimizer over ``groups`` (one parameter group per stage).

        ``optimizer=None`` uses :attr:`default_optimizer` (``"sgd"`` for every method that supports it).
        ``momentum`` only for SGD; ``betas`` and ``eps`` only for the Adam family. ``options`` override the
        method's own options (e.g. ``lwp_horizon=4``).
        """
        opt = self.default_optimizer if optimizer is None else normalize_optimizer(optimizer)
        cls, fixed = self.optimizer_class(opt)
        kwargs: dict[str, Any] = {**fixed, **self.options, **options}
        if cls is PipelineAdam or issubclass(cls, PipelineAdam):
            if momentum not in (None, 0, 0.0):
                raise ValueError(
                    f"momentum={momentum} is an SGD option; optimizer={opt!r} uses betas=(beta1, beta2) "
                    "(beta1 plays the role of the momentum)"
                )
            if betas is not None:
                kwargs["betas"] = tuple(betas)
            if eps is not None:
                kwargs["eps"] = eps
            return cls(list(groups), lr=lr, weight_decay=weight_decay, **kwargs)
        for name, value in (("betas", betas), ("eps", eps)):
            if value is not None:
                raise ValueError(f"{name} is an Adam option; optimizer='sgd' uses momentum= (or choose optimizer='adamw')")
        return cls(list(groups), lr=lr, momentum=0.0 if momentum is None else momentum, weight_decay=weight_decay, **kwargs)


_SGD_ONLY = ("sgd",)

#: the built-in methods
METHODS: tuple[Method, ...] = (
    Method("sgd", pipelined=False, summary="synchronous training (no delay)", aliases=("plain", "sync")),
    Method("pb", summary="Pipelined Backpropagation, no mitigation", aliases=("none",)),
    Method("pb+sc", options={"spike_compensation": True}, summary="PB + Spike Compensation", aliases=("sc",)),
    Method("pb+lwp", options={"weight_prediction": True}, summary="PB + Linear Weight Prediction", aliases=("lwp",)),
    Method("pb+sc+lwp", options={"spike_compensation": True, "weight_prediction": True},
           summary="PB + Spike Compensation + Linear Weight Prediction", aliases=("sc+lwp", "pb+lwp+sc", "lwp+sc")),
    Method("pb+stash", weight_mode="stash", summary="PB + weight stashing (PipeDream)",
           aliases=("stash", "pipedream", "weight-stashing")),
    Method("pipemare", optimizer=PipeMare, optimizers=_SGD_ONLY,
           summary="PipeMare: per-stage lr warm-up + backward discrepancy correction", aliases=("pb+pipemare",)),
    Method("spectrain", optimizer=SpecTrain, optimizers=_SGD_ONLY,
           summary="SpecTrain: velocity-predicted weights in forward and backward", aliases=("pb+spectrain",)),
    Method("pb+shrink", optimizer=GradientShrinkSGD, optimizers=_SGD_ONLY,
           summary="PB + delay-dependent gradient shrinking", aliases=("shrink", "gradient-shrinking")),
    Method("pb+ab", optimizer=AdaptiveBrakingSGD, optimizers=_SGD_ONLY, summary="PB + Adaptive Braking",
           aliases=("ab", "adaptive-braking")),
    Method("pb+sc+ab", options={"spike_compensation": True}, optimizer=AdaptiveBrakingSGD, optimizers=_SGD_ONLY,
           summary="PB + Spike Compensation + Adaptive Braking", aliases=("sc+ab", "pb+ab+sc")),
    Method("pb+sc+lwp+ab", options={"spike_compensation": True, "weight_prediction": True}, optimizer=AdaptiveBrakingSGD,
           optimizers=_SGD_ONLY, summary="PB + SC + LWP + Adaptive Braking", aliases=("sc+lwp+ab",)),
    Method("pb+nesterov", options={"nesterov": True}, optimizers=_SGD_ONLY, summary="PB with Nesterov momentum",
           aliases=("nesterov",)),
    Method("sgd+nesterov", options={"nesterov": True}, pipelined=False, optimizers=_SGD_ONLY,
           summary="synchronous SGD with Nesterov momentum (no delay)"),
    Method("asyncpp", options={"betas": (0.99, 0.999), "decoupled_weight_decay": True}, weight_mode="stash",
           optimizers=("nadam",), summary="AsyncPP: NAdam (decoupled decay) with beta1 0.99 + weight stashing",
           aliases=("pb+asyncpp", "pipenag")),
)

_REGISTRY: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}


def _key(name: str) -> str:
    return str(name).strip().lower().replace(" ", "")


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` (and its aliases) to the registry."""
    key = _key(method.name)
    if key in _REGISTRY and not replace:
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTRY[key] = method
    for alias in method.aliases:
        _ALIASES[_key(alias)] = key
    return method


def available_methods() -> list[str]:
    """Canonical names of all registered methods."""
    return list(_REGISTRY)


def _adaptive_methods() -> list[str]:
    return [name for name, m in _REGISTRY.items() if "adamw" in m.optimizers]


def get_method(name: str) -> Method:
    """Look a method up by name or alias; unknown names raise ``ValueError`` listing the choices."""
    key = _key(name)
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        hint = ""
        if key in OPTIMIZERS and key != "sgd":
            hint = f" ({name!r} is an optimizer: pass optimizer={key!r} with a method such as 'sgd' or 'pb+sc+lwp')"
        raise ValueError(f"unknown method {name!r}{hint}; choose one of: {', '.join(_REGISTRY)}")
    return _REGISTRY[key]


for _method in METHODS:
    register_method(_method)
