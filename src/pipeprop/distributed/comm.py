"""Point-to-point channels between neighbouring pipeline ranks on torch.distributed (c10d).

Each message is a *payload*: a tensor, ``None`` or a tuple/list of tensors and ``None`` (e.g. a residual
block's ``(h, skip)``). It travels as a fixed-size int64 header (structure, dtypes, shapes; so shapes may
change from message to message) followed by one ``isend`` per tensor. Activations and errors use two
separate process groups, so each channel is one-directional on its own communicator (NCCL serializes the
operations of one communicator per peer; two directions on one would deadlock). ``batch_isend_irecv`` is
not used (it hangs on gloo). Every wait has a timeout; a dead or hanging peer raises
:class:`PeerTimeoutError` or :class:`PeerLostError` with a message that names the peer and the step.
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


def encode_header(payload: Payload) -> tuple[Tensor, list[Tensor]]:
    """The int64 header describing ``payload`` and the (contiguous) tensors to send after it."""
    kind, leaves = _leaves(payload)
    fields = [kind, len(leaves)]
    tensors: list[Tensor] = []
    for t in leaves:
        if t is None:
            fields.append(_NONE)
            continue
        if t.dtype not in _DTYPES:
            raise TypeError(f"cannot send a tensor of dtype {t.dtype} between pipeline ranks")
        fields += [_DTYPES.index(t.dtype), t.dim(), *t.shape]
        tensors.append(t.detach().contiguous())
    if len(fields) > HEADER_SIZE:
        raise ValueError(
            f"a pipeline message needs {len(fields)} header fields (> {HEADER_SIZE}): send fewer or "
            "lower-dimensional tensors per stage boundary"
        )
    header = torch.zeros(HEADER_SIZE, dtype=torch.int64)
    header[: len(fields)] = torch.tensor(fields, dtype=torch.int64)
    return header, tensors


@dataclass
class _Layout:
    kind: int
    specs: list[Optional[tuple[torch.dtype, tuple[int, ...]]]]


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


class Outbox:
    """Sends payloads to one peer; at most ``capacity`` messages may be in flight (older ones are awaited)."""

    def __init__(self, comm: PipelineComm, peer: int, group: Any, *, capacity: int, what: str) -> None:
        if capacity < 1:
            raise ValueError(f"queue capacity must be >= 1, got {capacity}")
        self.comm, self.peer, self.group, self.capacity, self.what = comm, peer, group, capacity, what
        self._pending: deque[tuple[list[Any], list[Tensor], str]] = deque()
        self.wait_seconds = 0.0

    def put(self, payload: Payload, label: str) -> None:
        header, tensors = encode_header(payload)
        dev = self.comm.device
        header = header.to(dev)
        tensors = [t.to(dev) for t in tensors]
        what = f"rank {self.comm.rank}: sending {self.what} {label} to rank {self.peer}"
        works = [self.comm.isend(t, self.peer, self.group, what) for t in (header, *tensors)]
        self._pending.append((works, [header, *tensors], label))
        while len(self._pending) > self.capacity:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        works, _, label = self._pending.popleft()
        t0 = time.perf_counter()
        for w in works:
            self.comm.wait(w, f"rank {self.comm.rank}: sending {self.what} {label} to rank {self.peer}")
        self.wait_seconds += time.perf_counter() - t0

    def flush(self) -> None:
        while self._pending:
            self._wait_oldest()

    def __len__(self) -> int:
        return len(self._pending)


class Inbox:
    """Receives ``expected`` payloads from one peer, keeping the next header receive posted ahead."""

    def __init__(self, comm: PipelineComm, peer: int, group: Any, *, expected: int, what: str) -> None:
        self.comm, self.peer, self.group, self.what = comm, peer, group, what
        self.remaining = int(expected)
        self._header: Optional[Tensor] = None
        self._work: Any = None
        self.wait_seconds = 0.0
        self._post()

    def _post(self) -> None:
        if self._work is None and self.remaining > 0:
            self._header = torch.empty(HEADER_SIZE, dtype=torch.int64, device=self.comm.device)
            what = f"rank {self.comm.rank}: receiving {self.what} from rank {self.peer}"
            self._work = self.comm.irecv(self._header, self.peer, self.group, what)

    def get(self, label: str) -> Payload:
        """The next payload (blocks at most the timeout per message part)."""
        if self.remaining <= 0 or self._work is None:
            raise PipelineCommError(f"rank {self.comm.rank}: no more {self.what} expected from rank {self.peer}")
        what = f"rank {self.comm.rank}: waiting for {self.what} {label} from rank {self.peer}"
        t0 = time.perf_counter()
        self.comm.wait(self._work, what)
        assert self._header is not None
        layout = decode_header(self._header.cpu())
        tensors = [torch.empty(spec[1], dtype=spec[0], device=self.comm.device) for spec in layout.specs if spec is not None]
        works = [self.comm.irecv(t, self.peer, self.group, what) for t in tensors]
        for w in works:
            self.comm.wait(w, what)
        self.wait_seconds += time.perf_counter() - t0
        self.remaining -= 1
        self._work = None
        self._post()
        return _assemble(layout, tensors)
