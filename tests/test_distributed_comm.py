"""The one-message-per-payload channel (sizes known ahead, layout sent only on change) and the assignment of
stages to ranks by measured stage time."""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeprop
from pipeprop.distributed import PipelineComm, assign_stages, build_pipeline
from pipeprop.distributed.assignment import measure_stage_times
from pipeprop.distributed.comm import Inbox, Outbox, message_bytes

from test_distributed import LR, MICROBATCHES, MOMENTUM, WD, make_batches, make_model, read_error, run_procs, \
    simulator_reference


# ---------------------------------------------------------------------------------------------- a channel in one process
class _Done:
    def wait(self) -> None:
        pass


class _Recv:
    def __init__(self, wire: "_Wire", buf: torch.Tensor) -> None:
        self.wire, self.buf = wire, buf

    def wait(self) -> None:
        sent = self.wire.queue.popleft()  # messages arrive in order; each must fit its receive exactly
        assert sent.dtype == self.buf.dtype and sent.shape == self.buf.shape, (sent.shape, self.buf.shape)
        self.buf.copy_(sent)


class _Wire(PipelineComm):
    """Both ends of one channel in this process, with c10d's rule that a receive has the sent size. It
    records whether the receive of each message was posted before the message was sent."""

    def __init__(self) -> None:
        super().__init__(0, 2, timeout=1.0, device=torch.device("cpu"), backend="wire")
        self.queue: deque[torch.Tensor] = deque()
        self.posted = 0  # receives posted so far
        self.sends: list[tuple[int, bool]] = []  # (bytes, a receive was waiting for it)

    def isend(self, tensor, peer, group, what):
        self.sends.append((tensor.numel(), self.posted > len(self.sends)))
        self.queue.append(tensor.clone())  # the sender may reuse its buffer once the send is awaited
        return _Done()

    def irecv(self, tensor, peer, group, what):
        self.posted += 1
        return _Recv(self, tensor)

    def wait(self, work, what):
        work.wait()


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def test_channel_sends_each_payload_as_one_message_of_a_size_known_ahead() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, dtype=torch.float64, generator=g)
    payloads = [
        x, x + 1, x + 2,  # same layout: no layout message after the first
        torch.randn(1, 3, dtype=torch.float64, generator=g),  # a smaller micro-batch
        (torch.randn(2, 4, generator=g), None, torch.arange(5)),  # a tuple with a hole and an int tensor
        (torch.randn(2, 4, generator=g), None, torch.arange(5) * 2),
        None,
        torch.tensor(3.5),  # 0-dim
        torch.tensor([True, False, True]),
        torch.zeros(0, 3),
        torch.randn(40, 50, generator=g),  # larger than a layout message
        torch.randn(40, 50, generator=g).t(),  # not contiguous
        torch.randn(2, 3, dtype=torch.float64, generator=g),
    ]
    wire = _Wire()
    inbox = Inbox(wire, 1, None, expected=len(payloads), what="activations")
    outbox = Outbox(wire, 1, None, capacity=2, what="activations")
    got = []
    for p in payloads:
        outbox.put(p, "test")
        got.append(inbox.get("test"))
    outbox.flush()
    for p, q in zip(payloads, got, strict=True):
        assert _same(p, q), (p, q)
    # layout messages: the first, then one per change of structure, dtype or shape (9 changes)
    assert outbox.layout_messages == 10 and outbox.messages == len(payloads) + 10
    assert not wire.queue and inbox.remaining == 0
    # every message found its receive posted, except the payload right after a layout message
    assert sum(not waiting for _, waiting in wire.sends) == outbox.layout_messages
    # received tensors are views into the one message buffer (no copy, no per-tensor message)
    a, _, b = got[4]
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    # a message is the payload after a 16-byte prefix (no header); a layout message has the size the
    # receiver expects: the (40, 50) payload, the layout of the transposed (50, 40) one, that payload and
    # the layout of the last (2, 3) payload all have the (40, 50) payload's size
    assert sum(1 for n, _ in wire.sends if n == 16 + 4 * 40 * 50) == 4
    assert message_bytes(outbox._peer_layout) == 16 + 1024 and wire.sends[-1][0] == 16 + 1024


def test_channel_rejects_a_corrupt_message() -> None:
    wire = _Wire()
    inbox = Inbox(wire, 1, None, expected=1, what="errors")
    wire.queue.append(torch.full((message_bytes(None),), 7, dtype=torch.uint8))
    with pytest.raises(pipeprop.distributed.PipelineCommError, match="corrupt message"):
        inbox.get("of micro-batch 0 (step 2)")


# ---------------------------------------------------------------------------------------------- measured assignment
def test_measured_stage_times_leave_everything_as_it_was() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    stages = pipeprop.partition(model, "layer").stages
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    sample = torch.randn(4, 8)
    rng = torch.get_rng_state()
    times = measure_stage_times(stages, sample, repeats=3)
    assert len(times) == len(stages) and all(t > 0 for t in times)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), "weights or buffers changed"
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters()), ".grad changed"
    assert torch.equal(torch.get_rng_state(), rng)
    with pytest.raises(ValueError, match="needs the pipeline's comm"):
        assign_stages(stages, 2, "measured", torch.randn(4, 8))
    with pytest.raises(ValueError, match="sample input"):
        measure_stage_times(stages, None)
    assert assign_stages(stages, 1, "measured", torch.randn(4, 8)) == [range(0, len(stages))]


class Slow(nn.Module):
    """A linear layer whose forward takes ``ms[rank]`` milliseconds longer on each rank (RANK variable)."""

    def __init__(self, ms: tuple[float, float]) -> None:
        super().__init__()
        self.ms = ms
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import os

        time.sleep(self.ms[int(os.environ.get("RANK", "0"))] / 1000)
        return torch.tanh(self.fc(x))


# per-rank stage times (ms): alone, rank 0 would split 1|3 and rank 1 3|1; their average (25, 6, 6, 25) splits 2|2
SLOW_MS = ((40.0, 10.0), (6.0, 6.0), (6.0, 6.0), (10.0, 40.0))


def _measured_job(comm: PipelineComm, out: str) -> None:
    torch.manual_seed(0)
    slow = nn.Sequential(*[Slow(ms) for ms in SLOW_MS], nn.Linear(4, 2))
    slow[-1].pipeprop_starts_stage = False
    stages = pipeprop.partition(slow, "layer").stages
    alone = measure_stage_times(stages, torch.randn(2, 4), repeats=3)
    ranges = assign_stages(stages, comm.world_size, "measured", torch.randn(2, 4), comm=comm)
    # a run with the measured assignment equals the simulator (as every assignment does)
    engine = build_pipeline(make_model("mlp"), F.cross_entropy, comm=comm, method="pb+sc+lwp", lr=LR,
                            momentum=MOMENTUM, weight_decay=WD, assignment="measured",
                            sample_input=make_batches("mlp")[0][0])
    stats = engine.run(make_batches("mlp"), MICROBATCHES)
    torch.save({"alone": alone, "ranges": [[r.start, r.stop] for r in ranges], "losses": stats.losses,
                "params": {slot.index: [p.detach().clone() for p in slot.params] for slot in engine.slots}},
               Path(out, f"rank{comm.rank}.pt"))


@pytest.mark.slow
def test_measured_assignment_is_agreed_by_all_ranks_and_run_equals_simulator(tmp_path: Path) -> None:
    codes = run_procs(_measured_job, 2, tmp_path, timeout=60.0)
    errors = {r: read_error(tmp_path, r)[1] for r in range(2) if Path(tmp_path, f"err{r}.txt").exists()}
    assert codes == [0, 0], f"ranks failed: {codes} {errors}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    alone = [assign_stages_from(r["alone"]) for r in ranks]
    assert alone == [[range(0, 1), range(1, 4)], [range(0, 3), range(3, 4)]], "each rank's own timing differs"
    assert ranks[0]["ranges"] == ranks[1]["ranges"] == [[0, 2], [2, 4]], "one assignment, the average's"
    ref_params, ref_losses = simulator_reference("mlp", "pb+sc+lwp")
    for res in ranks:
        for s, params in res["params"].items():
            for got, want in zip(params, ref_params[s], strict=True):
                assert torch.equal(got, want), f"stage {s} differs from the simulator"
    torch.testing.assert_close(torch.tensor(ranks[1]["losses"]), torch.tensor(ref_losses), rtol=1e-12, atol=0)


def assign_stages_from(costs: list[float]) -> list[range]:
    from pipeprop.distributed import balance_stages

    return balance_stages(costs, 2)
