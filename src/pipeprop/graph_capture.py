"""Pipeline stages from any ``nn.Module``: capture its forward as a graph and cut the graph into stages.

The forward is captured with :func:`torch.export.export` (non-strict mode, training IR). We chose
``torch.export`` over ``torch.fx.symbolic_trace`` because it traces by *running* the model on an
example input: asserts on sizes, ``torch.arange`` positions, ``F.scaled_dot_product_attention``,
in-place ``out += identity``, ``nn.ReLU(inplace=True)`` and Hugging Face models work unmodified, whereas
symbolic tracing fails on any Python that looks at a tensor's value or size. The price: the graph is
specialised to the example input's shapes (every micro-batch must have them; a clear error says so).

Every node of the captured graph knows the module that ran it (``nn_module_stack``). A granularity
turns that into one stage index per node (non-decreasing in graph order), and each stage becomes a
``torch.fx.GraphModule`` whose inputs are the values produced before it and still needed by it or by a
later stage (skips, positions, masks travel with the activations), and whose outputs are the values
needed afterwards. The stage modules hold the user's own ``nn.Parameter`` objects (training updates the
model in place), and a parameter read by several stages (tied weights) is one parameter in all of them.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils import _pytree as pytree

__all__ = ["ModelInputs", "CapturedModel", "capture", "model_inputs", "loss_from_output", "GraphStage"]

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass
class ModelInputs:
    """Positional and keyword arguments of a model's forward (one micro-batch)."""

    args: tuple
    kwargs: dict = field(default_factory=dict)

    @staticmethod
    def of(x: Any) -> "ModelInputs":
        """A tensor is the single argument; a tuple or list are the positional arguments."""
        if isinstance(x, ModelInputs):
            return x
        if isinstance(x, (tuple, list)):
            return ModelInputs(tuple(x))
        return ModelInputs((x,))


def _target_keyword(model: nn.Module) -> Optional[str]:
    """``"labels"`` when the model's forward takes it (Hugging Face), else None (target goes second)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    return "labels" if "labels" in params else None


def model_inputs(x: Any, target: Any, target_keyword: Optional[str]) -> ModelInputs:
    """The forward arguments for a model that computes its own loss from ``target``."""
    inp = ModelInputs.of(x)
    if target_keyword is not None:
        return ModelInputs(inp.args, {**inp.kwargs, target_keyword: target})
    return ModelInputs(inp.args + (target,), dict(inp.kwargs))


def loss_from_output(output: Any, _target: Any = None) -> Tensor:
    """The loss a model returned: a scalar tensor, the last element of a tuple, or ``.loss``."""
    if isinstance(output, Tensor):
        loss = output
    elif getattr(output, "loss", None) is not None:
        loss = output.loss
    elif isinstance(output, (tuple, list)) and output and isinstance(output[-1], Tensor):
        loss = output[-1]
    else:
        raise TypeError(
            f"loss_fn=None needs a model that returns its loss (a scalar tensor, a tuple ending with it, or an "
            f"object with .loss); this model returned {type(output).__name__}. Pass a loss_fn instead."
        )
    if loss.dim() != 0:
        raise ValueError(
            f"the model returned a loss of shape {tuple(loss.shape)}, not a scalar; pass a loss_fn instead"
        )
    return loss


# ----------------------------------------------------------------------------------------------- capture
#: dtype assertions export adds after ``.to()`` calls; under autocast the dtypes legitimately differ from
#: the capture's (stage 0 checks its inputs' shapes and dtypes itself)
_DROPPED = {torch.ops.aten._assert_tensor_metadata.default}


@dataclass
class CapturedModel:
    """A model's exported forward plus what is needed to cut it."""

    model: nn.Module
    program: torch.export.ExportedProgram
    nodes: list[fx.Node]  # call_function nodes in graph order
    owner: dict[str, nn.Module]  # node name -> innermost module that ran it (the root when none)
    stack: dict[str, list[str]]  # node name -> module paths, outermost first
    params: dict[str, nn.Parameter]  # placeholder name -> the user's parameter
    attrs: dict[str, Tensor]  # placeholder name -> buffer or constant tensor of the model
    param_names: dict[int, str]  # id(parameter) -> first qualified name
    target_keyword: Optional[str] = None
    has_target: bool = False


def capture(model: nn.Module, example_input: Any, example_target: Any = None) -> CapturedModel:
    """Export ``model``'s forward on ``example_input`` (and, for a model computing its own loss, the target)."""
    if example_input is None:
        raise TypeError(
            f"partitioning {type(model).__name__} (not an nn.Sequential of layers) needs its forward captured as "
            "a graph: pass example_input=<one micro-batch> (pipeprop.train does this with the first batch)"
        )
    keyword = _target_keyword(model) if example_target is not None else None
    inp = model_inputs(example_input, example_target, keyword) if example_target is not None else ModelInputs.of(example_input)
    try:
        program = torch.export.export(model, inp.args, inp.kwargs, strict=False)
    except Exception as err:  # noqa: BLE001 - re-raised with the fix
        if example_target is not None:
            hint = (
                " With loss_fn=None the target is passed to the model (as labels= when its forward takes it, else as "
                "the second argument) and the model must return its loss; otherwise pass a loss_fn."
            )
        else:
            hint = ""
        raise RuntimeError(
            f"pipeprop could not capture the forward of {type(model).__name__} as a graph with torch.export "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Make the forward traceable "
            "(no data-dependent Python control flow on tensor values; Hugging Face models: use_cache=False), or "
            "write the model as an nn.Sequential." + hint
        ) from err
    sig = program.graph_signature
    named_modules = dict(model.named_modules(remove_duplicate=False))
    params: dict[str, nn.Parameter] = {}
    attrs: dict[str, Tensor] = {}
    for spec in sig.input_specs:
        kind = spec.kind.name
        name = spec.arg.name
        if kind == "PARAMETER":
            params[name] = model.get_parameter(spec.target)
        elif kind == "BUFFER":
            attrs[name] = model.get_buffer(spec.target)
        elif kind in ("CONSTANT_TENSOR", "CUSTOM_OBJ"):
            attrs[name] = program.constants[spec.target]
    if sig.buffers_to_mutate or sig.user_inputs_to_mutate:
        raise ValueError(
            f"{type(model).__name__}'s captured forward writes buffers or inputs outside the graph "
            f"({list(sig.buffers_to_mutate.values()) + list(sig.user_inputs_to_mutate.values())}); pipeprop "
            "cannot split it. Write the update in place (buffer.add_(...)) or as an nn.Sequential."
        )
    nodes, owner, stack = [], {}, {}
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target in _DROPPED:
            continue
        nodes.append(node)
        paths = [path for path, _ in node.meta.get("nn_module_stack", {}).values()]
        stack[node.name] = paths
        owner[node.name] = named_modules.get(paths[-1], model) if paths else model
    param_names: dict[int, str] = {}
    for qual, p in model.named_parameters(remove_duplicate=False):
        param_names.setdefault(id(p), qual)
    return CapturedModel(model, program, nodes, owner, stack, params, attrs, param_names, keyword, example_target is not None)


# ----------------------------------------------------------------------------------------------- units
def _is_norm(module: nn.Module) -> bool:
    """Normalization layers join the stage before them (including e.g. Hugging Face's ``LlamaRMSNorm``)."""
    explicit = getattr(module, "pipeprop_is_norm", None)
    if explicit is not None:
        return bool(explicit)
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith(("Norm", "Norm2d", "Norm1d"))


def _is_layer(module: nn.Module) -> bool:
    """A module that starts a stage under ``"layer"``: it owns parameters directly (a parametrized weight
    counts as its own) and is not a norm."""
    explicit = getattr(module, "pipeprop_starts_stage", None)
    if explicit is not None:
        return bool(explicit)
    if _is_norm(module) or isinstance(module, parametrize.ParametrizationList):
        return False
    return parametrize.is_parametrized(module) or any(True for _ in module.parameters(recurse=False))


def _param_inputs(cap: CapturedModel, node: fx.Node) -> list[nn.Parameter]:
    return [cap.params[a.name] for a in node.all_input_nodes if a.op == "placeholder" and a.name in cap.params]


def layer_units(cap: CapturedModel) -> list[Optional[str]]:
    """Per node, the layer it belongs to (a module path), or None for parameter-free ops and norms."""
    modules = dict(cap.model.named_modules(remove_duplicate=False))
    units: list[Optional[str]] = []
    for node in cap.nodes:
        unit = None
        for path in reversed(cap.stack[node.name]):
            if path in modules and _is_layer(modules[path]):
                unit = path
                break
        if unit is None and not any(path in modules and _is_norm(modules[path]) for path in cap.stack[node.name]):
            ps = _param_inputs(cap, node)
            if ps:  # a weight used directly by code outside any layer module (e.g. x @ wte.weight.T)
                name = cap.param_names.get(id(ps[0]), "")
                unit = name.rsplit(".", 1)[0] if "." in name else name
        units.append(unit)
    return units


def block_units(cap: CapturedModel) -> list[Optional[str]]:
    """Per node, its block: the outermost non-container module below the root (blocks of a ModuleList)."""
    modules = dict(cap.model.named_modules(remove_duplicate=False))
    units: list[Optional[str]] = []
    for node in cap.nodes:
        unit = None
        for path in cap.stack[node.name]:
            mod = modules.get(path)
            if path == "" or mod is None or isinstance(mod, _CONTAINERS):
                continue
            starts = _is_layer(mod) or (not _is_norm(mod) and any(True for _ in mod.parameters()))
            unit = path if starts else None
            break
        units.append(unit)
    return units


def stages_from_units(units: Sequence[Optional[str]]) -> list[int]:
    """Stage index per node: a new stage begins where a new unit begins and the current stage has one."""
    stage, has_unit, last = 0, False, None
    out = []
    for u in units:
        if u is not None and u != last:
            if has_unit:
                stage += 1
            has_unit = True
        if u is not None:
            last = u
        out.append(stage)
    return out


def stages_from_split_points(cap: CapturedModel, split_points: Sequence[str]) -> list[int]:
    """Stage index per node: a new stage begins at the first node run inside each named module."""
    modules = dict(cap.model.named_modules(remove_duplicate=False))
    missing = [p for p in split_points if p not in modules]
    if missing:
        raise ValueError(f"split_points {missing} are not modules of the model; names look like {list(modules)[1:6]}")
    pending = list(split_points)
    stage, out = 0, []
    for node in cap.nodes:
        paths = cap.stack[node.name]
        while pending and pending[0] in paths:
            if out:
                stage += 1
            pending.pop(0)
        out.append(stage)
    if pending:
        raise ValueError(
            f"split point {pending[0]!r} never runs after the previous split point in the captured forward; "
            "list split_points in execution order"
        )
    return out


# ----------------------------------------------------------------------------------------------- stages
def _attr_name(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", name)


class GraphStage(nn.Module):
    """Runs one stage's piece of a captured graph.

    Stage 0 takes the model's input (a tensor, a tuple of positional arguments, or :class:`ModelInputs`);
    later stages take the tuple of values the stage before returned. The last stage returns the model's
    output structure; others return the tuple of values later stages need.
    """

    def __init__(
        self,
        graph_module: fx.GraphModule,
        *,
        in_spec: Any = None,
        input_shapes: Sequence[Any] = (),
        input_dtypes: Sequence[Any] = (),
        out_spec: Any = None,
        target_keyword: Optional[str] = None,
        takes_target: bool = False,
    ) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.in_spec = in_spec
        self.input_shapes = list(input_shapes)
        self.input_dtypes = list(input_dtypes)
        self.out_spec = out_spec
        self.target_keyword = target_keyword
        self.takes_target = takes_target

    def forward(self, carried: Any) -> Any:
        if self.in_spec is not None:
            inp = ModelInputs.of(carried)
            flat, spec = pytree.tree_flatten((inp.args, inp.kwargs))
            if spec != self.in_spec:
                raise ValueError(
                    f"the model was captured for inputs structured as {self.in_spec}, got {spec}; pass micro-batches "
                    "like the example input"
                )
            for i, (t, shape, dtype) in enumerate(zip(flat, self.input_shapes, self.input_dtypes)):
                if isinstance(t, Tensor) and dtype is not None and t.dtype != dtype:
                    raise ValueError(
                        f"input {i} is {t.dtype} but the model's graph was captured for {dtype}; pass inputs of that "
                        "dtype (precision='64' converts them)"
                    )
                if isinstance(t, Tensor) and shape is not None and tuple(t.shape) != shape:
                    raise ValueError(
                        f"input {i} has shape {tuple(t.shape)} but the model's graph was captured for {shape}: every "
                        "micro-batch must have the example input's shape (drop a smaller last batch, or partition "
                        "again with an example of this shape)"
                    )
        else:
            flat = carried
        out = self.graph_module(*flat)
        if self.out_spec is not None:
            return pytree.tree_unflatten(list(out), self.out_spec)
        return tuple(out)


def split(cap: CapturedModel, stage_of: Sequence[int]) -> list[tuple[GraphStage, list[str], list[str]]]:
    """Cut the captured graph; returns per stage (module, layer/module names, node names)."""
    n_stages = max(stage_of) + 1 if stage_of else 1
    stage_idx = {node.name: s for node, s in zip(cap.nodes, stage_of)}
    graph = cap.program.graph
    user_inputs = [n for n in graph.nodes if n.op == "placeholder" and n.name not in cap.params and n.name not in cap.attrs]
    output_node = next(n for n in graph.nodes if n.op == "output")
    outputs = list(output_node.args[0])

    # the last stage that reads each value (a user output counts as read by the last stage)
    last_use: dict[str, int] = {}
    for node in cap.nodes:
        for a in node.all_input_nodes:
            last_use[a.name] = max(last_use.get(a.name, -1), stage_idx[node.name])
    for o in outputs:
        if isinstance(o, fx.Node):
            last_use[o.name] = n_stages - 1
    produced_in = {n.name: 0 for n in user_inputs}
    produced_in.update(stage_idx)

    def live_after(s: int) -> list[fx.Node]:
        """Values produced in stages <= s and read after s, in graph order."""
        vals = [n for n in user_inputs + cap.nodes if produced_in[n.name] <= s and last_use.get(n.name, -1) > s]
        return vals

    results = []
    carried_in: list[fx.Node] = user_inputs
    for s in range(n_stages):
        g = fx.Graph()
        root = nn.Module()
        env: dict[str, fx.Node] = {}
        for n in carried_in:
            env[n.name] = g.placeholder(n.name)
        attr_nodes: dict[str, fx.Node] = {}

        def arg(n: fx.Node) -> fx.Node:
            if n.name in env:
                return env[n.name]
            if n.name in cap.params or n.name in cap.attrs:
                if n.name not in attr_nodes:
                    aname = _attr_name(n.name)
                    if n.name in cap.params:
                        root.register_parameter(aname, cap.params[n.name])
                    else:
                        root.register_buffer(aname, cap.attrs[n.name])
                    attr_nodes[n.name] = g.get_attr(aname)
                return attr_nodes[n.name]
            raise RuntimeError(f"internal error: value {n.name} is not available in stage {s}")

        mine = [node for node in cap.nodes if stage_idx[node.name] == s]
        for node in mine:
            env[node.name] = g.node_copy(node, arg)
        last = s == n_stages - 1
        if last:
            outs = [env[o.name] if isinstance(o, fx.Node) else o for o in outputs]
        else:
            carried_out = live_after(s)
            outs = [env[n.name] for n in carried_out]
        g.output(tuple(outs))
        gm = fx.GraphModule(root, g)
        first = s == 0
        shapes = [tuple(n.meta["val"].shape) if isinstance(n.meta.get("val"), Tensor) else None for n in user_inputs]
        dtypes = [n.meta["val"].dtype if isinstance(n.meta.get("val"), Tensor) else None for n in user_inputs]
        stage = GraphStage(
            gm,
            in_spec=cap.program.call_spec.in_spec if first else None,
            input_shapes=shapes if first else (),
            input_dtypes=dtypes if first else (),
            out_spec=cap.program.call_spec.out_spec if last else None,
            target_keyword=cap.target_keyword,
            takes_target=cap.has_target,
        )
        names: list[str] = []
        for node in mine:
            paths = cap.stack[node.name]
            if paths and paths[-1] and paths[-1] not in names:
                names.append(paths[-1])
        results.append((stage, names, [node.name for node in mine]))
        if not last:
            carried_in = carried_out
    return results
