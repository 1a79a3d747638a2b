"""Training methods by name: which optimizer, which options, delays on or off, stash or not.

``get_method("pb+sc+lwp")`` returns a :class:`Method`; :func:`register_method` adds new ones (the
baseline mitigations register themselves here too). Names are case-insensitive and have aliases, e.g.
``"sc"`` for ``"pb+sc"`` or ``"pipedream"`` for ``"pb+stash"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .optim.base import PipelineOptimizer
from .optim.pipeline_sgd import PipelineSGD

__all__ = ["Method", "register_method", "get_method", "available_methods"]


@dataclass(frozen=True)
class Method:
    """A named training method.

    Attributes:
        name: canonical name, e.g. ``"pb+sc+lwp"``.
        optimizer: the :class:`PipelineOptimizer` class built per pipeline.
        options: keyword arguments given to ``optimizer`` (users may override them).
        pipelined: ``False`` runs every stage with delay 0 (synchronous SGD).
        weight_mode: ``"pb"`` (backward through live weights) or ``"stash"`` (weight stashing).
        summary: one line for listings.
        aliases: other accepted names.
    """

    name: str
    optimizer: type[PipelineOptimizer]
    options: Mapping[str, Any] = field(default_factory=dict)
    pipelined: bool = True
    weight_mode: str = "pb"
    summary: str = ""
    aliases: tuple[str, ...] = ()


_REGISTRY: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` (and its aliases) to the registry."""
    key = method.name.lower()
    if key in _REGISTRY and not replace:
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTRY[key] = method
    for alias in method.aliases:
        _ALIASES[alias.lower()] = key
    return method


def available_methods() -> list[str]:
    """Canonical names of all registered methods."""
    _load_builtin_extensions()
    return list(_REGISTRY)


def get_method(name: str) -> Method:
    """Look a method up by name or alias; unknown names raise ``ValueError`` listing the choices."""
    _load_builtin_extensions()
    key = str(name).strip().lower().replace(" ", "")
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(_REGISTRY)}")
    return _REGISTRY[key]


_EXTENSIONS_LOADED = False


def _load_builtin_extensions() -> None:
    """Import modules that register further methods (baseline mitigations), once."""
    global _EXTENSIONS_LOADED
    if _EXTENSIONS_LOADED:
        return
    _EXTENSIONS_LOADED = True
    import importlib

    for module in ("pipeprop.optim.baselines",):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise


register_method(Method("sgd", PipelineSGD, {}, pipelined=False, summary="synchronous SGD (no delay)", aliases=("plain",)))
register_method(Method("pb", PipelineSGD, {}, summary="Pipelined Backpropagation, no mitigation", aliases=("none",)))
register_method(
    Method("pb+sc", PipelineSGD, {"spike_compensation": True}, summary="PB + Spike Compensation", aliases=("sc",))
)
register_method(
    Method("pb+lwp", PipelineSGD, {"weight_prediction": True}, summary="PB + Linear Weight Prediction", aliases=("lwp",))
)
register_method(
    Method(
        "pb+sc+lwp",
        PipelineSGD,
        {"spike_compensation": True, "weight_prediction": True},
        summary="PB + Spike Compensation + Linear Weight Prediction",
        aliases=("sc+lwp", "pb+lwp+sc", "lwp+sc"),
    )
)
register_method(
    Method(
        "pb+stash",
        PipelineSGD,
        {},
        weight_mode="stash",
        summary="PB + weight stashing (PipeDream)",
        aliases=("stash", "pipedream", "weight-stashing"),
    )
)
