"""Point-to-point channels between neighbouring pipeline ranks on torch.distributed (c10d).

Each message is a *payload*: a tensor, ``None`` or a tuple/list of tensors and ``None`` (e.g. a residual
block's ``(h, skip)``). It travels as one ``uint8`` message whose size the receiver knows in advance
(the layout, i.e. structure, dtypes and shapes, is sent only when it changes; see :class:`Inbox`), so
the receive of the next message is posted ahead and the received tensors are views into its buffer.
Activations and errors use two separate process groups, so each channel is one-directional on its own
communicator (NCCL serializes the operations of one communicator per peer; two directions on one would
deadlock). ``batch_isend_irecv`` is not used (it hangs on gloo). Every wait has a timeout; a dead or
hanging peer raises :class:`PeerTimeoutError` or :class:`PeerLostError` with a message that names the
peer and the step.
"""

from __future__ import annotations

import datetime
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "Payload",
    "PipelineCommError",
    "PeerTimeoutError",
    "PeerLostError",
    "PipelineComm",
    "Outbox",
    "Inbox",
    "encode_header",
    "decode_header",
    "describe",
    "message_bytes",
    "HEADER_SIZE",
]

Payload = Union[Tensor, None, tuple, list]

#: int64 slots of a message header
HEADER_SIZE = 128

_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
)
_NONE = -1
_KIND_TENSOR, _KIND_SEQUENCE, _KIND_NONE = 0, 1, 2
_MSG_DATA, _MSG_LAYOUT = 0, 1  # message kinds (first int64 of a message)
_PREFIX = 16  # bytes before a message's first tensor
_ALIGN = 16  # tensors start at multiples of this many bytes


class PipelineCommError(RuntimeError):
    """A pipeline message could not be exchanged with a neighbouring rank."""


class PeerTimeoutError(PipelineCommError):
    """A neighbour sent nothing (or took nothing) within the timeout: it hangs or is far behind."""


class PeerLostError(PipelineCommError):
    """The connection to a neighbour broke: its process died."""


def _leaves(payload: Payload) -> tuple[int, list[Optional[Tensor]]]:
    if payload is None:
        return _KIND_NONE, []
    if isinstance(payload, Tensor):
        return _KIND_TENSOR, [payload]
    if isinstance(payload, (tuple, list)):
        for t in payload:
            if t is not None and not isinstance(t, Tensor):
                raise TypeError(f"pipeline messages hold tensors or None, got {type(t).__name__} inside a tuple")
        return _KIND_SEQUENCE, list(payload)
    raise TypeError(
        f"a stage must output a tensor or a tuple of tensors to be sent to the next rank, got {type(payload).__name__}"
    )


@dataclass
class _Layout:
    kind: int
    specs: list[Optional[tuple[torch.dtype, tuple[int, ...]]]]


def _header_of(layout: _Layout) -> Tensor:
    fields = [layout.kind, len(layout.specs)]
    for spec in layout.specs:
        if spec is None:
            fields.append(_NONE)
        else:
            fields += [_DTYPES.index(spec[0]), len(spec[1]), *spec[1]]
    if len(fields) > HEADER_SIZE:
        raise ValueError(
            f"a pipeline message needs {len(fields)} header fields (> {HEADER_SIZE}): send fewer or "
            "lower-dimensional tensors per stage boundary"
        )
    header = torch.zeros(HEADER_SIZE, dtype=torch.int64)
    header[: len(fields)] = torch.tensor(fields, dtype=torch.int64)
    return header


def encode_header(payload: Payload) -> tuple[Tensor, list[Tensor]]:
    """The int64 header describing ``payload`` and the (contiguous) tensors it holds."""
    layout, tensors = describe(payload)
    return _header_of(layout), [t.contiguous() for t in tensors]


def decode_header(header: Tensor) -> _Layout:
    """Inverse of :func:`encode_header` (without the tensors)."""
    fields = header.tolist()
    kind, count = int(fields[0]), int(fields[1])
    if kind not in (_KIND_TENSOR, _KIND_SEQUENCE, _KIND_NONE):
        raise PipelineCommError(f"received a corrupt message header (kind {kind}); are both ranks the same version?")
    pos, specs = 2, []
    for _ in range(count):
        code = int(fields[pos])
        pos += 1
        if code == _NONE:
            specs.append(None)
            continue
        ndim = int(fields[pos])
        shape = tuple(int(v) for v in fields[pos + 1 : pos + 1 + ndim])
        pos += 1 + ndim
        specs.append((_DTYPES[code], shape))
    return _Layout(kind, specs)


def _assemble(layout: _Layout, tensors: Sequence[Tensor]) -> Payload:
    it = iter(tensors)
    leaves = [None if spec is None else next(it) for spec in layout.specs]
    if layout.kind == _KIND_NONE:
        return None
    if layout.kind == _KIND_TENSOR:
        return leaves[0]
    return tuple(leaves)


def _classify(err: BaseException, what: str) -> PipelineCommError:
    text = str(err)
    low = text.lower()
    if "timed out" in low or "timeout" in low:
        return PeerTimeoutError(f"{what}: timed out ({text.splitlines()[0][:200]}). The peer hangs, died or is stuck.")
    if "connection closed" in low or "connection reset" in low or "broken pipe" in low or "closed by peer" in low:
        return PeerLostError(f"{what}: the connection broke, the peer process died ({text.splitlines()[0][:200]})")
    return PipelineCommError(f"{what}: {text.splitlines()[0][:300] if text else type(err).__name__}")


class PipelineComm:
    """This rank's view of the pipeline's process groups.

    Args:
        timeout: seconds any single wait for a neighbour may take before the rank gives up.
        device: where messages live (``cuda`` for NCCL, ``cpu`` for gloo).

    Build it with :meth:`from_env` after ``torch.distributed.init_process_group`` (collective: every rank
    must call it in the same order, it creates two process groups).
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        *,
        timeout: float,
        device: torch.device,
        act_group: Any = None,
        err_group: Any = None,
        backend: str = "gloo",
        group: Any = None,
    ) -> None:
        self.rank, self.world_size = rank, world_size
        self.group = group  # all ranks of this pipeline (None: the default group)
        self.timeout = float(timeout)
        self.device = torch.device(device)
        self.act_group, self.err_group = act_group, err_group
        self.backend = backend

    @classmethod
    def from_env(
        cls, timeout: float, device: torch.device | str = "cpu", ranks: Optional[int] = None
    ) -> Optional["PipelineComm"]:
        """The pipeline of global ranks ``0..ranks-1`` (default: all); ``None`` on ranks outside it.

        Collective: every process of the default group must call it, in the same order.
        """
        if not dist.is_initialized():
            raise RuntimeError("call torch.distributed.init_process_group before PipelineComm.from_env")
        world = dist.get_world_size()
        size = world if ranks is None else int(ranks)
        if not 1 <= size <= world:
            raise ValueError(f"a pipeline of {size} ranks does not fit in a world of {world}")
        td = datetime.timedelta(seconds=timeout)
        members = None if size == world else list(range(size))
        act = dist.new_group(members, timeout=td)
        err = dist.new_group(members, timeout=td)
        if dist.get_rank() >= size:
            return None
        return cls(
            dist.get_rank(),
            size,
            timeout=timeout,
            device=torch.device(device),
            act_group=act,
            err_group=err,
            backend=str(dist.get_backend()),
            group=act if members is not None else None,
        )

    def isend(self, tensor: Tensor, peer: int, group: Any, what: str) -> Any:
        try:
            return dist.isend(tensor, dst=peer, group=group)
        except Exception as err:
            raise _classify(err, what) from err

    def irecv(self, tensor: Tensor, peer: int, group: Any, what: str) -> Any:
        try:
            return dist.irecv(tensor, src=peer, group=group)
        except Exception as err:
            raise _classify(err, what) from err

    def barrier(self, timeout: Optional[float] = None) -> None:
        """Wait until every rank got here (e.g. built its stages), at most ``timeout`` (default: the PG's).

        On gloo a rank that does not arrive is named in the error.
        """
        if self.world_size <= 1 or not dist.is_initialized():
            return
        what = f"rank {self.rank}: waiting for all ranks to start"
        try:
            if self.backend == "gloo":
                kw = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
                dist.monitored_barrier(group=self.group, **kw)
            else:
                dist.barrier(group=self.group)
        except Exception as err:
            raise _classify(err, what) from err

    def wait(self, work: Any, what: str) -> None:
        """Wait for ``work`` at most ``timeout`` seconds; raise a :class:`PipelineCommError` naming ``what``."""
        try:
            if self.backend == "gloo":
                work.wait(timeout=datetime.timedelta(seconds=self.timeout))
                return
            deadline = time.monotonic() + self.timeout  # NCCL: poll, so that the CPU side can time out
            while not work.is_completed():
                if time.monotonic() > deadline:
                    raise PeerTimeoutError(f"{what}: timed out after {self.timeout:g}s. The peer hangs, died or is stuck.")
                time.sleep(2e-5)
            work.wait()
        except PipelineCommError:
            raise
        except Exception as err:  # c10d raises RuntimeError/DistBackendError
            raise _classify(err, what) from err


def _nbytes(spec: tuple[torch.dtype, tuple[int, ...]]) -> int:
    dtype, shape = spec
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def describe(payload: Payload) -> tuple[_Layout, list[Tensor]]:
    """The layout of ``payload`` (structure, dtypes, shapes) and its tensors, without building a header."""
    kind, leaves = _leaves(payload)
    specs: list[Optional[tuple[torch.dtype, tuple[int, ...]]]] = []
    tensors: list[Tensor] = []
    for t in leaves:
        if t is None:
            specs.append(None)
            continue
        if t.dtype not in _DTYPES:
            raise TypeError(f"cannot send a tensor of dtype {t.dtype} between pipeline ranks")
        specs.append((t.dtype, tuple(t.shape)))
        tensors.append(t.detach())
    return _Layout(kind, specs), tensors


def message_bytes(layout: Optional[_Layout]) -> int:
    """Size of one message carrying ``layout`` (``None``: the first message of a channel, a layout):
    a 16-byte prefix, then every tensor at a 16-byte aligned offset; never smaller than a layout message."""
    data = 0 if layout is None else sum(_aligned(_nbytes(spec)) for spec in layout.specs if spec is not None)
    return _PREFIX + max(data, 8 * HEADER_SIZE)


def _views(layout: _Layout, buf: Tensor) -> list[Tensor]:
    """The tensors of ``layout`` as views into the message buffer ``buf`` (no copy)."""
    out, off = [], _PREFIX
    for spec in layout.specs:
        if spec is None:
            continue
        n = _nbytes(spec)
        out.append(buf[off : off + n].view(spec[0]).view(spec[1]))
        off += _aligned(n)
    return out


class Outbox:
    """Sends payloads to one peer, one message each (see :class:`Inbox` for the format); at most
    ``capacity`` messages may be in flight (the oldest is awaited, and its buffer reused, beyond that)."""

    def __init__(self, comm: PipelineComm, peer: int, group: Any, *, capacity: int, what: str) -> None:
        if capacity < 1:
            raise ValueError(f"queue capacity must be >= 1, got {capacity}")
        self.comm, self.peer, self.group, self.capacity, self.what = comm, peer, group, capacity, what
        self._pending: deque[tuple[Any, Tensor, str]] = deque()
        self._free: dict[int, list[Tensor]] = {}  # sent buffers, by size, ready for reuse
        self._peer_layout: Optional[_Layout] = None  # the layout the receiver expects next
        self.wait_seconds = 0.0
        self.messages = 0
        self.layout_messages = 0

    def _buffer(self, nbytes: int) -> Tensor:
        free = self._free.get(nbytes)
        if free:
            return free.pop()
        return torch.empty(nbytes, dtype=torch.uint8, device=self.comm.device)

    def _send(self, buf: Tensor, kind: int, label: str) -> None:
        buf[:8].view(torch.int64).fill_(kind)
        what = f"rank {self.comm.rank}: sending {self.what} {label} to rank {self.peer}"
        self._pending.append((self.comm.isend(buf, self.peer, self.group, what), buf, label))
        self.messages += 1
        while len(self._pending) > self.capacity:
            self._wait_oldest()

    def put(self, payload: Payload, label: str) -> None:
        layout, tensors = describe(payload)
        if layout != self._peer_layout:
            # the receiver has posted a receive for the old layout's size: tell it the new layout first
            header = _header_of(layout)
            buf = self._buffer(message_bytes(self._peer_layout))
            buf[_PREFIX : _PREFIX + 8 * HEADER_SIZE].view(torch.int64).copy_(header)
            self._send(buf, _MSG_LAYOUT, label)
            self.layout_messages += 1
            self._peer_layout = layout
        buf = self._buffer(message_bytes(layout))
        for view, t in zip(_views(layout, buf), tensors):
            view.copy_(t)
        self._send(buf, _MSG_DATA, label)

    def _wait_oldest(self) -> None:
        work, buf, label = self._pending.popleft()
        t0 = time.perf_counter()
        self.comm.wait(work, f"rank {self.comm.rank}: sending {self.what} {label} to rank {self.peer}")
        self.wait_seconds += time.perf_counter() - t0
        self._free.setdefault(buf.numel(), []).append(buf)

    def flush(self) -> None:
        while self._pending:
            self._wait_oldest()

    def __len__(self) -> int:
        return len(self._pending)


class Inbox:
    """Receives ``expected`` payloads from one peer, keeping the receive of the next message posted ahead.

    **Message format.** Every payload travels as *one* message: a ``uint8`` buffer holding a 16-byte prefix
    (the message kind) and the payload's tensors at 16-byte aligned offsets. Both sides know the size of
    the next message, because both track the layout (structure, dtypes, shapes) the receiver expects: the
    previous payload's. So the receive of message ``k + 1`` is posted (into a buffer allocated ahead) as
    soon as message ``k`` arrived, and in steady state there is no header, no shape exchange and no
    serialization: the received tensors are views into the buffer. When the layout changes (the first
    message, a smaller last micro-batch, varying shapes) the sender first sends a *layout message* of the
    size the receiver expects, holding the new header (:func:`encode_header`), then the payload.
    """

    def __init__(self, comm: PipelineComm, peer: int, group: Any, *, expected: int, what: str) -> None:
        self.comm, self.peer, self.group, self.what = comm, peer, group, what
        self.remaining = int(expected)
        self._layout: Optional[_Layout] = None
        self._buf: Optional[Tensor] = None
        self._work: Any = None
        self.wait_seconds = 0.0
        self._post()

    def _post(self) -> None:
        if self._work is None and self.remaining > 0:
            self._buf = torch.empty(message_bytes(self._layout), dtype=torch.uint8, device=self.comm.device)
            what = f"rank {self.comm.rank}: receiving {self.what} from rank {self.peer}"
            self._work = self.comm.irecv(self._buf, self.peer, self.group, what)

    def get(self, label: str) -> Payload:
        """The next payload (blocks at most the timeout per message)."""
        if self.remaining <= 0 or self._work is None:
            raise PipelineCommError(f"rank {self.comm.rank}: no more {self.what} expected from rank {self.peer}")
        what = f"rank {self.comm.rank}: waiting for {self.what} {label} from rank {self.peer}"
        t0 = time.perf_counter()
        while True:
            self.comm.wait(self._work, what)
            buf, self._work = self._buf, None
            assert buf is not None
            kind = int(buf[:8].view(torch.int64)[0])
            if kind == _MSG_DATA and self._layout is not None:
                break
            if kind != _MSG_LAYOUT:
                raise PipelineCommError(
                    f"{what}: received a corrupt message (kind {kind}); are both ranks the same pipeprop version?"
                )
            self._layout = decode_header(buf[_PREFIX : _PREFIX + 8 * HEADER_SIZE].view(torch.int64).cpu())
            self._post()
        self.wait_seconds += time.perf_counter() - t0
        self.remaining -= 1
        self._post()
        return _assemble(self._layout, _views(self._layout, buf))
