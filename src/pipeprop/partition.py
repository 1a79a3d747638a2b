"""Split an ``nn.Sequential`` model into pipeline stages.

Granularities:

* ``"layer"`` — fine-grained PB: every *compute layer* (a module that owns parameters and is not a
  normalization layer) starts a new stage; normalization layers and parameter-free modules
  (activations, pooling, reshapes) join the stage before them; leading parameter-free modules join the
  first stage. A module can force its behaviour with a boolean attribute ``pipeprop_starts_stage``.
* ``"block"`` — every top-level child of the model is one stage.
* an ``int`` S — S contiguous stages made of whole ``"layer"`` stages, balanced so that the largest
  stage holds as few parameters as possible.

Nested ``nn.Sequential`` containers are flattened for ``"layer"`` and ``int``. The stages *share* the
model's modules, so training the stages trains the model in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence, Union

from torch import nn

from .schedule import stage_delays

__all__ = ["Stage", "Partition", "partition", "flatten_sequential", "starts_stage", "Granularity"]

Granularity = Union[str, int]

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


def _owns_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def starts_stage(module: nn.Module) -> bool:
    """Whether ``module`` begins a new stage under ``"layer"`` granularity."""
    explicit = getattr(module, "pipeprop_starts_stage", None)
    if explicit is not None:
        return bool(explicit)
    if isinstance(module, _NORM_TYPES) or getattr(module, "pipeprop_is_norm", False):
        return False
    return _owns_parameters(module)


def flatten_sequential(model: nn.Module) -> list[nn.Module]:
    """The leaf modules of (possibly nested) ``nn.Sequential`` containers, in execution order."""
    if not isinstance(model, nn.Sequential):
        return [model]
    out: list[nn.Module] = []
    for child in model:
        out.extend(flatten_sequential(child))
    return out


class Stage(nn.Sequential):
    """One pipeline stage: an ``nn.Sequential`` of the model's own modules plus its index and delay."""

    def __init__(self, modules: Sequence[nn.Module], index: int, delay: int, names: Sequence[str] = ()) -> None:
        super().__init__(*modules)
        self.index = index
        self.delay = delay
        self.names = list(names) or [type(m).__name__ for m in modules]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"index={self.index}, delay={self.delay}"


@dataclass
class Partition:
    """The stages of a model and their PB delays (``D_s = 2(S-1-s) + offset``)."""

    stages: list[Stage]
    granularity: Granularity
    delay_offset: int = 0

    def __len__(self) -> int:
        return len(self.stages)

    def __iter__(self):
        return iter(self.stages)

    def __getitem__(self, i: int) -> Stage:
        return self.stages[i]

    @property
    def delays(self) -> list[int]:
        return [st.delay for st in self.stages]

    def parameters(self) -> Iterable[nn.Parameter]:
        for st in self.stages:
            yield from st.parameters()

    def weight_version_elements(self) -> int:
        """Elements held for stale weight versions in PB: ``sum_s D_s * |W_s|``."""
        return sum(st.delay * st.num_parameters() for st in self.stages)

    def weight_version_bytes(self) -> int:
        total = 0
        for st in self.stages:
            total += st.delay * sum(p.numel() * p.element_size() for p in st.parameters())
        return total

    def summary(self) -> str:
        """A readable table: stage, delay, #params, modules."""
        rows = [("stage", "delay", "params", "modules")]
        for st in self.stages:
            rows.append((str(st.index), str(st.delay), f"{st.num_parameters():,}", " > ".join(st.names)))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [
            f"{r[0]:>{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows
        ]
        total = sum(st.num_parameters() for st in self.stages)
        mib = self.weight_version_bytes() / 2**20
        lines.append(
            f"{len(self.stages)} stages ({self.granularity!r}), {total:,} parameters, "
            f"weight versions held by PB: {self.weight_version_elements():,} elements ({mib:.2f} MiB)"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _layer_groups(model: nn.Module) -> list[list[nn.Module]]:
    """Group flattened modules into ``"layer"`` stages."""
    groups: list[list[nn.Module]] = []
    for module in flatten_sequential(model):
        if groups and starts_stage(module) and any(starts_stage(m) for m in groups[-1]):
            groups.append([module])
        elif groups:
            groups[-1].append(module)  # followers, and leading parameter-free modules, join this stage
        else:
            groups.append([module])
    return groups


def _has_params(modules: Sequence[nn.Module]) -> bool:
    return any(_owns_parameters(m) for m in modules)


def _balanced_cuts(costs: Sequence[int], num_stages: int) -> list[int]:
    """Split ``costs`` into ``num_stages`` non-empty contiguous runs minimising the largest run sum.

    Returns the start index of each run (dynamic programme, O(n^2 S); n is the number of layers).
    """
    n = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: minimal max-run-sum splitting costs[:i] into k runs; back[k][i]: start of last run
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    back = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0
    for k in range(1, num_stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                cand = max(best[k - 1][j], prefix[i] - prefix[j])
                if cand < best[k][i]:
                    best[k][i], back[k][i] = cand, j
    starts, i = [], n
    for k in range(num_stages, 0, -1):
        j = back[k][i]
        starts.append(j)
        i = j
    return starts[::-1]


def partition(model: nn.Module, granularity: Granularity = "layer", *, delay_offset: int = 0) -> Partition:
    """Split ``model`` into pipeline stages with PB delays.

    Args:
        model: an ``nn.Sequential`` (nested Sequentials allowed), or a list of modules taken as the stages.
        granularity: ``"layer"``, ``"block"`` or a number of balanced stages.
        delay_offset: extra delay added to every stage (see :mod:`pipeprop.schedule`).
    """
    if isinstance(model, (list, tuple)):
        groups = [[m] for m in model]
        granularity = "explicit"
    else:
        if not isinstance(model, nn.Module):
            raise TypeError(f"partition() needs an nn.Module, got {type(model).__name__}")
        if not isinstance(model, nn.Sequential):
            raise TypeError(
                f"cannot partition {type(model).__name__}: pipeprop splits nn.Sequential models into stages. "
                "Write the model as nn.Sequential (residual blocks can carry the skip in a tuple, as "
                "pipeprop.models does) or pass a list of modules, one per stage."
            )
        if granularity == "block":
            groups = [[child] for child in model]
        elif granularity == "layer" or isinstance(granularity, int):
            groups = _layer_groups(model)
            n_layers = len(groups) if _has_params([m for g in groups for m in g]) else 0
            if isinstance(granularity, int) and not isinstance(granularity, bool):
                if granularity < 1 or granularity > n_layers:
                    raise ValueError(
                        f"cannot split the model into {granularity} stages: it has {n_layers} parametrized "
                        f"layers, so choose a stage count between 1 and {n_layers} (or partition='layer')."
                    )
                starts = _balanced_cuts(
                    [sum(p.numel() for m in g for p in m.parameters()) for g in groups], granularity
                )
                bounds = starts + [len(groups)]
                groups = [[m for g in groups[a:b] for m in g] for a, b in zip(bounds[:-1], bounds[1:])]
            else:
                granularity = "layer"
        else:
            raise ValueError(
                f"unknown partition granularity {granularity!r}: use 'layer', 'block' or a number of stages"
            )
    if not groups:
        raise ValueError("cannot partition an empty model")
    delays = stage_delays(len(groups), delay_offset)
    stages = [Stage(g, i, d) for i, (g, d) in enumerate(zip(groups, delays))]
    params = [p for st in stages for p in st.parameters()]
    if len({id(p) for p in params}) != len(params):
        raise ValueError("a parameter is shared by two stages; pipeline stages must own disjoint parameters")
    return Partition(stages, granularity, delay_offset)

