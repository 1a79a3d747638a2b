"""The loop of one rank of a real asynchronous Pipelined Backpropagation pipeline: messages, data, checkpoints.

The rank owns the contiguous stages ``first..last`` of an ``S``-stage pipeline, each a
:class:`~pipeprop.distributed.stage.PipelineStage` (forward/backward of one micro-batch with the weight
handling). Which micro-batch each stage runs in pipeline step ``t`` comes from :mod:`pipeprop.schedule`
(``forward_microbatch``/``backward_microbatch``/``num_steps``, the one place of the convention): every
local stage runs one forward, then one backward, then the rank updates its stages at once. There is no
flush: only the first fill and the final drain. Since each stage runs exactly the forward/backward/update
sequence of the schedule, the run equals :class:`pipeprop.PipelineSimulator`.

Activations go to the next rank and errors to the previous one through :mod:`.comm` (async isend/irecv,
bounded queues, timeouts). Checkpoints are taken between steps: in-flight micro-batches are saved as
their stage input plus the forward weights, buffers and RNG state they saw, and their graphs are
recomputed on resume, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from ..optim.base import PipelineOptimizer
from ..schedule import backward_microbatch, forward_microbatch, num_steps, stage_delay
from ..simulator import WEIGHT_MODES, read_pending
from .comm import Inbox, Outbox, Payload, PipelineComm
from .stage import PipelineStage, as_input, detached, to_device

__all__ = ["DistributedPipeline", "RunStats", "TIME_KEYS"]

#: where a rank's time goes (:attr:`RunStats.times`): stage forwards (with the loss), backwards, the
#: optimizer step, posting/awaiting sends, waiting for a neighbour's message
TIME_KEYS = ("forward", "backward", "update", "send", "recv")
COMPUTE_KEYS = ("forward", "backward", "update")

LossFn = Callable[[Any, Any], Tensor]


@dataclass
class RunStats:
    """What one rank did in :meth:`DistributedPipeline.run` (times in seconds)."""

    rank: int
    stages: tuple[int, int]
    steps: int
    microbatches: int
    wall: float
    compute: float
    wait: float
    losses: list[float] = field(default_factory=list)
    completed: bool = True
    times: dict[str, float] = field(default_factory=dict)

    @property
    def busy_fraction(self) -> float:
        """Compute time over wall time of the stepping loop."""
        return self.compute / self.wall if self.wall > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "stages": list(self.stages),
            "steps": self.steps,
            "microbatches": self.microbatches,
            "wall": self.wall,
            "compute": self.compute,
            "wait": self.wait,
            "busy_fraction": self.busy_fraction,
            "completed": self.completed,
            "times": dict(self.times),
        }

    def breakdown(self) -> dict[str, float]:
        """Fractions of the wall time per :data:`TIME_KEYS` entry, plus ``"other"`` (the loop's own Python
        bookkeeping, data reading, checkpoints and callbacks)."""
        if self.wall <= 0:
            return {}
        out = {k: self.times.get(k, 0.0) / self.wall for k in TIME_KEYS}
        out["other"] = max(0.0, 1.0 - sum(out.values()))
        return out


class DistributedPipeline:
    """This rank's stages of an asynchronous PB pipeline (see the module docstring).

    Args:
        stages: this rank's stages, in order (global indices ``first_stage, first_stage + 1, ...``).
        first_stage: global index of ``stages[0]``.
        num_stages: ``S``, the number of stages of the whole pipeline.
        optimizer: a :class:`~pipeprop.optim.PipelineOptimizer` with one group per local stage whose
            ``"delay"`` is the stage's schedule delay ``2(S-1-s)``.
        loss_fn: ``loss_fn(output, target)``; used by the rank holding the last stage.
        comm: the rank's :class:`~pipeprop.distributed.comm.PipelineComm`. Ranks hold consecutive stage
            ranges in rank order (rank ``r-1`` feeds rank ``r``).
        weight_mode: ``"pb"`` (backward through live weights) or ``"stash"`` (weight stashing).
        device: where this rank computes (default: the stages' device).
        queue_capacity: messages that may be in flight per outgoing channel before the sender waits.
        keep_forward_state: keep every in-flight forward's weights, buffers and RNG state (needed to take
            checkpoints; set automatically when :meth:`run` takes checkpoints).
        check_finite: raise :class:`~pipeprop.DivergenceError` on a NaN/inf loss.
        startup_timeout: how long :meth:`run` waits for all ranks to start (default: the process group's
            timeout); afterwards every single wait is bounded by ``comm.timeout``.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        first_stage: int,
        num_stages: int,
        optimizer: PipelineOptimizer,
        loss_fn: LossFn,
        *,
        comm: PipelineComm,
        weight_mode: str = "pb",
        device: torch.device | str | None = None,
        queue_capacity: int = 2,
        keep_forward_state: bool = False,
        check_finite: bool = True,
        startup_timeout: Optional[float] = None,
    ) -> None:
        if weight_mode not in WEIGHT_MODES:
            raise ValueError(f"unknown weight_mode {weight_mode!r}; choose one of {WEIGHT_MODES}")
        if not isinstance(optimizer, PipelineOptimizer):
            raise TypeError("optimizer must be a pipeprop PipelineOptimizer (one parameter group per local stage)")
        stages = list(stages)
        if not stages:
            raise ValueError(f"rank {comm.rank} holds no stage: use at most as many ranks as stages")
        if len(optimizer.param_groups) != len(stages):
            raise ValueError(
                f"optimizer has {len(optimizer.param_groups)} groups for {len(stages)} local stages; build it with "
                "pipeprop.stage_param_groups(local_stages)"
            )
        self.first = int(first_stage)
        self.last = self.first + len(stages) - 1
        self.num_stages = int(num_stages)
        if not 0 <= self.first <= self.last < self.num_stages:
            raise ValueError(f"local stages {self.first}..{self.last} outside 0..{self.num_stages - 1}")
        if self.first > 0 and comm.rank == 0:
            raise ValueError("rank 0 must hold stage 0 (ranks hold consecutive stage ranges in rank order)")
        if self.last < self.num_stages - 1 and comm.rank == comm.world_size - 1:
            raise ValueError("the last rank must hold the last stage (ranks hold consecutive stage ranges in rank order)")
        if device is None:
            p = next((p for st in stages for p in st.parameters()), None)
            device = p.device if p is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.slots: list[PipelineStage] = []
        for k, (stage, group) in enumerate(zip(stages, optimizer.param_groups)):
            s = self.first + k
            if {id(p) for p in stage.parameters()} != {id(p) for p in group["params"]}:
                raise ValueError(f"optimizer group {k} does not hold exactly the parameters of stage {s}")
            want = stage_delay(s, self.num_stages)
            if optimizer.stage_delay(group) != want:
                raise ValueError(
                    f"stage {s} has delay {optimizer.stage_delay(group)} but the asynchronous pipeline realizes "
                    f"2(S-1-s) = {want}; the distributed engine runs pipelined methods without delay_offset "
                    "(use the simulator for other delays)"
                )
            self.slots.append(PipelineStage(s, stage, k, optimizer, weight_mode=weight_mode, device=self.device))
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.comm = comm
        self.weight_mode = weight_mode
        self.queue_capacity = queue_capacity
        self.keep_forward_state = keep_forward_state
        self.check_finite = check_finite
        self.startup_timeout = startup_timeout
        # progress (all part of a checkpoint)
        self.step = 0
        self.num_microbatches: Optional[int] = None
        self.losses: list[float] = []
        self._pending: list[Tensor] = []  # losses not yet read to the host (micro-batches len(losses), ...)
        self.consumed = 0  # micro-batches read from the data iterator
        self._acts: dict[tuple[int, int], Payload] = {}  # (stage, n) -> input of a local stage
        self._errs: dict[tuple[int, int], Payload] = {}  # (stage, n) -> error of a local stage's output
        self._pre_act: dict[int, Payload] = {}  # messages received ahead (at a checkpoint)
        self._pre_err: dict[int, Payload] = {}
        self._targets: dict[int, Any] = {}
        self._times = dict.fromkeys(TIME_KEYS, 0.0)

    @property
    def keep_forward_state(self) -> bool:
        return all(st.keep_forward_state for st in self.slots)

    @keep_forward_state.setter
    def keep_forward_state(self, value: bool) -> None:
        for st in self.slots:
            st.keep_forward_state = bool(value)

    # ------------------------------------------------------------------ topology
    @property
    def has_left(self) -> bool:
        return self.first > 0

    @property
    def has_right(self) -> bool:
        return self.last < self.num_stages - 1

    @property
    def reads_inputs(self) -> bool:
        return self.first == 0

    @property
    def reads_targets(self) -> bool:
        return self.last == self.num_stages - 1

    def total_steps(self, num_microbatches: int) -> int:
        return num_steps(num_microbatches, self.num_stages)

    def _fwd_mb(self, t: int, s: int) -> int:
        return forward_microbatch(t, s, self.num_stages)

    def _bwd_mb(self, t: int, s: int) -> int:
        return backward_microbatch(t, s, self.num_stages)

    # ------------------------------------------------------------------ data
    def _next_batch(self, it: Iterator[Any], n: int) -> tuple[Any, Any]:
        if self.consumed != n:
            raise RuntimeError(f"rank {self.comm.rank}: data out of order (wanted micro-batch {n}, read {self.consumed})")
        try:
            x, y = next(it)
        except StopIteration:
            raise ValueError(
                f"the data ran out after {n} micro-batches but {self.num_microbatches} were asked for; give more "
                "data (epochs) or fewer samples"
            ) from None
        self.consumed += 1
        return x, y

    def _input(self, it: Iterator[Any], n: int) -> Payload:
        x, y = self._next_batch(it, n)
        if self.reads_targets:
            self._targets[n] = to_device(y, self.device)
        return to_device(x, self.device)

    def _target(self, it: Iterator[Any], n: int) -> Any:
        if n in self._targets:
            return self._targets.pop(n)
        _, y = self._next_batch(it, n)
        return to_device(y, self.device)

    # ------------------------------------------------------------------ one pipeline step
    def _step(self, t: int, it: Iterator[Any], inbox_act: Optional[Inbox], inbox_err: Optional[Inbox],
              out_act: Optional[Outbox], out_err: Optional[Outbox]) -> None:
        S, M = self.num_stages, self.num_microbatches
        assert M is not None
        tm = self._times
        clock = time.perf_counter
        # forwards, last local stage first: inputs from local stages are ready, the neighbour's comes last
        for slot in reversed(self.slots):
            s, n = slot.index, self._fwd_mb(t, slot.index)
            if not 0 <= n < M:
                continue
            t0 = clock()
            if s == 0:
                inputs = self._input(it, n)
            elif s == self.first:
                raw = self._pre_act.pop(n) if n in self._pre_act else inbox_act.get(f"of micro-batch {n} (step {t})")
                t1 = clock()
                tm["recv"] += t1 - t0
                t0 = t1
                inputs = as_input(raw, self.device)
            else:
                inputs = self._acts.pop((s, n))
            output = slot.forward(n, inputs)
            if s == S - 1:
                target = self._target(it, n)
                loss = self.loss_fn(output, target)
                slot.set_loss(n, loss)
                self._pending.append(loss.detach())  # read to the host in blocks (_read_losses)
            elif s == self.last:
                assert out_act is not None
                t1 = clock()
                tm["forward"] += t1 - t0
                out_act.put(detached(output), f"of micro-batch {n} (step {t})")
                tm["send"] += clock() - t1
                continue
            else:
                self._acts[(s + 1, n)] = as_input(output, self.device)
            tm["forward"] += clock() - t0
        # backwards, first local stage first: the neighbour's error is needed last
        for slot in self.slots:
            s, n = slot.index, self._bwd_mb(t, slot.index)
            if not 0 <= n < M:
                continue
            t0 = clock()
            if s == S - 1:
                error = None
            elif s == self.last:
                error = self._pre_err.pop(n) if n in self._pre_err else inbox_err.get(f"of micro-batch {n} (step {t})")
                t1 = clock()
                tm["recv"] += t1 - t0
                t0 = t1
            else:
                error = self._errs.pop((s, n))
            grad_in = slot.backward(n, error)
            if s == 0:
                pass
            elif s == self.first:
                assert out_err is not None
                t1 = clock()
                tm["backward"] += t1 - t0
                out_err.put(grad_in, f"of micro-batch {n} (step {t})")
                tm["send"] += clock() - t1
                continue
            else:
                self._errs[(s - 1, n)] = grad_in
            tm["backward"] += clock() - t0
        t0 = clock()
        self.optimizer.engine_step()
        for slot in self.slots:
            for p in slot.params:
                p.grad = None
        tm["update"] += clock() - t0

    def _receives(self, start: int, stop: int) -> tuple[int, int]:
        """Messages (activations, errors) this rank takes from its neighbours in steps ``start..stop-1``."""
        M = self.num_microbatches or 0
        acts = sum(1 for t in range(start, stop) if self.has_left and 0 <= self._fwd_mb(t, self.first) < M)
        errs = sum(1 for t in range(start, stop) if self.has_right and 0 <= self._bwd_mb(t, self.last) < M)
        return acts - len(self._pre_act), errs - len(self._pre_err)

    def _prefetch(self, inbox_act: Optional[Inbox], inbox_err: Optional[Inbox]) -> None:
        """At a step boundary: take the messages the neighbours already sent for the next step."""
        t, M = self.step, self.num_microbatches or 0
        n = self._fwd_mb(t, self.first)
        if self.has_left and 0 <= n < M and n not in self._pre_act:
            self._pre_act[n] = inbox_act.get(f"of micro-batch {n} (step {t}, at a checkpoint)")
        n = self._bwd_mb(t, self.last)
        if self.has_right and 0 <= n < M and n not in self._pre_err:
            self._pre_err[n] = inbox_err.get(f"of micro-batch {n} (step {t}, at a checkpoint)")

    def _read_losses(self) -> None:
        read_pending(self._pending, self.losses, check_finite=self.check_finite)

    # ------------------------------------------------------------------ the run
    def run(
        self,
        batches: Optional[Iterable[tuple[Any, Any]]],
        num_microbatches: Optional[int] = None,
        *,
        stop_after_step: Optional[int] = None,
        checkpoint_every: Optional[int] = None,
        checkpoint_fn: Optional[Callable[[dict[str, Any]], None]] = None,
        on_step: Optional[Callable[[int], None]] = None,
        progress: bool = False,
        read_every: int = 256,
    ) -> RunStats:
        """Push ``num_microbatches`` micro-batches through the pipeline (or continue a resumed run).

        Args:
            batches: ``(x, y)`` pairs in micro-batch order from where this rank stands (``consumed``); the
                first rank uses ``x``, the last rank ``y``; other ranks may pass ``None``.
            num_microbatches: ``M``; fixed by the first call (a resumed run keeps its own).
            stop_after_step: stop after this pipeline step (an interruption); a checkpoint is taken there.
            checkpoint_every: call ``checkpoint_fn(self.state_dict())`` every this many steps.
            on_step: called with the step index after every step (metrics, schedules, fault injection).
            progress: show a progress bar (on this rank).
            read_every: read the losses to the host (and check them) every this many steps, before each
                checkpoint and at the end; in between the loop never waits for the device. A divergence is
                reported at its micro-batch, up to ``read_every`` steps after it happened.
        """
        if self.num_microbatches is None:
            if num_microbatches is None or num_microbatches < 0:
                raise ValueError("give num_microbatches (>= 0) for the first run")
            self.num_microbatches = int(num_microbatches)
        elif num_microbatches is not None and int(num_microbatches) != self.num_microbatches:
            raise ValueError(f"this pipeline runs {self.num_microbatches} micro-batches (from its checkpoint), not {num_microbatches}")
        if read_every < 1:
            raise ValueError(f"read_every must be >= 1, got {read_every}")
        if checkpoint_every is not None and checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        if checkpoint_every is not None or stop_after_step is not None:
            self.keep_forward_state = True
        if (self.reads_inputs or self.reads_targets) and batches is None and self.num_microbatches > 0:
            raise ValueError(f"rank {self.comm.rank} holds the first or last stage and needs the data: pass batches")
        total = self.total_steps(self.num_microbatches)
        start = self.step
        stop = total if stop_after_step is None else max(start, min(total, stop_after_step + 1))
        final_ckpt = stop < total
        n_act, n_err = self._receives(start, stop + (1 if final_ckpt else 0))
        comm, r = self.comm, self.comm.rank
        inbox_act = Inbox(comm, r - 1, comm.act_group, expected=n_act, what="activations") if self.has_left else None
        inbox_err = Inbox(comm, r + 1, comm.err_group, expected=n_err, what="errors") if self.has_right else None
        out_act = Outbox(comm, r + 1, comm.act_group, capacity=self.queue_capacity, what="activations") if self.has_right else None
        out_err = Outbox(comm, r - 1, comm.err_group, capacity=self.queue_capacity, what="errors") if self.has_left else None
        it = iter(batches) if batches is not None else iter(())
        comm.barrier(self.startup_timeout)  # every rank has built its stages: from here on waits are per message
        bar = _progress_bar(stop - start, progress, f"rank {r}")
        self._times = dict.fromkeys(TIME_KEYS, 0.0)
        t_start = time.perf_counter()
        for t in range(start, stop):
            self._step(t, it, inbox_act, inbox_err, out_act, out_err)
            self.step = t + 1
            if on_step is not None:
                on_step(t)
            boundary = self.step
            checkpoint = boundary < total and (
                (checkpoint_every is not None and boundary % checkpoint_every == 0) or (final_ckpt and boundary == stop)
            )
            if checkpoint or boundary % read_every == 0 or boundary == stop:
                self._read_losses()
                if bar is not None and self.losses:
                    bar.set_postfix(loss=f"{self.losses[-1]:.4f}", refresh=False)
            if checkpoint:
                self._prefetch(inbox_act, inbox_err)
                for box in (out_act, out_err):
                    if box is not None:
                        box.flush()
                if checkpoint_fn is not None:
                    checkpoint_fn(self.state_dict())
            if bar is not None:
                bar.update(1)
        for box in (out_act, out_err):
            if box is not None:
                box.flush()
        wall = time.perf_counter() - t_start
        if bar is not None:
            bar.close()
        waits = sum(b.wait_seconds for b in (inbox_act, inbox_err, out_act, out_err) if b is not None)
        return RunStats(
            rank=r,
            stages=(self.first, self.last),
            steps=stop - start,
            microbatches=self.num_microbatches,
            wall=wall,
            compute=sum(self._times[k] for k in COMPUTE_KEYS),
            wait=waits,
            losses=list(self.losses),
            completed=self.step >= total,
            times=dict(self._times),
        )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything this rank needs to continue exactly (call between steps, e.g. from ``checkpoint_fn``)."""
        self._read_losses()
        inflight = [slot.inflight_state() for slot in self.slots]
        return {
            "format": 1,
            "stages": (self.first, self.last, self.num_stages),
            "weight_mode": self.weight_mode,
            "step": self.step,
            "num_microbatches": self.num_microbatches,
            "losses": list(self.losses),
            "consumed": self.consumed,
            "modules": [slot.module.state_dict() for slot in self.slots],
            "optimizer": self.optimizer.state_dict(),
            "inflight": inflight,
            "acts": {k: detached(v) for k, v in self._acts.items()},
            "errs": {k: detached(v) for k, v in self._errs.items()},
            "pre_act": dict(self._pre_act),
            "pre_err": dict(self._pre_err),
            "targets": dict(self._targets),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (same stages, method and world size) and rebuild in-flight graphs."""
        if state.get("format") != 1:
            raise ValueError("not a pipeprop distributed checkpoint (unknown format)")
        mine = (self.first, self.last, self.num_stages)
        if tuple(state["stages"]) != mine:
            raise ValueError(
                f"checkpoint holds stages {state['stages'][0]}..{state['stages'][1]} of {state['stages'][2]}, this rank "
                f"{mine[0]}..{mine[1]} of {mine[2]}: resume with the same model, partition and number of processes"
            )
        if state["weight_mode"] != self.weight_mode:
            raise ValueError(f"checkpoint was written with weight_mode {state['weight_mode']!r}, not {self.weight_mode!r}")
        for slot, recs in zip(self.slots, state["inflight"]):
            slot.load_inflight_state(recs)
        for slot, sd in zip(self.slots, state["modules"]):
            slot.module.load_state_dict(sd)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.num_microbatches = state["num_microbatches"]
        self.losses = list(state["losses"])
        self._pending = []
        self.consumed = int(state["consumed"])
        self._acts = {k: as_input(v, self.device) for k, v in state["acts"].items()}
        self._errs = {k: to_device(v, self.device) for k, v in state["errs"].items()}
        self._pre_act = dict(state["pre_act"])
        self._pre_err = dict(state["pre_err"])
        self._targets = {k: to_device(v, self.device) for k, v in state["targets"].items()}


def _progress_bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the cli extra
        return None
    return tqdm(total=total, desc=desc, unit="step", leave=False)
