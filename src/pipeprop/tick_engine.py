"""Pipelined Backpropagation tick by tick on live weights: the faster engine where weights dominate.

:class:`~pipeprop.simulator.PipelineSimulator` finishes one micro-batch per step, so each stage's forward
reads weights ``D_s`` updates old out of a ring of versions, and saved-tensor hooks point the backward at
the live weights. :class:`TickPipeline` runs the pipeline as hardware does: in tick ``t`` stage ``s`` runs
the forward of micro-batch ``t - s`` and the backward of micro-batch ``t - 2(S-1) + s`` (the convention of
:mod:`pipeprop.schedule`), then every stage updates. Every pass reads the weights the stage holds *now*:

* the optimizer updates the weights in place through ``.data`` aliases (same storage, their own version
  counter), so autograd's version check does not fire and a backward reads the live weights through the
  parameters or the views of them that autograd saved: PB's semantics, with no ring and no hooks;
* the backwards of a tick are independent (each stage's error arrived in the previous tick) and run as one
  backward call;
* under LWP a predicting stage's optimizer updates its own copy of the live weights: the prediction is
  written from it into the parameters for the tick's forwards and the live weights are copied over it
  after them, so a later backward again reads the live weights (two passes over those weights per tick).

The result equals the simulator bit for bit (``tests/test_tick_engine.py``, float64 and float32). It is
faster where the weights dominate the memory traffic (an 8-layer MLP of width 256: 0.86-0.94x the time
of plain PyTorch against the simulator's 1.5-1.7x; docs/performance.md) and a little faster for ResNet-20
(1.09-1.12x against 1.13-1.15x).

Scope, each refused with a message: stages made of ``Conv2d``, ``Linear``, ``GroupNorm`` and
parameter-free per-sample layers (a layer that saves a tensor derived from its weights, e.g. a weight
standardisation, would have it read stale in the backward), no weight read by two stages, no buffers,
methods whose backward reads the live weights (not stashing, SpecTrain or PipeMare), the model's own
dtype (no autocast). There are no checkpoints: use :func:`pipeprop.train` with it (``engine="tick"``),
or the simulator for resumable runs.

The backward of a tick calls autograd's engine directly (``torch.autograd.backward`` less its Python checks
of the gradients' shapes, which cost tens of microseconds per tick: the gradients here are autograd's own).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from .methods import get_method
from .optim.base import PipelineOptimizer
from .partition import Granularity, partition as make_partition
from .simulator import read_pending

try:  # what torch.autograd.backward runs once it has checked its arguments
    from torch.autograd.graph import _engine_run_backward
except ImportError:  # pragma: no cover
    _engine_run_backward = None

__all__ = ["TickPipeline", "build_tick_pipeline", "why_not_tick"]

LossFn = Callable[[Any, Any], Tensor]


def _detached_leaves(out: Any) -> Any:
    """The next stage's input: detached leaves that collect the gradient to send back (tensor or tuple)."""
    if isinstance(out, Tensor):
        return out.detach().requires_grad_(out.is_floating_point())
    return tuple(o.detach().requires_grad_(o.is_floating_point()) if isinstance(o, Tensor) else o for o in out)


def _run_backward(tensors: list[Tensor], grads: list[Tensor]) -> None:
    """``torch.autograd.backward(tensors, grads)`` without its Python validation of ``grads`` (each has its
    tensor's shape, dtype and device: they are autograd's own gradients, or ones for the loss)."""
    if _engine_run_backward is None:  # (a torch without the internal entry point)
        torch.autograd.backward(tensors, grads)
    else:
        _engine_run_backward(tuple(tensors), tuple(grads), False, False, (), allow_unreachable=True,
                             accumulate_grad=True)


def why_not_tick(stages: Sequence[nn.Module], method: str) -> Optional[str]:
    """Why :class:`TickPipeline` cannot run ``stages`` with ``method`` (``None`` if it can)."""
    from .multi_run import is_plain_layer

    spec = get_method(method)
    if not spec.pipelined:
        return f"method {method!r} is synchronous (no pipeline); use the simulator"
    if spec.weight_mode != "pb":
        return f"method {method!r} uses weight mode {spec.weight_mode!r}; the tick engine runs backwards on the live weights"
    seen: dict[int, int] = {}
    for s, stage in enumerate(stages):
        if any(True for _ in stage.buffers()):
            return f"stage {s} has buffers (e.g. running statistics), which the tick engine does not track"
        for name, m in stage.named_modules():
            if not is_plain_layer(m):
                return (f"stage {s} has {type(m).__name__} ({name or 'the stage'}); the tick engine runs Conv2d, Linear, "
                        "GroupNorm and parameter-free per-sample layers only (others may save tensors derived from "
                        "their weights)")
        for p in stage.parameters():
            if seen.setdefault(id(p), s) != s:
                return f"a weight is read by stages {seen[id(p)]} and {s} (tied weights)"
    return None


class TickPipeline:
    """The stages of a PB pipeline run tick by tick on live weights (see the module docstring).

    Build it with :func:`build_tick_pipeline`. :meth:`feed` pushes one micro-batch into stage 0 (one tick),
    :meth:`drain` runs the ticks that finish every micro-batch fed, :meth:`run` does both for a whole
    stream. The losses come out in micro-batch order, ``S - 1`` ticks after their micro-batch went in;
    :attr:`losses` holds those read to the host so far (every ``read_every`` ticks and at the end: the loop
    never waits for the device in between). ``check_finite`` raises :class:`~pipeprop.DivergenceError` at
    the first NaN/inf loss, up to ``read_every`` ticks after it happened (the weights have then taken the
    updates of those ticks). The parameters of the stages are trained in place.
    """

    def __init__(self, stages: Sequence[nn.Module], optimizer: PipelineOptimizer, loss_fn: LossFn, *,
                 method: str, check_finite: bool = True, read_every: int = 256) -> None:
        self.stages = list(stages)
        reason = why_not_tick(self.stages, method)
        if reason:
            raise ValueError(f"the tick engine cannot run this: {reason}")
        if type(optimizer).backward_weights is not PipelineOptimizer.backward_weights:
            raise ValueError(f"{type(optimizer).__name__} chooses its own backward weights; the tick engine runs "
                             "backwards on the live weights (use the simulator)")
        for key, want in get_method(method).options.items():  # (the optimizer must compute the method named)
            have = [g[key] for g in optimizer.param_groups if key in g and g[key] != want]
            if have:
                raise ValueError(f"method {method!r} sets {key}={want!r}, but the optimizer has {key}={have[0]!r}: "
                                 "build the pipeline with pipeprop.build_tick_pipeline")
        if read_every < 1:
            raise ValueError(f"read_every must be >= 1, got {read_every}")
        self.params = [list(st.parameters()) for st in self.stages]
        aliases = [list(g["params"]) for g in optimizer.param_groups]
        predicting = [optimizer.predicts_forward_weights and not optimizer.forward_uses_live_weights(g)
                      for g in optimizer.param_groups]
        if len(aliases) != len(self.stages) or any(
            len(a) != len(p) or any((x.data_ptr() == y.data_ptr()) == pred or x.shape != y.shape or x.requires_grad
                                    for x, y in zip(a, p))
            for a, p, pred in zip(aliases, self.params, predicting)
        ):
            raise ValueError("the optimizer must hold, one group per stage, the .data aliases of the stages' "
                             "parameters, and for a stage that predicts its forward weights a copy of them: build "
                             "the pipeline with pipeprop.build_tick_pipeline")
        S = len(self.stages)
        for s, g in enumerate(optimizer.param_groups):
            if optimizer.stage_delay(g) != 2 * (S - 1 - s):
                raise ValueError(f"stage {s} has delay {optimizer.stage_delay(g)}; the tick engine realises "
                                 f"2(S-1-s) = {2 * (S - 1 - s)} (no delay_offset)")
        self.optimizer, self.loss_fn, self.method = optimizer, loss_fn, method
        self.check_finite, self.read_every = check_finite, read_every
        self._flat_params = [p for ps in self.params for p in ps]
        self._flat_aliases = [a for al in aliases for a in al]
        # a predicting stage: its parameters (what the forwards read) take the prediction from the live copy
        self._predicting = [(g, [p.data for p in ps]) for g, ps, pred in
                            zip(optimizer.param_groups, self.params, predicting) if pred]
        self._forward_weights = [f for _, fs in self._predicting for f in fs]
        self._live_weights = [a for al, pred in zip(aliases, predicting) if pred for a in al]
        self.ticks = 0
        self.fed = 0
        self.losses: list[float] = []
        self._pending: list[Tensor] = []
        self._batches: dict[int, tuple[Any, Any]] = {}
        self._inputs: dict[tuple[int, int], Any] = {}  # (s, n): stage s's input leaves for micro-batch n
        self._roots: dict[tuple[int, int], Any] = {}  # (s, n): stage s's output (the loss for the last stage)
        self._errors: dict[tuple[int, int], Any] = {}  # (s, n): gradient of stage s's output

    # ------------------------------------------------------------------ the loop
    def feed(self, x: Any, y: Any) -> None:
        """Push micro-batch ``(x, y)`` into stage 0 and run one tick."""
        self._batches[self.fed] = (x, y)
        self.fed += 1
        self._tick()

    def drain(self) -> list[float]:
        """Run the ticks that finish every micro-batch fed so far; returns :attr:`losses`. The stages'
        parameters then hold the live weights (see :meth:`sync_weights`)."""
        while self.ticks < self.fed + 2 * (len(self.stages) - 1):
            self._tick()
        self._read_losses()
        for p in self._flat_params:
            p.grad = None
        self.sync_weights()
        return self.losses

    def sync_weights(self) -> None:
        """Write the live weights into the stages' parameters. Between :meth:`feed` calls a stage that predicts
        its forward weights (LWP) has its live weights in the optimizer and its parameters one update behind;
        call this to read or evaluate the stages mid-stream (the next tick overwrites them as it would anyway,
        so training is unchanged). :meth:`drain` calls it."""
        if self._predicting:
            torch._foreach_copy_(self._forward_weights, self._live_weights)

    def run(self, batches: Iterable[tuple[Any, Any]]) -> list[float]:
        """:meth:`feed` every micro-batch of ``batches``, then :meth:`drain`; returns the losses."""
        for x, y in batches:
            self.feed(x, y)
        return self.drain()

    def _tick(self) -> None:
        S, t, M = len(self.stages), self.ticks, self.fed
        if self._predicting:  # the forwards read the predictions, written from the live copies ...
            self.optimizer.forward_weights_into(self._predicting)
        for s in range(max(0, t - M + 1), min(S, t + 1)):  # forward of micro-batch t - s
            n = t - s
            # (a stage's input leaves stay in _inputs until its backward: their .grad is the error to send back)
            x = self._batches[n][0] if s == 0 else self._inputs[(s, n)]
            out = self.stages[s](x)
            if s == S - 1:
                out = self.loss_fn(out, self._batches.pop(n)[1])
                if out.numel() != 1:
                    raise ValueError(f"loss_fn returned a tensor of shape {tuple(out.shape)}; it must return one "
                                     "number per micro-batch (reduce it, e.g. reduction='mean')")
                self._pending.append(out.detach())
            else:
                self._inputs[(s + 1, n)] = _detached_leaves(out)
            self._roots[(s, n)] = out
        if self._predicting:  # ... and the backwards the live weights, copied over them
            torch._foreach_copy_(self._forward_weights, self._live_weights)
        tensors: list[Tensor] = []
        grads: list[Tensor] = []
        done = [(s, t - 2 * (S - 1) + s) for s in range(S) if 0 <= t - 2 * (S - 1) + s < M]
        for key in done:  # backward of micro-batch t - 2(S-1) + s
            out, err = self._roots.pop(key), self._errors.pop(key, None)
            if key[0] == S - 1:  # the loss
                if out.requires_grad:  # (not when nothing before it has weights)
                    tensors.append(out)
                    grads.append(torch.ones_like(out))
                continue
            for o, e in ((out, err),) if isinstance(out, Tensor) else zip(out, err):
                # (a tuple between stages, a residual block's (h, skip): the parts that carry a gradient)
                if e is not None and isinstance(o, Tensor) and o.requires_grad:
                    tensors.append(o)
                    grads.append(e)
        for p in self._flat_params:
            p.grad = None
        if tensors:
            _run_backward(tensors, grads)
        for s, n in done:
            if s > 0:
                x = self._inputs.pop((s, n))
                self._errors[(s - 1, n)] = x.grad if isinstance(x, Tensor) else tuple(
                    v.grad if isinstance(v, Tensor) else None for v in x)
        for p, a in zip(self._flat_params, self._flat_aliases):
            a.grad = p.grad
        self.optimizer.engine_step()
        for a in self._flat_aliases:
            a.grad = None
        self.ticks = t + 1
        if self.ticks % self.read_every == 0:
            self._read_losses()

    def _read_losses(self) -> None:
        read_pending(self._pending, self.losses, check_finite=self.check_finite)


def build_tick_pipeline(
    model: nn.Module,
    loss_fn: LossFn,
    *,
    method: str = "pb+sc+lwp",
    optimizer: Optional[str] = None,
    lr: float,
    momentum: Optional[float] = None,
    betas: Optional[Sequence[float]] = None,
    eps: Optional[float] = None,
    weight_decay: float = 0.0,
    partition: Granularity = "layer",
    check_finite: bool = True,
    read_every: int = 256,
    **options: Any,
) -> TickPipeline:
    """Partition ``model`` (an ``nn.Sequential``) and build its :class:`TickPipeline` for ``method``; the
    arguments are those of :func:`pipeprop.build_simulator` (``options`` go to the method's optimizer)."""
    from .regime_warnings import warn_if_lwp_overshoots

    spec = get_method(method)
    part = make_partition(model, partition)
    groups = [{"params": [p.data for p in st.parameters()], "delay": int(d)} for st, d in zip(part.stages, part.delays)]
    opt = spec.build_optimizer(groups, optimizer=optimizer, lr=lr, momentum=momentum, betas=betas, eps=eps,
                               weight_decay=weight_decay, **options)
    warn_if_lwp_overshoots(opt.param_groups)
    if opt.predicts_forward_weights:  # a predicting stage's optimizer updates its own copy of the live weights
        for g in opt.param_groups:  # (before the first step: there is no state to move yet)
            if not opt.forward_uses_live_weights(g):
                g["params"] = [a.clone() for a in g["params"]]
    return TickPipeline(part.stages, opt, loss_fn, method=method, check_finite=check_finite, read_every=read_every)
