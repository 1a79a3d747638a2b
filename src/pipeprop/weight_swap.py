"""Run a forward pass with one set of weights and its backward pass with another.

This is the mechanism behind every pipeline engine in pipeprop. ``swapped_weights`` temporarily points
parameters at other tensors (stale or predicted weights) so that a stage's forward uses them while the
gradient still accumulates into the parameter's ``.grad``. :class:`SavedWeightRebinder` installs
``torch.autograd.graph.saved_tensors_hooks`` so that every tensor autograd saves that lies inside one of
those forward weights (matched by *storage region*, since autograd often saves a view such as
``weight.t()``, and parameters may be views of one flat buffer) is replaced at backward time by the same
view of a tensor chosen then (the live weights on PB hardware, the stashed forward weights for weight
stashing, or an optimizer's correction). Weight gradients are computed from the stashed activations, as
on the hardware, and need no special handling.

Tensors autograd saves that are *derived* from weights only (a cast under autocast, ``w.t().contiguous()``,
a parametrization such as ``weight_norm``, a weight standardisation written with ordinary ops) do not
alias a weight. :class:`DerivedWeightTracker`, a ``TorchDispatchMode`` active during a stage's forward,
records the ops whose inputs are weights or weight-derived tensors (never an activation), registers their
outputs with the rebinder, and at backward time replays that record once on the backward weights.
:func:`check_ctx_weights` finds custom ``autograd.Function`` s that keep a weight on ``ctx`` instead of
``save_for_backward`` (their backward could see neither the live nor the stashed weight reliably) and
raises an error naming them.
"""

from __future__ import annotations

from bisect import bisect_right
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "swapped_weights",
    "rebound_saved_weights",
    "WeightResolver",
    "SavedWeightRebinder",
    "DerivedWeightTracker",
    "check_ctx_weights",
]

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


def _extent(t: Tensor) -> int:
    """Number of storage elements from ``t``'s offset to its last element, inclusive."""
    if t.is_contiguous():
        return t.numel()
    return 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 0)


class _Entry:
    """A registered forward weight: its byte range ``[addr, end)`` and what it resolves to at backward time
    (a tensor, or a callable returning one)."""

    __slots__ = ("addr", "end", "itemsize", "resolve", "label", "derived", "stage")

    def __init__(self, addr: int, end: int, itemsize: int, resolve: Any, label: str, derived: bool, stage: int) -> None:
        self.addr, self.end, self.itemsize = addr, end, itemsize
        self.resolve, self.label, self.derived, self.stage = resolve, label, derived, stage

    def target(self) -> Tensor:
        r = self.resolve
        return (r if isinstance(r, Tensor) else r()).detach()


class _Marker:
    __slots__ = ("entry", "size", "stride", "offset")

    def __init__(self, entry: _Entry, size: torch.Size, stride: tuple[int, ...], offset: int) -> None:
        self.entry, self.size, self.stride, self.offset = entry, size, stride, offset


def _byte_range(t: Tensor) -> tuple[int, int]:
    """``[first, last + 1)`` byte addresses of the elements of ``t`` (empty range for a tensor without elements)."""
    addr = t.data_ptr()
    return addr, addr + (_extent(t) * t.element_size() if t.numel() else 0)


class SavedWeightRebinder:
    """Tensors registered here are swapped, when autograd saves a view of them, for a tensor chosen at backward.

    :meth:`register` a forward tensor with its backward replacement ``resolve`` (a tensor of the same shape
    and strides, or a callable returning one, called at backward time); then run the forward inside
    :meth:`hooks`. A saved tensor is matched by memory: it must lie inside one registered tensor (a view such
    as ``weight.t()`` or a slice of a fused weight). The match costs one address lookup per saved tensor.
    """

    def __init__(self) -> None:
        self._entries: list[_Entry] = []
        self._starts: Optional[list[int]] = []  # sorted byte addresses of _entries (None: to be sorted)
        #: stages whose saved tensors matched a weight-derived (not aliasing) tensor
        self.derived_hits: set[int] = set()

    def register(
        self, tensor: Tensor, resolve: Any, label: str = "", *, derived: bool = False, stage: int = -1
    ) -> None:
        n = tensor.numel()
        if n == 0 or tensor.layout != torch.strided:
            return  # nothing autograd could save from a zero-size weight needs rebinding
        addr, size = tensor.data_ptr(), tensor.element_size()
        end = addr + (n if tensor.is_contiguous() else _extent(tensor)) * size
        self._entries.append(_Entry(addr, end, size, resolve, label, derived, stage))
        self._starts = None
        if derived:  # registered while a forward runs: check at once
            self._sorted()

    def _sorted(self) -> list[int]:
        """Sort the entries by address; drop exact repeats (a shared weight read at the same version) and
        reject partial overlaps (pipeprop could not tell which tensor autograd saved)."""
        if self._starts is None:
            entries = sorted(self._entries, key=lambda e: (e.addr, e.end))
            kept: list[_Entry] = []
            for e in entries:
                if kept and e.addr < kept[-1].end:
                    prev = kept[-1]
                    if (prev.addr, prev.end) == (e.addr, e.end):
                        continue
                    raise ValueError(
                        f"forward weights {prev.label or '?'} and {e.label or '?'} overlap in memory without being the "
                        "same tensor; pipeprop cannot tell which one autograd saved"
                    )
                kept.append(e)
            self._entries = kept
            self._starts = [e.addr for e in kept]
        return self._starts

    def find(self, t: Tensor) -> Optional[_Entry]:
        if not self._entries or t.layout != torch.strided:
            return None
        starts = self._starts if self._starts is not None else self._sorted()
        addr = t.data_ptr()
        i = bisect_right(starts, addr) - 1
        if i < 0:
            return None
        e = self._entries[i]
        if addr >= e.end:
            return None
        return e if _byte_range(t)[1] <= e.end else None

    def __bool__(self) -> bool:
        return bool(self._entries)

    def _pack(self, t: Tensor) -> Any:  # find(t), inlined: it runs for every tensor autograd saves
        starts = self._starts
        if not starts or t.layout != torch.strided:
            return self._pack_slow(t) if starts is None else t
        addr = t.data_ptr()
        i = bisect_right(starts, addr) - 1
        if i < 0:
            return t
        e = self._entries[i]
        if addr >= e.end or _byte_range(t)[1] > e.end:
            return t
        if e.derived:
            self.derived_hits.add(e.stage)
        return _Marker(e, t.size(), t.stride(), (addr - e.addr) // e.itemsize)

    def _pack_slow(self, t: Tensor) -> Any:
        e = self.find(t)
        if e is None:
            return t
        if e.derived:
            self.derived_hits.add(e.stage)
        return _Marker(e, t.size(), t.stride(), (t.data_ptr() - e.addr) // e.itemsize)

    @staticmethod
    def _unpack(obj: Any) -> Any:
        if not isinstance(obj, _Marker):
            return obj
        target = obj.entry.target()
        return target.as_strided(obj.size, obj.stride, target.storage_offset() + obj.offset)

    @contextmanager
    def hooks(self) -> Iterator[None]:
        self._sorted()
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield


@contextmanager
def rebound_saved_weights(
    forward_weights: dict[tuple[int, int], Tensor], resolve: WeightResolver
) -> Iterator[None]:
    """Inside the block, saved tensors aliasing ``forward_weights`` are re-resolved at backward time.

    Args:
        forward_weights: ``{(group, index): tensor}`` used in the forward pass; distinct tensors must not
            overlap in memory (views of disjoint parts of one buffer are fine).
        resolve: called during backward with ``(group, index)``; returns the tensor to use instead. It
            must have the same shape as the forward weight (views are rebuilt with the same strides).
    """
    binder = SavedWeightRebinder()
    for key, t in forward_weights.items():
        binder.register(t, lambda key=key: resolve(*key), str(key))
    with binder.hooks():
        yield


# ----------------------------------------------------------------------------------------------- derived weights
class _Ref:
    """A tensor argument in the record: a view of a weight (``entry``), a recorded output (``slot``) or a constant."""

    __slots__ = ("entry", "slot", "const", "size", "stride", "offset")

    def __init__(self, entry=None, slot=None, const=None, size=None, stride=None, offset=0) -> None:
        self.entry, self.slot, self.const, self.size, self.stride, self.offset = entry, slot, const, size, stride, offset


class DerivedWeightTracker(TorchDispatchMode):
    """Records, during one stage's forward, the ops computed from that stage's weights alone.

    Their outputs are registered with ``binder`` so that a saved one is replaced at backward time by the
    same op replayed on the backward weights (replayed once per tracker, i.e. per stage and step, on
    first use). An op reading an activation (the stage input or anything computed from it) is not
    recorded; an op reading only weights, weight-derived tensors and constants is. Random ops on weights
    (e.g. DropConnect) cannot be replayed and raise.
    """

    def __init__(self, binder: SavedWeightRebinder, stage: int, label: str = "") -> None:
        super().__init__()
        self.binder, self.stage, self.label = binder, stage, label
        self._activations: dict[int, Tensor] = {}
        self._slot_of: dict[int, int] = {}
        self._keep: list[Tensor] = []
        self._tape: list[tuple[Any, Any, Any, list[Optional[int]]]] = []
        self._replayed: Optional[list[Optional[Tensor]]] = None

    def mark_activations(self, values: Any) -> None:
        for t in _tensors(values):
            self._activations[id(t)] = t

    def _encode(self, a: Any) -> Any:
        if isinstance(a, Tensor):
            slot = self._slot_of.get(id(a))
            if slot is not None:
                return _Ref(slot=slot)
            e = self.binder.find(a)
            if e is not None and not e.derived:
                return _Ref(entry=e, size=a.size(), stride=a.stride(), offset=(a.data_ptr() - e.addr) // e.itemsize)
            return _Ref(const=a)
        if isinstance(a, (list, tuple)):
            return type(a)(self._encode(x) for x in a)
        return a

    def _decode(self, a: Any) -> Any:
        if isinstance(a, _Ref):
            if a.slot is not None:
                return self._replayed[a.slot]  # type: ignore[index]
            if a.entry is None:
                return a.const
            base = a.entry.target()
            return base.as_strided(a.size, a.stride, base.storage_offset() + a.offset)
        if isinstance(a, (list, tuple)):
            return type(a)(self._decode(x) for x in a)
        return a

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        has_weight = False
        has_activation = False
        for t in _tensors((args, kwargs)):
            if id(t) in self._activations:
                has_activation = True
                break
            if id(t) in self._slot_of or self.binder.find(t) is not None:
                has_weight = True
        if has_activation:
            for t in _tensors(out):
                self._activations[id(t)] = t
            return out
        if not has_weight:
            return out
        if torch.Tag.nondeterministic_seeded in func.tags:
            raise RuntimeError(
                f"{self.label or f'stage {self.stage}'}: the random op {func} is applied to weights in the forward "
                "(e.g. DropConnect); its backward could not be given the live weights. Apply the randomness to "
                "activations, or use method='pb+stash'."
            )
        slots: list[Optional[int]] = []
        for t in _tensors(out):
            self._keep.append(t)
            slot = len(self._keep) - 1
            self._slot_of[id(t)] = slot
            slots.append(slot)
            if self.binder.find(t) is None:
                self.binder.register(t, lambda slot=slot: self._replay()[slot], f"{self.label}:{func}", derived=True, stage=self.stage)
        self._tape.append((func, self._encode(tuple(args)), self._encode_kwargs(kwargs), slots))
        return out

    def _encode_kwargs(self, kwargs: dict) -> dict:
        return {k: self._encode(v) for k, v in kwargs.items()}

    def _replay(self) -> list[Optional[Tensor]]:
        if self._replayed is None:
            self._replayed = [None] * len(self._keep)
            with torch.no_grad():
                for func, args, kwargs, slots in self._tape:
                    out = func(*self._decode(args), **{k: self._decode(v) for k, v in kwargs.items()})
                    for slot, t in zip(slots, _tensors(out)):
                        self._replayed[slot] = t  # type: ignore[index]
        return self._replayed  # type: ignore[return-value]

    def __exit__(self, *exc: Any) -> Any:
        self._activations.clear()  # keep only what the replay needs
        return super().__exit__(*exc)


def _tensors(x: Any) -> Iterator[Tensor]:
    """The tensors in ``x``: tensors, lists, tuples, dicts and objects with ``args``/``kwargs`` (model inputs)."""
    if isinstance(x, Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for e in x:
            yield from _tensors(e)
    elif isinstance(x, dict):
        for e in x.values():
            yield from _tensors(e)
    elif hasattr(x, "args") and hasattr(x, "kwargs"):
        yield from _tensors(x.args)
        yield from _tensors(x.kwargs)


# ----------------------------------------------------------------------------------------------- ctx check
def check_ctx_weights(loss: Tensor, binder: SavedWeightRebinder, params: dict[int, str]) -> None:
    """Raise if a custom ``autograd.Function`` in ``loss``'s graph keeps a weight on ``ctx``.

    Args:
        params: ``id(parameter) -> name`` of the parameters whose backward must be rebound; tensors inside
            a weight registered with ``binder`` count as well.
    """
    seen: set[int] = set()
    todo = [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            for attr, value in vars(node).items():
                for t in _tensors(value):
                    entry = binder.find(t)
                    name = params.get(id(t)) or (entry.label or "?" if entry is not None else None)
                    if name is not None:
                        raise RuntimeError(
                            f"{type(node).__name__[: -len('Backward')] or type(node).__name__} keeps the weight {name} "
                            f"on ctx (ctx.{attr}) instead of saving it with ctx.save_for_backward(...), so pipeprop "
                            "cannot give its backward the live weights (PB) or the stashed ones (pb+stash). Save "
                            "weights with ctx.save_for_backward and read them from ctx.saved_tensors."
                        )
        todo.extend(fn for fn, _ in node.next_functions)
