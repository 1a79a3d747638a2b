"""One pipeline stage of the distributed engine: forward and backward of one micro-batch with PB's weight handling.

A :class:`PipelineStage` (the role of ``torch.distributed.pipelining.PipelineStage``) holds one stage
module, its optimizer group and the micro-batches in flight between their forward and backward. The
forward runs with the weights the optimizer says (live, or e.g. LWP's prediction); the backward runs
through the live weights, the stashed forward weights (``weight_mode="stash"``) or the optimizer's
``backward_weights``. Saved tensors that alias weights are rebound at backward time
(:func:`pipeprop.weight_swap.rebound_saved_weights`), which also keeps autograd's version check quiet
although the weights were updated in place in between. Which micro-batch runs when is not decided here
(see :mod:`pipeprop.schedule` and :class:`~pipeprop.distributed.engine.DistributedPipeline`).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..optim.base import PipelineOptimizer, group_params
from ..weight_swap import rebound_saved_weights, swapped_weights
from .comm import Payload

__all__ = ["PipelineStage", "as_input", "detached", "to_device"]


def _leaves(payload: Payload) -> list[Optional[Tensor]]:
    if payload is None:
        return []
    if isinstance(payload, Tensor):
        return [payload]
    return list(payload)


def _rebuild(payload: Payload, leaves: list[Optional[Tensor]]) -> Payload:
    if payload is None:
        return None
    if isinstance(payload, Tensor):
        return leaves[0]
    return tuple(leaves)


def as_input(payload: Payload, device: torch.device) -> Payload:
    """A detached copy on ``device`` whose floating tensors require grad (a stage's input leaves)."""
    out = []
    for t in _leaves(payload):
        if t is None:
            out.append(None)
            continue
        t = t.detach().to(device)
        if t.is_floating_point() or t.is_complex():
            t.requires_grad_(True)
        out.append(t)
    return _rebuild(payload, out)


def detached(payload: Payload) -> Payload:
    return _rebuild(payload, [None if t is None else t.detach() for t in _leaves(payload)])


def to_device(payload: Any, device: torch.device) -> Any:
    if isinstance(payload, Tensor):
        return payload.to(device)
    if isinstance(payload, (tuple, list)):
        return type(payload)(to_device(p, device) for p in payload)
    return payload


@dataclass
class _Record:
    """An in-flight micro-batch at one stage: its input, output graph and what its forward saw."""

    inputs: Payload
    weights: Optional[list[Tensor]] = None  # forward weights when they are not the live parameters
    output: Payload = None
    loss: Optional[Tensor] = None
    rng: Optional[Tensor] = None
    buffers: Optional[list[Tensor]] = None


class PipelineStage:
    """Stage ``index`` of a pipeline, with its optimizer group (``optimizer.param_groups[group_index]``, whose
    ``"delay"`` the engine checked against the schedule) and its in-flight micro-batches.

    ``keep_forward_state`` keeps each in-flight forward's weights, buffers and RNG state, so that
    :meth:`state_dict` can save the micro-batches in flight (their graphs are recomputed on load).
    """

    def __init__(self, index: int, module: nn.Module, group_index: int, optimizer: PipelineOptimizer, *, weight_mode: str,
                 device: torch.device) -> None:
        self.index = index
        self.module = module
        self.group_index = group_index
        self.optimizer = optimizer
        self.params = group_params(self.group)
        self.weight_mode = weight_mode
        self.device = device
        self.inflight: dict[int, _Record] = {}
        self.override: Optional[list[Tensor]] = None
        self.keep_forward_state = False

    @property
    def group(self) -> dict[str, Any]:
        """The stage's optimizer group (looked up each time: ``optimizer.load_state_dict`` replaces the dicts)."""
        return self.optimizer.param_groups[self.group_index]

    @property
    def distance(self) -> int:
        """Updates between this stage's forward and backward of one micro-batch (the group's delay)."""
        return self.optimizer.stage_delay(self.group)

    # ------------------------------------------------------------------ forward / backward
    def _resolver(self, rec: _Record) -> Callable[[int, int], Tensor]:
        def resolve(_group: int, i: int) -> Tensor:
            if self.override is not None:
                return self.override[i]
            if self.weight_mode == "stash" and rec.weights is not None:
                return rec.weights[i]
            return self.params[i]

        return resolve

    def _run_forward(self, rec: _Record) -> Payload:
        weights = rec.weights if rec.weights is not None else self.params
        with ExitStack() as stack:
            if self.params:
                fwd = {(0, i): w for i, w in enumerate(weights)}
                stack.enter_context(rebound_saved_weights(fwd, self._resolver(rec)))
            if rec.weights is not None:
                stack.enter_context(swapped_weights(self.params, rec.weights))
            try:
                return self.module(rec.inputs)
            except (RuntimeError, TypeError, ValueError) as err:
                names = " > ".join(getattr(self.module, "names", [type(self.module).__name__]))
                raise type(err)(f"stage {self.index} ({names}) failed in its forward pass: {err}") from err

    def forward(self, n: int, inputs: Payload) -> Payload:
        """Run the forward of micro-batch ``n`` and keep it in flight; returns the stage output."""
        opt, group = self.optimizer, self.group
        weights: Optional[list[Tensor]] = None
        if self.params:
            if not opt.forward_uses_live_weights(group):
                weights = opt.forward_weights(group, out=[torch.empty_like(p) for p in self.params])
            elif self.distance > 0 and (self.weight_mode == "stash" or self.keep_forward_state):
                weights = [p.detach().clone() for p in self.params]
        rec = _Record(inputs=inputs, weights=weights)
        if self.keep_forward_state and self.distance > 0:
            rec.rng = torch.get_rng_state()
            rec.buffers = [b.detach().clone() for b in self.module.buffers()]
        rec.output = self._run_forward(rec)
        self.inflight[n] = rec
        return rec.output

    def set_loss(self, n: int, loss: Tensor) -> None:
        """The loss of in-flight micro-batch ``n`` (last stage): its backward starts from it."""
        self.inflight[n].loss = loss

    def backward(self, n: int, error: Payload) -> Payload:
        """Backward of micro-batch ``n`` given the error of its output; returns the error of its input."""
        rec = self.inflight.pop(n)
        for p in self.params:
            p.grad = None
        override = self.optimizer.backward_weights(self.group) if self.params else None
        self.override = list(override) if override is not None else None
        try:
            if rec.loss is not None:
                rec.loss.backward()
            else:
                outs, grads = [], []
                for o, g in zip(_leaves(rec.output), _leaves(error)):
                    if o is not None and g is not None and o.requires_grad:
                        outs.append(o)
                        grads.append(g.to(o.device, o.dtype))
                if outs:
                    torch.autograd.backward(outs, grads)
        finally:
            self.override = None
        if self.index == 0:
            return None
        return _rebuild(rec.inputs, [None if t is None else t.grad for t in _leaves(rec.inputs)])

    # ------------------------------------------------------------------ checkpoints
    def inflight_state(self) -> dict[int, dict[str, Any]]:
        """The in-flight micro-batches as their inputs plus the forward weights, buffers and RNG state they saw."""
        recs = {}
        for n, rec in self.inflight.items():
            if self.distance > 0 and rec.buffers is None:
                raise RuntimeError("checkpoints need keep_forward_state=True from the start of the run")
            recs[n] = {
                "inputs": detached(rec.inputs),
                "weights": None if rec.weights is None else [w.detach().clone() for w in rec.weights],
                "rng": rec.rng,
                "buffers": rec.buffers,
            }
        return recs

    def load_inflight_state(self, recs: dict[int, dict[str, Any]]) -> None:
        """Restore :meth:`inflight_state` and recompute each micro-batch's graph (bit-identical on the same machine)."""
        self.keep_forward_state = True
        self.inflight.clear()
        live = [b.detach().clone() for b in self.module.buffers()]
        for n in sorted(recs):
            saved = recs[n]
            inputs = saved["inputs"] if self.index == 0 else as_input(saved["inputs"], self.device)
            rec = _Record(inputs=to_device(inputs, self.device), weights=saved["weights"], rng=saved["rng"],
                          buffers=saved["buffers"])
            if rec.weights is None and self.params and self.distance > 0 and self.weight_mode == "stash":
                raise ValueError("checkpoint lacks the stashed weights of an in-flight micro-batch")
            with torch.no_grad():
                for b, v in zip(self.module.buffers(), rec.buffers or []):
                    b.copy_(v)
            with torch.random.fork_rng(devices=[]):
                if rec.rng is not None:
                    torch.set_rng_state(rec.rng)
                rec.output = self._run_forward(rec)
            self.inflight[n] = rec
        with torch.no_grad():
            for b, v in zip(self.module.buffers(), live):
                b.copy_(v)
