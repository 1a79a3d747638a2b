"""Split a model into pipeline stages.

An ``nn.Sequential`` of layers is split by its modules, as below. Any other ``nn.Module`` (and an
``nn.Sequential`` wrapping a module that holds several layers) has its forward captured as a graph and
the graph cut into stages (:mod:`pipeprop.graph_capture`; needs ``example_input``), with the same
granularities read from the modules that run each graph node, plus explicit ``split_points``.

Granularities:

* ``"layer"`` — fine-grained PB: every *compute layer* (a module that owns parameters and is not a
  normalization layer) starts a new stage; normalization layers and parameter-free modules
  (activations, pooling, reshapes) join the stage before them; leading parameter-free modules join the
  first stage. A module can force its behaviour with a boolean attribute ``pipeprop_starts_stage``.
* ``"block"`` — every top-level child of the model is one stage.
* an ``int`` S — S contiguous stages made of whole ``"layer"`` stages, balanced so that the largest
  stage holds as few parameters as possible.

Nested ``nn.Sequential`` containers are flattened for ``"layer"`` and ``int``. The stages *share* the
model's modules, so training the stages trains the model in place. A parameter read by several stages
(tied weights) is one parameter; the first stage reading it owns its update (see
:func:`pipeprop.stage_param_groups`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence, Union

from torch import nn

from . import graph_capture as gc
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

    def __init__(
        self, modules: Sequence[nn.Module], index: int, delay: int, names: Sequence[str] = (), nodes: Sequence[str] = ()
    ) -> None:
        super().__init__(*modules)
        self.index = index
        self.delay = delay
        self.names = list(names) or [type(m).__name__ for m in modules]
        self.nodes = list(nodes)  # graph nodes of a captured model's stage

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
    #: whether the stages were cut from a captured graph (:mod:`pipeprop.graph_capture`)
    captured: bool = False

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
        """Every parameter once (a parameter shared by several stages is yielded for the first)."""
        seen: set[int] = set()
        for st in self.stages:
            for p in st.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def shared_parameters(self) -> list[tuple[nn.Parameter, list[int]]]:
        """Parameters read by more than one stage, with the stages that read them."""
        readers: dict[int, tuple[nn.Parameter, list[int]]] = {}
        for st in self.stages:
            for p in st.parameters():
                readers.setdefault(id(p), (p, []))[1].append(st.index)
        return [(p, ss) for p, ss in readers.values() if len(ss) > 1]

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
            what = " > ".join(st.names)
            if st.nodes:
                shown = ", ".join(st.nodes[:8]) + (f", ... ({len(st.nodes)} nodes)" if len(st.nodes) > 8 else "")
                what = f"{what or '(no module)'}  [nodes: {shown}]"
            rows.append((str(st.index), str(st.delay), f"{st.num_parameters():,}", what))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [
            f"{r[0]:>{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows
        ]
        total = sum(p.numel() for p in self.parameters())
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


def _holds_several_layers(module: nn.Module) -> bool:
    """A non-Sequential module with two or more layers inside (it must be split through its graph)."""
    return not isinstance(module, nn.Sequential) and sum(1 for m in module.modules() if gc._is_layer(m)) > 1


def partition(
    model: nn.Module,
    granularity: Granularity = "layer",
    *,
    delay_offset: int = 0,
    example_input: Any = None,
    example_target: Any = None,
    split_points: Optional[Sequence[str]] = None,
) -> Partition:
    """Split ``model`` into pipeline stages with PB delays.

    Args:
        model: any ``nn.Module`` whose forward ``torch.export`` can capture (an ``nn.Sequential`` of layers is
            split by its modules without capture), or a list of modules taken as the stages.
        granularity: ``"layer"``, ``"block"`` or a number of balanced stages.
        delay_offset: extra delay added to every stage (see :mod:`pipeprop.schedule`).
        example_input: one micro-batch (a tensor, or a tuple of the forward's positional arguments), needed to
            capture a model that is not an ``nn.Sequential`` of layers.
        example_target: for a model that computes its own loss (``loss_fn=None``): the target passed with the
            example input (as ``labels=`` when the forward takes it, else as the second argument).
        split_points: module names (e.g. ``["layer2", "layer3.1"]``) at which new stages begin; overrides
            ``granularity``. Captures the graph.
    """
    captured = (
        split_points is not None
        or example_target is not None
        or (isinstance(model, nn.Module) and not isinstance(model, nn.Sequential))
        or (isinstance(model, nn.Sequential) and any(_holds_several_layers(m) for m in flatten_sequential(model)))
    )
    if isinstance(model, (list, tuple)):
        groups = [[m] for m in model]
        granularity = "explicit"
    elif not isinstance(model, nn.Module):
        raise TypeError(f"partition() needs an nn.Module, got {type(model).__name__}")
    elif captured:
        return _partition_graph(model, granularity, delay_offset, example_input, example_target, split_points)
    else:
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
    return Partition(stages, granularity, delay_offset)


def _partition_graph(
    model: nn.Module,
    granularity: Granularity,
    delay_offset: int,
    example_input: Any,
    example_target: Any,
    split_points: Optional[Sequence[str]],
) -> Partition:
    cap = gc.capture(model, example_input, example_target)
    if split_points is not None:
        stage_of = gc.stages_from_split_points(cap, list(split_points))
        granularity = "split_points"
    elif granularity == "block":
        stage_of = gc.stages_from_units(gc.block_units(cap))
    elif granularity == "layer" or (isinstance(granularity, int) and not isinstance(granularity, bool)):
        stage_of = gc.stages_from_units(gc.layer_units(cap))
        if not isinstance(granularity, str):
            stage_of = _balance(cap, stage_of, granularity)
    else:
        raise ValueError(
            f"unknown partition granularity {granularity!r}: use 'layer', 'block' or a number of stages"
        )
    pieces = gc.split(cap, stage_of)
    delays = stage_delays(len(pieces), delay_offset)
    stages = [
        Stage([module], i, d, names=names or [f"stage{i}"], nodes=nodes)
        for i, ((module, names, nodes), d) in enumerate(zip(pieces, delays))
    ]
    return Partition(stages, granularity, delay_offset, captured=True)


def _balance(cap: "gc.CapturedModel", layer_stage_of: list[int], num_stages: int) -> list[int]:
    """Group ``"layer"`` stages into ``num_stages`` balanced contiguous stages (parameters counted once)."""
    n_layers = max(layer_stage_of) + 1 if layer_stage_of else 0
    seen: set[int] = set()
    costs = [0] * n_layers
    for node, s in zip(cap.nodes, layer_stage_of):
        for a in node.all_input_nodes:
            p = cap.params.get(a.name)
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                costs[s] += p.numel()
    if num_stages < 1 or num_stages > n_layers or not any(costs):
        raise ValueError(
            f"cannot split the model into {num_stages} stages: it has {n_layers} parametrized layers, so choose "
            f"a stage count between 1 and {n_layers} (or partition='layer')."
        )
    starts = _balanced_cuts(costs, num_stages)
    layer_to_stage = {}
    bounds = starts + [n_layers]
    for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        for layer in range(a, b):
            layer_to_stage[layer] = k
    return [layer_to_stage[s] for s in layer_stage_of]

