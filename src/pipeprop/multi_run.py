"""K independent runs of one architecture as one vmapped pipeline simulation (``pipeprop.train_many``).

The K models are partitioned alike; stage ``s`` of every run becomes one :class:`StackedStage` whose
parameters are the K runs' parameters stacked along a new leading dimension
(``torch.func.stack_module_state``). Its forward folds the runs into the batch dimension where every layer
of the stage has a folded form (convolutions, linear layers, GroupNorm, per-sample layers: one batched
kernel per layer for all runs, no per-call ``vmap`` overhead) and is ``vmap(functional_call)`` over the
stacked dimension otherwise. :func:`min_runs_to_batch` says from how many runs batching is faster.
A :class:`~pipeprop.simulator.PipelineSimulator` trains these stacked stages unchanged: the weight swap
and the saved-tensor rebinding of :mod:`pipeprop.weight_swap` act on the stacked tensors, the per-stage
optimizer updates all K runs in one set of tensor operations, and the loss is the vector of the K runs'
losses (its sum is differentiated, so each run's gradient is its own loss's gradient). Per-run learning
rates become a vector ``group["lr"]`` of length K (see :class:`~pipeprop.optim.PipelineSGD`).

The result equals K separate :func:`pipeprop.train` calls up to floating-point rounding (checked in
float64 to 1e-9 by ``tests/test_multi_run.py``); the runs do not interact.
"""

from __future__ import annotations

import copy
import types
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from .api import build_simulator
from .data.transfer import to_device
from .partition import Granularity, Partition, partition as make_partition
from .simulator import PipelineSimulator

__all__ = ["StackedStage", "MultiRunSimulator", "build_multi_simulator", "train_many", "min_runs_to_batch",
           "is_plain_layer"]

LossFn = Callable[[Any, Any], Tensor]


class _RunStackedGroupNorm(torch.autograd.Function):
    """``F.group_norm`` whose ``vmap`` rule normalises the K runs in one call with K times the groups.

    Under ``vmap`` (K runs stacked along dimension 0) run ``k``'s channels become channels ``k C .. (k+1) C - 1``
    of one input, and its ``G`` groups groups ``k G .. (k+1) G - 1``: the same groups, weights and biases, so
    the same numbers, but one kernel instead of ``vmap``'s generic rule (a normalisation without affine
    parameters followed by separate multiply and add), 2-3x faster on CPU for ResNet-20's layers.
    """

    @staticmethod
    def forward(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
        return F.group_norm(x, num_groups, weight, bias, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, num_groups, weight, bias, eps = inputs
        ctx.save_for_backward(x, weight, bias)
        ctx.num_groups, ctx.eps = num_groups, eps

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:  # outside vmap only (StackedStage always vmaps)
        x, weight, bias = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in (x, weight, bias)]
        with torch.enable_grad():
            out = F.group_norm(inputs[0], ctx.num_groups, inputs[1], inputs[2], ctx.eps)
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else [])
        gx, gw, gb = (next(grads) if t is not None and t.requires_grad else None for t in inputs)
        return gx, None, gw, gb, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
             eps: float) -> tuple[Tensor, int]:
        k = info.batch_size

        def runs_first(t: Optional[Tensor], dim: Optional[int]) -> Optional[Tensor]:
            if t is None:
                return None
            return t.movedim(dim, 0) if dim is not None else t.expand(k, *t.shape)

        xs = runs_first(x, in_dims[0])  # [K, N, C, ...]
        w, b = runs_first(weight, in_dims[2]), runs_first(bias, in_dims[3])
        out = _group_norm_of_runs(xs.reshape(-1, *xs.shape[2:]), k, num_groups, w, b, eps)
        return out.view(xs.shape), 0


def _stacked_group_norm_forward(self: nn.GroupNorm, x: Tensor) -> Tensor:
    """``nn.GroupNorm.forward`` computed by :class:`_RunStackedGroupNorm` (same parameters, same numbers)."""
    if x.dim() < 2:
        return nn.GroupNorm.forward(self, x)
    return _RunStackedGroupNorm.apply(x, self.num_groups, self.weight, self.bias, self.eps)


def _use_run_stacked_layers(module: nn.Module) -> nn.Module:
    """Give layers of ``module`` (a private copy) a forward with a faster ``vmap`` rule: ``nn.GroupNorm`` and
    subclasses that keep its forward."""
    for m in module.modules():
        if isinstance(m, nn.GroupNorm) and type(m).forward is nn.GroupNorm.forward:
            m.forward = types.MethodType(_stacked_group_norm_forward, m)
    return module


# ---------------------------------------------------------------------------- runs folded into the batch dimension
# The fast form of a stacked stage: the K runs' micro-batches are folded into one batch dimension (``[K*N, ...]``,
# run-major), the per-sample layers (activations, pooling, flatten, the residual blocks' tuples and additions) run
# unchanged, and each layer with weights computes all K runs in one call: a convolution as one grouped convolution
# with the runs in the channels (``groups * K``), a linear layer as one batched matrix product, a GroupNorm with K
# times the groups. No ``vmap``/``functional_call`` per call: that per-call overhead made K = 2 slower than two
# separate runs. Only stages made entirely of the layers below take this form (exact types, so a subclass with a
# forward of its own falls back to ``vmap``); the numbers equal separate runs up to rounding.

#: parameter-free layers that treat every sample of the batch on its own (safe to run on folded batches)
_PER_SAMPLE_LAYERS: tuple[type, ...] = (
    nn.Sequential, nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
    nn.Softplus, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)


def _per_sample_blocks() -> tuple[type, ...]:
    from .models.blocks import Fork, Join, OnBranch, OnSkip, PadShortcut
    from .partition import Stage

    return (Stage, Fork, Join, OnBranch, OnSkip, PadShortcut)


def _fold_input(x: Tensor, k: int, n: int) -> Tensor:
    """``[K*N, C, ...]`` (run-major) -> ``[N, K*C, ...]``: the runs side by side in the channels (a view if N = 1)."""
    rest = x.shape[1:]
    if n == 1:
        return x.reshape(1, k * rest[0], *rest[1:])
    return x.reshape(k, n, *rest).transpose(0, 1).reshape(n, k * rest[0], *rest[1:])


def _unfold_output(y: Tensor, k: int, n: int) -> Tensor:
    """Inverse of :func:`_fold_input`: ``[N, K*C, ...]`` -> ``[K*N, C, ...]``."""
    c, rest = y.shape[1] // k, y.shape[2:]
    if n == 1:
        return y.reshape(k, c, *rest)
    return y.reshape(n, k, c, *rest).transpose(0, 1).reshape(k * n, c, *rest)


class _FoldedLayer(nn.Module):
    """A layer of a stacked stage computing all K runs at once from the stage's stacked parameters."""

    def __init__(self, layer: nn.Module, stacked: nn.ParameterList, indices: dict[str, int], num_runs: int) -> None:
        super().__init__()
        self._stacked = [stacked]  # a list: the stage owns (and registers) the parameters
        self._indices = indices
        self.num_runs = num_runs

    def _param(self, name: str) -> Optional[Tensor]:
        i = self._indices.get(name)
        return None if i is None else self._stacked[0][i]


class _FoldedConv2d(_FoldedLayer):
    def __init__(self, conv: nn.Conv2d, *args: Any) -> None:
        super().__init__(conv, *args)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x: Tensor) -> Tensor:
        k = self.num_runs
        n = x.shape[0] // k
        w, b = self._param("weight"), self._param("bias")
        out = F.conv2d(_fold_input(x, k, n), w.reshape(-1, *w.shape[2:]), None if b is None else b.reshape(-1),
                       self.stride, self.padding, self.dilation, self.groups * k)
        return _unfold_output(out, k, n)


def _group_norm_of_runs(x: Tensor, k: int, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                        eps: float) -> Tensor:
    """GroupNorm of K runs' folded ``[K*N, C, ...]`` with their stacked ``[K, C]`` affine parameters: one call with
    the runs side by side in the channels and K times the groups (the groups never mix runs)."""
    n = x.shape[0] // k
    out = F.group_norm(_fold_input(x, k, n), k * num_groups, None if weight is None else weight.reshape(-1),
                       None if bias is None else bias.reshape(-1), eps)
    return _unfold_output(out, k, n)


class _FoldedGroupNorm(_FoldedLayer):
    def __init__(self, norm: nn.GroupNorm, *args: Any) -> None:
        super().__init__(norm, *args)
        self.num_groups, self.eps = norm.num_groups, norm.eps

    def forward(self, x: Tensor) -> Tensor:
        return _group_norm_of_runs(x, self.num_runs, self.num_groups, self._param("weight"), self._param("bias"),
                                   self.eps)


class _FoldedLinear(_FoldedLayer):
    def forward(self, x: Tensor) -> Tensor:
        k = self.num_runs
        w, b = self._param("weight"), self._param("bias")
        xs = x.reshape(k, -1, x.shape[-1])  # [K, N*..., in]
        out = torch.bmm(xs, w.transpose(1, 2)) if b is None else torch.baddbmm(b.unsqueeze(1), xs, w.transpose(1, 2))
        return out.reshape(*x.shape[:-1], w.shape[1])


def _folded_form(module: nn.Module) -> Optional[type]:
    """The folded replacement of a layer with weights, ``_PER_SAMPLE`` for a per-sample layer, None if unsupported."""
    t = type(module)
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
        return None  # hooks may expect one run's shapes
    if "forward" in vars(module) and not isinstance(module, nn.GroupNorm):  # a forward set on the instance
        return None
    if isinstance(module, nn.Conv2d) and t.forward is nn.Conv2d.forward and t._conv_forward is nn.Conv2d._conv_forward:
        return _FoldedConv2d if module.padding_mode == "zeros" else None
    if isinstance(module, nn.GroupNorm) and t.forward is nn.GroupNorm.forward:
        return _FoldedGroupNorm
    if isinstance(module, nn.Linear) and t.forward is nn.Linear.forward:
        return _FoldedLinear
    if t is nn.Flatten:
        return _PER_SAMPLE if module.start_dim >= 1 else None
    if t in _PER_SAMPLE_LAYERS or t in _per_sample_blocks():
        return _PER_SAMPLE if not any(True for _ in module.parameters(recurse=False)) else None
    return None


def is_plain_layer(module: nn.Module) -> bool:
    """Whether ``module`` (not its children) is a ``Conv2d`` (zero padding), ``Linear`` or ``GroupNorm`` with torch's
    own forward, or a parameter-free per-sample layer, without hooks: a layer that saves only its input,
    output and its parameters themselves (or views of them) for the backward."""
    return _folded_form(module) is not None


class _PerSample:  # marker
    pass


_PER_SAMPLE = _PerSample


def _fold_runs(template: nn.Module, stacked: nn.ParameterList, param_names: Sequence[str],
               num_runs: int) -> Optional[nn.Module]:
    """``template`` with its layers replaced by their folded forms, or None if a layer has none (or has buffers)."""
    if any(True for _ in template.buffers()):
        return None
    index = {n: i for i, n in enumerate(param_names)}
    forms = {name: _folded_form(m) for name, m in template.named_modules()}
    if any(f is None for f in forms.values()):
        return None
    folded = copy.deepcopy(template)
    for name, form in forms.items():
        if form is _PER_SAMPLE:
            continue
        if not name:  # the stage itself is a single layer with weights
            return None
        parent_name, _, child = name.rpartition(".")
        parent = folded.get_submodule(parent_name)
        layer = parent.get_submodule(child)
        indices = {p: index[f"{name}.{p}"] for p, _ in layer.named_parameters(recurse=False)}
        setattr(parent, child, form(layer, stacked, indices, num_runs))
    return folded


def _map_tensors(x: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, (tuple, list)):
        return type(x)(_map_tensors(v, fn) for v in x)
    raise TypeError(f"a stacked stage passes tensors or tuples of tensors between stages; got {type(x).__name__}")


def _first_tensor(x: Any) -> Tensor:
    return x if isinstance(x, Tensor) else _first_tensor(x[0])


class StackedStage(nn.Module):
    """K copies of one stage (same structure) as one module over inputs stacked along dimension 0.

    ``parameters()`` are the stacked ``[K, ...]`` tensors; ``forward(x)`` maps run ``k``'s input
    ``x[k]`` through the stage with run ``k``'s weights and buffers.
    """

    def __init__(self, stages: Sequence[nn.Module]) -> None:
        super().__init__()
        if not stages:
            raise ValueError("StackedStage needs at least one stage")
        first = stages[0]
        names = [n for n, _ in first.named_parameters()]
        for k, st in enumerate(stages[1:], start=1):
            if [n for n, _ in st.named_parameters()] != names or any(
                p.shape != q.shape or p.dtype != q.dtype for p, q in zip(st.parameters(), first.parameters())
            ):
                raise ValueError(f"run {k} has a different architecture than run 0 at this stage; train_many needs "
                                 "K models of the same architecture (same layers, shapes and dtypes)")
        params, buffers = stack_module_state(list(stages))
        self.num_runs = len(stages)
        self.names = list(getattr(first, "names", [type(first).__name__]))
        self.delay = int(getattr(first, "delay", 0))
        self._param_names = list(params)
        self._buffer_names = list(buffers)
        frozen = {n for n, p in first.named_parameters() if not p.requires_grad}
        self.stacked = nn.ParameterList(
            [nn.Parameter(params[n].detach(), requires_grad=n not in frozen) for n in self._param_names]
        )
        for i, n in enumerate(self._buffer_names):
            self.register_buffer(f"buffer_{i}", buffers[n].detach().clone())
        # the template: a copy of run 0's module, holding no state of its own that is used (functional_call
        # replaces it), with layers that have a faster batched form swapped for it (_use_run_stacked_layers)
        self._template = [_use_run_stacked_layers(copy.deepcopy(first))]  # a list: not registered as a submodule
        # the fast form (runs folded into the batch dimension), where every layer of the stage has one
        self._folded = [_fold_runs(self._template[0], self.stacked, self._param_names, self.num_runs)]

    @property
    def has_conv(self) -> bool:
        """Whether the stage has a convolution (whose batched form, one grouped convolution, is the main gain)."""
        return any(isinstance(m, nn.Conv2d) for m in self._template[0].modules())

    @property
    def folded(self) -> bool:
        """Whether the stage runs with the K runs folded into the batch dimension (else ``vmap(functional_call)``)."""
        return self._folded[0] is not None

    def train(self, mode: bool = True) -> "StackedStage":
        super().train(mode)
        for m in self._template + self._folded:
            if m is not None:
                m.train(mode)
        return self

    def stacked_buffers(self) -> list[Tensor]:
        return [getattr(self, f"buffer_{i}") for i in range(len(self._buffer_names))]

    def _run_one(self, params: Sequence[Tensor], buffers: Sequence[Tensor], x: Any) -> Any:
        state = dict(zip(self._param_names, params))
        state.update(zip(self._buffer_names, buffers))
        return functional_call(self._template[0], state, (x,))

    def _forward_folded(self, x: Any) -> Optional[Any]:
        """The stage on inputs ``[K, N, ...]`` folded to ``[K*N, ...]``; None where inputs do not fit that form."""
        k = self.num_runs
        leading = set()
        _map_tensors(x, lambda t: leading.add(tuple(t.shape[:2]) if t.dim() >= 2 else None) or t)
        if len(leading) != 1 or None in leading:
            return None
        (_, n), = leading
        out = self._folded[0](_map_tensors(x, lambda t: t.reshape(k * n, *t.shape[2:])))

        def unfold(t: Tensor) -> Tensor:
            if t.dim() == 0 or t.shape[0] != k * n:
                raise RuntimeError(f"a stacked stage ({' > '.join(self.names)}) returned a tensor of shape "
                                   f"{tuple(t.shape)} for {k} runs x {n} samples; its layers must keep the batch "
                                   "dimension first")
            return t.reshape(k, n, *t.shape[1:])

        return _map_tensors(out, unfold)

    def forward(self, x: Any) -> Any:
        if self._folded[0] is not None:
            out = self._forward_folded(x)
            if out is not None:
                return out
        try:
            return vmap(self._run_one)(list(self.stacked), self.stacked_buffers(), x)
        except RuntimeError as err:
            if "randomness" in str(err):
                raise RuntimeError(
                    f"{err}. train_many cannot run layers that draw random numbers (e.g. dropout) in one vmapped "
                    "simulation; remove them or train the runs with separate pipeprop.train calls"
                ) from err
            raise

    @torch.no_grad()
    def write_back(self, stages: Sequence[nn.Module]) -> None:
        """Copy run ``k``'s weights and buffers into ``stages[k]``."""
        for k, st in enumerate(stages):
            named_p = dict(st.named_parameters())
            for n, p in zip(self._param_names, self.stacked):
                named_p[n].copy_(p[k])
            named_b = dict(st.named_buffers())
            for n, b in zip(self._buffer_names, self.stacked_buffers()):
                named_b[n].copy_(b[k])


def _stack_inputs(items: Sequence[Any], what: str) -> Any:
    """Stack K micro-batches (tensors or tuples of tensors) along a new dimension 0."""
    first = items[0]
    if isinstance(first, Tensor):
        shapes = {tuple(t.shape) for t in items}
        if len(shapes) != 1:
            raise ValueError(f"the runs' {what} have different shapes {sorted(shapes)} in this step; train_many "
                             "stacks one micro-batch per run, so every run needs micro-batches of the same shape")
        return torch.stack(list(items))
    if isinstance(first, (tuple, list)):
        return type(first)(_stack_inputs([it[i] for it in items], what) for i in range(len(first)))
    raise TypeError(f"train_many stacks tensors or tuples of tensors; got {type(first).__name__} as {what}")


#: the fewest runs for which one batched simulation beats the same runs one by one on one CPU thread, by the form
#: of the stages (measured with ``benchmarks/bench_batch_runs.py --k-sweep``, docs/performance.md, "Many runs at
#: once"): folded stages with convolutions (ResNet-20-GN: K = 2 already faster), folded stages of
#: linear layers only (8x8-digits MLP: K = 2 0.7x, K = 4 1.3x), any stage left to ``vmap`` (K = 4 0.96x, K = 8 1.5x)
MIN_RUNS_CONV, MIN_RUNS_DENSE, MIN_RUNS_VMAP = 2, 4, 8


def min_runs_to_batch(stages: Sequence["StackedStage"], device: Union[str, torch.device] = "cpu") -> int:
    """The fewest runs worth batching for these stages: a fixed rule (no timing at run time, so the choice, which
    changes float32 rounding, is the same on every call). On a GPU batching always pays (batch size one leaves it
    idle); on a CPU it depends on how much of a step is kernel time (see :data:`MIN_RUNS_CONV`)."""
    if torch.device(device).type != "cpu":
        return 2
    if not all(st.folded for st in stages):
        return MIN_RUNS_VMAP
    return MIN_RUNS_CONV if any(st.has_conv for st in stages) else MIN_RUNS_DENSE


class MultiRunSimulator:
    """K runs of one architecture trained as one :class:`PipelineSimulator` over stacked stages.

    Build it with :func:`build_multi_simulator`. :meth:`step` takes one micro-batch per run and returns the
    K losses as a tensor (no host synchronisation unless ``check_finite``: a NaN/inf loss of run ``k``
    raises :class:`~pipeprop.simulator.DivergenceError` with ``run == k`` before any weight is updated).
    """

    def __init__(self, stages: list[StackedStage], run_stages: list[list[nn.Module]], simulator: PipelineSimulator,
                 loss_fn: LossFn) -> None:
        self.stages = stages
        self.run_stages = run_stages  # run_stages[k][s]: stage s of run k (modules of the user's model k)
        self.simulator = simulator
        self.optimizer = simulator.optimizer
        self.num_runs = stages[0].num_runs
        self._loss_fn = loss_fn
        first = next((p for st in stages for p in st.parameters()), None)
        self.device = first.device if first is not None else torch.device("cpu")

    @property
    def step_count(self) -> int:
        return self.simulator.step_count

    def min_runs_to_batch(self) -> int:
        """:func:`min_runs_to_batch` for this simulator's stages and device."""
        return min_runs_to_batch(self.stages, self.device)

    def step(self, xs: Sequence[Any], ys: Sequence[Any]) -> Tensor:
        """One micro-batch per run (``xs[k], ys[k]``); returns the K losses (detached, from stale weights)."""
        if len(xs) != self.num_runs or len(ys) != self.num_runs:
            raise ValueError(f"step needs one micro-batch per run ({self.num_runs}); got {len(xs)} inputs and "
                             f"{len(ys)} targets")
        x, y = _stack_inputs(xs, "inputs"), _stack_inputs(ys, "targets")
        if self.device.type != "cpu":
            x, y = to_device(x, self.device), to_device(y, self.device)
        return self.simulator.step(x, y, sync=False)

    def write_back(self) -> None:
        """Copy each run's trained weights and buffers into its own model."""
        for s, stage in enumerate(self.stages):
            stage.write_back([run[s] for run in self.run_stages])

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit for bit: stacked weights/buffers, optimizer and simulator state."""
        return {
            "num_runs": self.num_runs,
            "stages": [st.state_dict() for st in self.stages],
            "optimizer": self.optimizer.state_dict(),
            "simulator": self.simulator.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_runs"]) != self.num_runs:
            raise ValueError(f"checkpoint holds {state['num_runs']} runs, this simulator {self.num_runs}")
        if len(state["stages"]) != len(self.stages):
            raise ValueError("checkpoint was written for a pipeline with a different number of stages")
        for st, sd in zip(self.stages, state["stages"]):
            st.load_state_dict(sd)
        self.optimizer.load_state_dict(state["optimizer"])
        self.simulator.load_state_dict(state["simulator"])


def _per_run(value: Union[float, Sequence[float]], num_runs: int, name: str) -> Union[float, list[float]]:
    if isinstance(value, (int, float)):
        return float(value)
    values = [float(v) for v in value]
    if len(values) != num_runs:
        raise ValueError(f"{name} has {len(values)} entries for {num_runs} runs; give one per run or a single number")
    return values


def build_multi_simulator(
    models: Sequence[nn.Module],
    loss_fn: LossFn,
    *,
    method: str = "pb+sc+lwp",
    lr: Union[float, Sequence[float]],
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    partition: Granularity = "layer",
    delay_offset: int = 0,
    check_finite: bool = True,
    loss_is_stacked: bool = False,
    **options: Any,
) -> MultiRunSimulator:
    """Partition each of ``models`` alike and build one simulator for all of them (see :func:`train_many`).

    ``loss_is_stacked=True``: ``loss_fn`` itself maps the stacked outputs and targets (``[K, ...]``) to the
    K losses (e.g. to count each run's correct predictions outside ``vmap``); otherwise it is vmapped.
    """
    models = list(models)
    if not models:
        raise ValueError("train_many needs at least one model")
    lrs = _per_run(lr, len(models), "lr")
    parts = [make_partition(m, partition, delay_offset=delay_offset) for m in models]
    if len({len(p) for p in parts}) != 1:
        raise ValueError("the models split into different numbers of stages; train_many needs one architecture")
    stacked = Partition([StackedStage([p.stages[s] for p in parts]) for s in range(len(parts[0]))],  # type: ignore[misc]
                        parts[0].granularity, delay_offset)

    def stacked_loss(output: Any, target: Any) -> Tensor:
        if loss_is_stacked:
            return loss_fn(output, target)
        if loss_fn is F.cross_entropy and isinstance(output, Tensor) and output.dim() == 3 and target.dim() == 2:
            # [K, N, C] logits: the K runs' mean cross-entropies in one call (vmap decomposes it op by op)
            k, n = target.shape
            return F.cross_entropy(output.reshape(k * n, -1), target.reshape(k * n), reduction="none").view(k, n).mean(1)
        return vmap(loss_fn)(output, target)

    sim = build_simulator(stacked, stacked_loss, method=method, lr=min(lrs) if isinstance(lrs, list) else lrs,
                          momentum=momentum, weight_decay=weight_decay, **options)
    sim.check_finite = check_finite
    optimizer = sim.optimizer
    if not getattr(optimizer, "supports_stacked_runs", False):
        raise ValueError(f"method {method!r} ({type(optimizer).__name__}) does not support stacked runs: train_many needs "
                         "an optimizer whose update is elementwise and that sets supports_stacked_runs = True "
                         "(e.g. Adaptive Braking's cosine would mix the runs); train the runs with separate "
                         "pipeprop.train calls")
    if isinstance(lrs, list) and not getattr(optimizer, "supports_per_run_lr", False) and len(set(lrs)) == 1:
        lrs = lrs[0]  # one rate for every run (the simulator was built with it): no per-run vector needed
    if isinstance(lrs, list):
        if not getattr(optimizer, "supports_per_run_lr", False):
            raise ValueError(f"method {method!r} ({type(optimizer).__name__}) does not support one learning rate per "
                             "run; give a single lr or group the runs by learning rate")
        for g in optimizer.param_groups:
            w = g["params"][0] if g["params"] else None
            g["lr"] = torch.tensor(lrs, dtype=w.dtype if w is not None else None, device=w.device if w is not None else None)
    return MultiRunSimulator(list(stacked.stages), [list(p.stages) for p in parts], sim, loss_fn)


def train_many(
    models: Sequence[nn.Module],
    batch_streams: Sequence[Iterable[tuple[Any, Any]]],
    loss_fn: LossFn,
    *,
    method: str = "pb+sc+lwp",
    lr: Union[float, Sequence[float]],
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    partition: Granularity = "layer",
    delay_offset: int = 0,
    check_finite: bool = True,
    **options: Any,
) -> list[list[float]]:
    """Train K models of one architecture, each on its own micro-batch stream, as one vmapped simulation.

    Equivalent to ``[pipeprop.train(m, s, loss_fn, method=method, lr=lr_k, ...) for m, s in zip(models,
    batch_streams)]`` (same per-run losses and weights up to rounding) but with one set of tensor operations
    per step for all runs. ``lr`` is one number or one per run; ``method`` and the other options are shared.
    Different seeds and data orders come from the models and streams you pass. Each step stacks the K
    runs' micro-batches, so they must have equal shapes, and all streams the same length. ``loss_fn`` is
    applied per run (under ``torch.func.vmap``). The models are trained in place; returns ``losses[k][n]``.
    A NaN/inf loss raises :class:`~pipeprop.simulator.DivergenceError` naming the run (this reads every
    step's losses on the host); ``check_finite=False`` skips the check, and the losses are then read once,
    at the end. Micro-batches move to the models' device asynchronously (pinned memory on CUDA).

    Example::

        models = [make_model(seed) for seed in range(4)]
        losses = pipeprop.train_many(models, [loader(seed) for seed in range(4)], F.cross_entropy,
                                     method="pb+sc+lwp", lr=[0.01, 0.02, 0.05, 0.1], momentum=0.9)
    """
    models = list(models)
    streams = [iter(s) for s in batch_streams]
    if len(streams) != len(models):
        raise ValueError(f"{len(models)} models but {len(streams)} batch streams; give one stream per model")
    sim = build_multi_simulator(models, loss_fn, method=method, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                partition=partition, delay_offset=delay_offset, check_finite=check_finite, **options)
    losses: list[Tensor] = []
    try:
        while True:
            items = [next(s, None) for s in streams]
            done = [it is None for it in items]
            if all(done):
                break
            if any(done):
                raise ValueError(f"batch streams {[k for k, d in enumerate(done) if d]} ended after {len(losses)} "
                                 "micro-batches while others go on; train_many needs streams of equal length")
            losses.append(sim.step([x for x, _ in items], [y for _, y in items]))
    finally:
        sim.write_back()
    if not losses:
        return [[] for _ in models]
    table = torch.stack(losses).t().tolist()
    return [[float(v) for v in row] for row in table]
