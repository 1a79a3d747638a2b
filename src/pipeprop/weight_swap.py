"""Run a forward pass with one set of weights and its backward pass with another.

This is the mechanism behind every pipeline engine in pipeprop. ``swapped_weights`` temporarily points
parameters at other tensors (stale or predicted weights) so that a stage's forward uses them while the
gradient still accumulates into the parameter's ``.grad``. ``rebound_saved_weights`` installs
``torch.autograd.graph.saved_tensors_hooks`` so that every tensor autograd saves that aliases one of
those forward weights (matched by *storage*, since autograd often saves a view such as ``weight.t()``)
is replaced at backward time by the same view of a tensor chosen then (the live weights on PB hardware,
the stashed forward weights for weight stashing, or an optimizer's correction). Weight gradients are
computed from the stashed activations, as on the hardware, and need no special handling.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["swapped_weights", "rebound_saved_weights", "WeightResolver"]

#: maps (group index, parameter index) to the tensor a backward pass should use
WeightResolver = Callable[[int, int], Tensor]


@contextmanager
def swapped_weights(params: Sequence[Tensor], tensors: Sequence[Tensor]) -> Iterator[None]:
    """Let ``params`` hold ``tensors``' data inside the block (same shapes, dtypes and devices)."""
    live = [p.data for p in params]
    try:
        for p, t in zip(params, tensors):
            if t is not p:
                p.data = t
        yield
    finally:
        for p, d in zip(params, live):
            p.data = d


class _Marker:
    __slots__ = ("key", "size", "stride", "offset")

    def __init__(self, key: tuple[int, int], size: torch.Size, stride: tuple[int, ...], offset: int) -> None:
        self.key, self.size, self.stride, self.offset = key, size, stride, offset


@contextmanager
def rebound_saved_weights(
    forward_weights: dict[tuple[int, int], Tensor], resolve: WeightResolver
) -> Iterator[None]:
    """Inside the block, saved tensors aliasing ``forward_weights`` are re-resolved at backward time.

    Args:
        forward_weights: ``{(group, index): tensor}`` used in the forward pass; each must own its storage
            region (distinct tensors must not share storage).
        resolve: called during backward with ``(group, index)``; returns the tensor to use instead. It
            must have the same shape as the forward weight (views are rebuilt with the same strides).
    """
    by_storage: dict[int, tuple[tuple[int, int], int]] = {}
    for key, t in forward_weights.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in by_storage:
            raise ValueError(f"forward weights {by_storage[ptr][0]} and {key} share storage")
        by_storage[ptr] = (key, t.storage_offset())

    def pack(t: Tensor):
        hit = by_storage.get(t.untyped_storage().data_ptr()) if t.layout == torch.strided else None
        if hit is None:
            return t
        key, base_offset = hit
        return _Marker(key, t.size(), t.stride(), t.storage_offset() - base_offset)

    def unpack(obj):
        if not isinstance(obj, _Marker):
            return obj
        target = resolve(*obj.key).detach()
        return target.as_strided(obj.size, obj.stride, target.storage_offset() + obj.offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
