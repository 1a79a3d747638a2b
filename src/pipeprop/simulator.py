"""The exact sequential equivalent of a fine-grained asynchronous PB pipeline.

Under the convention of :mod:`pipeprop.schedule`, micro-batch ``n``'s forward at stage ``s`` sees weight
version ``max(0, n - D_s)`` and its backward, at every stage, sees version ``n`` (the live weights).
So one :meth:`PipelineSimulator.step` per micro-batch reproduces the pipeline bit for bit:

1. forward through every stage with that stage's *forward weights* of version ``max(0, n - D_s)``
   (plain weights for PB, predicted weights for LWP), kept in a ring buffer of ``D_s + 1`` versions;
2. backward with the weights saved by that forward replaced by the live weights (``weight_mode="pb"``,
   weight inconsistency as on PB hardware) or kept (``weight_mode="stash"``, PipeDream's weight
   stashing); weight gradients come from the stashed activations;
3. every stage updates (its optimizer group knows its delay), and the forward weights of the new
   version are pushed into the ring buffers.

Every micro-batch's update has been applied when :meth:`step` returns, so a run that ends is drained.
With all delays 0 this is plain SGD.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .graph_capture import GraphStage, loss_from_output, model_inputs
from .optim.base import PipelineOptimizer, group_params
from .precision import LossScaler, autocast, cast_input, check_precision
from .weight_swap import DerivedWeightTracker, SavedWeightRebinder, check_ctx_weights, swapped_weights

__all__ = ["PipelineSimulator", "DivergenceError", "WEIGHT_MODES"]

WEIGHT_MODES = ("pb", "stash")

LossFn = Callable[[Any, Any], Tensor]


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int, loss: float, run: Optional[int] = None) -> None:
        self.step, self.loss, self.run = step, loss, run
        where = "" if run is None else f"run {run}: "
        super().__init__(
            f"{where}loss is {loss} at step {step} (micro-batch {step}): training diverged. Lower the learning rate, "
            "use a mitigation (e.g. method='pb+sc+lwp'), or check the inputs for NaN/inf."
        )


class _WeightRing:
    """The forward weights of the last ``delay + 1`` versions of one stage.

    Two storage modes. *Copy*: preallocated slots that the optimizer writes the forward weights into.
    *Reference* (for the live weights of a stage whose forward uses them, when the optimizer can update out of
    place, :attr:`PipelineOptimizer.keep_previous_weights`): a slot holds the live weights of that version,
    which later updates no longer touch, so pushing a version copies nothing; the update writes the new
    weights into the slot that is about to be overwritten (:attr:`PipelineOptimizer.spare_weights`).
    """

    def __init__(self, params: Sequence[Tensor], delay: int, by_reference: bool) -> None:
        self.delay = delay
        self.by_reference = by_reference
        self.slots: list[list[Tensor]] = [
            [] if by_reference else [torch.empty_like(p, memory_format=torch.preserve_format) for p in params]
            for _ in range(delay + 1)
        ]

    def slot(self, version: int) -> list[Tensor]:
        return self.slots[version % (self.delay + 1)]

    def push(self, version: int, optimizer: PipelineOptimizer, group: dict[str, Any]) -> None:
        if self.by_reference:  # a ring of live weights (forward_weights(group) would return the parameters)
            params = group["params"]
            prev = self.slots[(version - 1) % (self.delay + 1)] if version > 0 else []
            for p, q in zip(params, prev):
                if p.data_ptr() == q.data_ptr():
                    # not updated by the last step (no gradient, a skipped fp16 step): the live weight moves to a
                    # copy, so that no two slots share storage (the update that retires a slot writes into it)
                    p.data = p.data.clone()
            self.slots[version % (self.delay + 1)] = [p.detach() for p in params]
        else:
            optimizer.forward_weights(group, out=self.slot(version))

    def num_bytes(self, live: Sequence[Tensor]) -> int:
        """Bytes held beyond the live weights."""
        live_ptrs = {p.untyped_storage().data_ptr() for p in live}
        return sum(
            t.numel() * t.element_size()
            for slot in self.slots
            for t in slot
            if t.untyped_storage().data_ptr() not in live_ptrs
        )


def _check_finite(loss: Tensor, step: int) -> None:
    """Raise :class:`DivergenceError` if the loss (a scalar, or one entry per run) is NaN or infinite."""
    if loss.dim() == 0:
        value = float(loss)
        if not math.isfinite(value):
            raise DivergenceError(step, value)
        return
    bad = (~torch.isfinite(loss)).nonzero()
    if bad.numel():
        run = int(bad[0, 0])
        raise DivergenceError(step, float(loss.reshape(-1)[run]), run=run)


def read_pending(pending: list[Tensor], values: list, *, check_finite: bool = False) -> None:
    """Move the scalar tensors of ``pending`` (one per micro-batch, ``len(values), ...``) to ``values`` in one host
    read and empty ``pending`` (the engines that read losses and counts in blocks: distributed, tick). With
    ``check_finite`` (losses) raise :class:`DivergenceError` at the first NaN/inf one, keeping only those
    before it."""
    if not pending:
        return
    read = torch.stack(pending).tolist()
    pending.clear()
    for value in read:
        if check_finite and not math.isfinite(value):
            raise DivergenceError(len(values), value)
        values.append(value)


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)} ({x.dtype})"
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(_describe(e) for e in x) + ")"
    return type(x).__name__


def _stage_reads(stages: Sequence[nn.Module], optimizer: PipelineOptimizer) -> list[list[tuple[Tensor, int, int]]]:
    """Per stage, ``(parameter, owning group, index in that group)`` for every parameter the stage reads.

    Each parameter is owned (updated) by exactly one optimizer group; a stage may read parameters owned by
    another stage (tied weights).
    """
    owner: dict[int, tuple[int, int]] = {}
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            owner[id(p)] = (g, i)
    reads = []
    for s, stage in enumerate(stages):
        stage_params = list(stage.parameters())
        ids = {id(p) for p in stage_params}
        stray = [p for p in optimizer.param_groups[s]["params"] if id(p) not in ids]
        if stray:
            raise ValueError(f"optimizer parameter group {s} holds parameters that stage {s} does not read")
        missing = [p for p in stage_params if id(p) not in owner]
        if missing:
            raise ValueError(
                f"stage {s} reads a parameter that no optimizer group holds; build the groups with "
                "pipeprop.stage_param_groups(stages)"
            )
        reads.append([(p, *owner[id(p)]) for p in stage_params])
    return reads


class PipelineSimulator:
    """Trains pipeline stages with asynchronous PB semantics, one micro-batch per :meth:`step`.

    Args:
        stages: the stages in pipeline order (e.g. a :class:`~pipeprop.partition.Partition`); the output
            of stage ``s`` is the input of stage ``s + 1``.
        optimizer: a :class:`~pipeprop.optim.PipelineOptimizer` whose ``param_groups[s]`` holds exactly the
            parameters of stage ``s`` and its delay ``"delay"``.
        loss_fn: ``loss_fn(output, target) -> scalar tensor``; ``None`` for a model that computes its own loss
            (partitioned with ``example_target``): the target is passed to the model, which returns the loss.
        weight_mode: ``"pb"`` (backward through live weights) or ``"stash"`` (weight stashing).
        check_finite: raise :class:`DivergenceError` on a NaN/inf loss.
        precision: ``"32"``, ``"64"``, ``"bf16-mixed"`` or ``"16-mixed"`` (:mod:`pipeprop.precision`).
        compile: run each stage through ``torch.compile`` (``True``, or a backend name such as
            ``"aot_eager"``). The first step runs eagerly to find stages whose backward needs weight-derived
            tensors replayed (e.g. under autocast); those stay eager, since a compiled graph hides them.
        cuda_graphs: replay every stage's forward and backward as CUDA graphs
            (``torch.cuda.make_graphed_callables``, captured after the first step), which removes the kernel-launch
            cost that dominates batch size one on a GPU. A graph reads its weights at fixed addresses, so each
            parameter keeps one storage (*static weights*): before the forward the stage's forward weights are
            copied into it, after the forward the live weights are copied back for the backward (three
            multi-tensor copies per step instead of the saved-tensor hooks). Needs CUDA, ``weight_mode="pb"``,
            precision ``"32"``/``"64"``, no ``compile``, no weights read by two stages, no weight-derived saved
            tensors, single-tensor stage inputs and micro-batches of one shape. **Untested on a GPU so far**;
            the static-weight mechanism itself is tested on the CPU against the reference path.

    A parameter read by several stages (tied weights) is updated once per step by the optimizer group that
    holds it; every stage reading it sees, in its forward, the version for its own delay (its own
    prediction under LWP), and every backward sees the live parameter.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        optimizer: PipelineOptimizer,
        loss_fn: Optional[LossFn],
        *,
        weight_mode: str = "pb",
        check_finite: bool = True,
        precision: str = "32",
        compile: Union[bool, str] = False,
        cuda_graphs: bool = False,
        _static_weights: bool = False,
    ) -> None:
        if weight_mode not in WEIGHT_MODES:
            raise ValueError(f"unknown weight_mode {weight_mode!r}; choose one of {WEIGHT_MODES}")
        if not isinstance(optimizer, PipelineOptimizer):
            raise TypeError("optimizer must be a pipeprop PipelineOptimizer (one parameter group per stage)")
        self.stages = list(stages)
        if len(optimizer.param_groups) != len(self.stages):
            raise ValueError(
                f"optimizer has {len(optimizer.param_groups)} parameter groups but there are {len(self.stages)} "
                "stages; build it with pipeprop.stage_param_groups(stages)"
            )
        self.optimizer = optimizer
        self._target_keyword: Optional[str] = None
        if loss_fn is None:
            graph_stage = next((m for m in self.stages[0].modules() if isinstance(m, GraphStage)), None) if self.stages else None
            if graph_stage is None or not graph_stage.takes_target:
                raise ValueError(
                    "loss_fn=None trains on the loss the model returns, so the model must be partitioned with its "
                    "target: pipeprop.partition(model, example_input=x, example_target=y) (pipeprop.train does this)"
                )
            self._target_keyword = graph_stage.target_keyword
        self._model_computes_loss = loss_fn is None
        self.loss_fn = loss_from_output if loss_fn is None else loss_fn
        self.weight_mode = weight_mode
        self.check_finite = check_finite
        self.precision = check_precision(precision)
        self.step_count = 0
        self._overrides_backward = type(optimizer).backward_weights is not PipelineOptimizer.backward_weights
        self._all_params = [p for group in optimizer.param_groups for p in group["params"]]
        self._reads = _stage_reads(self.stages, optimizer)
        self._param_names = {
            id(p): f"stage {s} {name}" for s, st in enumerate(self.stages) for name, p in st.named_parameters()
        }
        self._rings: list[Optional[_WeightRing]] = []
        self.cuda_graphs = bool(cuda_graphs)
        #: static weights: every parameter keeps its storage, forward/backward weights are copied into it
        self._static = self.cuda_graphs or _static_weights  # (_static_weights: the mechanism without graphs, for tests)
        self._static_ready = False
        if self._static:
            self._check_static_weights(compile)
        can_keep = optimizer.supports_keeping_previous_weights and not self._static
        for group in optimizer.param_groups:
            needs_ring = group_params(group) and (
                optimizer.stage_delay(group) > 0 or not optimizer.forward_uses_live_weights(group)
            )
            # a ring of past live weights holds them by reference; one of predictions is written in place
            by_reference = can_keep and optimizer.forward_uses_live_weights(group)
            ring = _WeightRing(group_params(group), optimizer.stage_delay(group), by_reference) if needs_ring else None
            self._rings.append(ring)
        # shared weights: a stage reading a parameter owned by another stage keeps that parameter's versions
        # (or predictions) for its own delay in a reader ring; (owner, parameters, delay, ring) per owner
        self._readers: list[list[tuple[int, list[Tensor], int, Optional[_WeightRing]]]] = []
        for s, reads in enumerate(self._reads):
            mine = []
            delay = optimizer.stage_delay(optimizer.param_groups[s])
            for owner in sorted({o for _, o, _ in reads if o != s}):
                foreign = [p for p, o, _ in reads if o == owner]
                group = self._reader_group(owner, foreign, delay)
                live = optimizer.forward_uses_live_weights(group)
                ring = _WeightRing(foreign, delay, can_keep and live) if delay > 0 or not live else None
                mine.append((owner, foreign, delay, ring))
            self._readers.append(mine)
        #: parameters whose past versions a reader ring may hold: never updated in place or into spare storage
        self._read_elsewhere = {id(p) for mine in self._readers for _, foreign, _, ring in mine if ring is not None for p in foreign}
        self._keeps_previous = any(r is not None and r.by_reference for r in self._rings) or any(
            r is not None and r.by_reference for mine in self._readers for _, _, _, r in mine
        )
        if self._keeps_previous or self._static:  # static weights: the update stays in the parameters' storage
            optimizer.keep_previous_weights = self._keeps_previous
        #: stages whose forward weights can differ from the weights their backward must see
        self._rebinds = [
            self._overrides_backward
            or self._rings[s] is not None
            or any(r is not None for _, _, _, r in self._readers[s])
            for s in range(len(self.stages))
        ]
        #: per stage: track weight-derived saved tensors (None: decided by probing the first step)
        self._track: list[Optional[bool]] = [None if r else False for r in self._rebinds]
        self._scaler = LossScaler() if self.precision == "16-mixed" else None
        self._compiled: list[Optional[Callable[[Any], Any]]] = [None] * len(self.stages)
        self._graphed: Optional[list[Callable[[Any], Any]]] = None  # the CUDA-graphed stages, once captured
        self._stage_inputs: Optional[list[Tensor]] = None  # the first step's stage inputs (capture samples)
        self._live_copy: Optional[list[Tensor]] = None  # static weights: the live weights while the forward runs
        if compile:
            backend = "inductor" if compile is True else str(compile)
            self._compiled = [torch.compile(st, backend=backend, dynamic=False) for st in self.stages]
        self._push_forward_weights(0)

    # ------------------------------------------------------------------ weight versions
    def _reader_group(self, owner: int, params: list[Tensor], delay: int) -> dict[str, Any]:
        """The owner's optimizer group as seen by a stage that reads ``params`` with its own ``delay`` (built
        when used, so that learning-rate changes and update counts of the owner's group are current)."""
        return {**self.optimizer.param_groups[owner], "params": params, "delay": delay}

    def _push_forward_weights(self, version: int) -> None:
        predicted = []
        for ring, group in zip(self._rings, self.optimizer.param_groups):
            if ring is None:
                continue
            if ring.by_reference:
                ring.push(version, self.optimizer, group)
            else:
                predicted.append((group, ring.slot(version)))
        for mine in self._readers:
            for owner, params, delay, ring in mine:
                if ring is None:
                    continue
                group = self._reader_group(owner, params, delay)
                if ring.by_reference:
                    ring.push(version, self.optimizer, group)
                else:
                    predicted.append((group, ring.slot(version)))
        if predicted:  # all stages' forward weights (e.g. LWP predictions) in one call
            self.optimizer.forward_weights_into(predicted)

    def _spare_weights(self, version: int) -> dict[Tensor, Tensor]:
        """Storage the update to ``version`` may write into: the tensors of the version that leaves a ring of
        past weights when ``version`` is pushed (no longer used), or the live weights where no ring keeps them.
        Parameters that another stage reads through a reader ring get new tensors."""
        spare: dict[Tensor, Tensor] = {}
        elsewhere = self._read_elsewhere
        for ring, group in zip(self._rings, self.optimizer.param_groups):
            params = group["params"]
            if ring is None or not ring.by_reference:
                spare.update((p, p.data) for p in params if id(p) not in elsewhere)
            elif not elsewhere:
                spare.update(zip(params, ring.slot(version)))
            else:
                spare.update((p, w) for p, w in zip(params, ring.slot(version)) if id(p) not in elsewhere)
        return spare

    def forward_weights_of(self, stage: int, microbatch: int) -> list[Tensor]:
        """The forward weights of the parameters stage ``stage`` owns (its optimizer group) for ``microbatch``."""
        group = self.optimizer.param_groups[stage]
        ring = self._rings[stage]
        if ring is None:
            return group_params(group)
        return ring.slot(max(0, microbatch - ring.delay))

    def _stage_forward_weights(self, stage: int, microbatch: int) -> list[Tensor]:
        """The forward weights of every parameter stage ``stage`` reads, in :func:`_stage_reads` order."""
        own = self.forward_weights_of(stage, microbatch)
        foreign: dict[int, Tensor] = {}
        for _, params, _, ring in self._readers[stage]:
            ws = params if ring is None else ring.slot(max(0, microbatch - ring.delay))
            foreign.update({id(p): w for p, w in zip(params, ws)})
        return [own[i] if o == stage else foreign[id(p)] for p, o, i in self._reads[stage]]

    def weight_version_bytes(self) -> int:
        """Memory held for stale/predicted weight versions (excluding the live weights)."""
        total = sum(
            r.num_bytes(group_params(g)) for r, g in zip(self._rings, self.optimizer.param_groups) if r is not None
        )
        for mine in self._readers:
            total += sum(r.num_bytes(params) for _, params, _, r in mine if r is not None)
        return total

    # ------------------------------------------------------------------ static weights (CUDA graphs)
    def _check_static_weights(self, compile: Union[bool, str]) -> None:
        why = None
        if self.cuda_graphs and not all(p.is_cuda for p in self._all_params):
            why = ("captures each stage's forward and backward as CUDA graphs, so the stages must be on a CUDA device "
                   "(model.cuda()); on the CPU leave cuda_graphs off")
        elif self.cuda_graphs and not torch.cuda.is_available():
            why = "needs CUDA, which this torch build does not have"
        elif self.weight_mode != "pb" or self._overrides_backward:
            why = "supports weight_mode='pb' with the live weights in the backward (not pb+stash or SpecTrain)"
        elif self.precision not in ("32", "64"):
            why = "supports precision '32' and '64' (autocast casts the weights inside the graph)"
        elif compile:
            why = "and compile=True do not combine; choose one"
        elif any(self._reads[s][k][1] != s for s in range(len(self.stages)) for k in range(len(self._reads[s]))):
            why = "does not support weights read by two stages (tied weights)"
        if why is not None:
            raise ValueError(f"cuda_graphs=True {why}")

    def _static_stages(self) -> list[int]:
        return [s for s in range(len(self.stages)) if self._rebinds[s] and group_params(self.optimizer.param_groups[s])]

    def _enter_static_weights(self) -> None:
        """After the first (eager) step: check what it found, capture the graphs."""
        if any(self._track):
            raise ValueError("cuda_graphs=True: a stage saves tensors derived from its weights (e.g. a weight "
                             "standardisation) that the backward would need recomputed on the live weights; leave "
                             "cuda_graphs off for this model")
        if self.cuda_graphs:
            self._capture_graphs()
        self._static_ready = True

    def _capture_graphs(self) -> None:
        """Capture every stage as a CUDA graph on the first step's stage inputs."""
        inputs = self._stage_inputs or []
        if len(inputs) != len(self.stages) or not all(isinstance(t, Tensor) for t in inputs):
            raise ValueError("cuda_graphs=True needs every stage to take one tensor (not a tuple such as a residual "
                             "(h, skip)); leave cuda_graphs off for this model")
        buffers = [b.detach().clone() for st in self.stages for b in st.buffers()]
        samples = tuple((t.detach().clone().requires_grad_(s > 0),) for s, t in enumerate(inputs))
        self._graphed = list(torch.cuda.make_graphed_callables(tuple(self.stages), samples))
        for b, saved in zip((b for st in self.stages for b in st.buffers()), buffers):  # undo the warm-up's updates
            b.copy_(saved)
        for p in self._all_params:
            p.grad = None
        self._graph_shapes = [tuple(t.shape) for t in inputs]

    def _static_step_forward(self, x: Any, n: int) -> Any:
        """The forward with static weights: forward weights copied into the parameters, live ones set aside."""
        stages = self._static_stages()
        handles = [p.data for s in stages for p in group_params(self.optimizer.param_groups[s])]
        fwd = [w for s in stages for w in self.forward_weights_of(s, n)]
        if self._live_copy is None:
            self._live_copy = [torch.empty_like(h) for h in handles]
        with torch.no_grad():
            if handles:
                torch._foreach_copy_(self._live_copy, handles)
                torch._foreach_copy_(handles, fwd)
        out = x
        runners = self._graphed if self._graphed is not None else self.stages
        for s, stage in enumerate(runners):
            if self._graphed is not None and tuple(out.shape) != self._graph_shapes[s]:
                raise ValueError(f"cuda_graphs=True: stage {s} was captured for inputs of shape {self._graph_shapes[s]} "
                                 f"but gets {tuple(out.shape)}; use micro-batches of one shape (drop the last, "
                                 "smaller one)")
            out = stage(out)
        with torch.no_grad():  # the backward sees the live weights (through .data: autograd's version check is not
            if handles:        # involved, the saved tensors of the forward now read the live values)
                torch._foreach_copy_(handles, self._live_copy)
        return out

    # ------------------------------------------------------------------ one micro-batch
    def forward(self, x: Any, stage_context: Optional[Callable[[int, Any], Any]] = None) -> Any:
        """Run every stage; ``stage_context(s, input)``, when given, is entered around stage ``s``."""
        out = x
        for s, stage in enumerate(self.stages):
            if self._compiled[s] is not None and self._track[s] is False:
                stage = self._compiled[s]
            try:
                if stage_context is None:
                    out = stage(out)
                else:
                    with stage_context(s, out):
                        out = stage(out)
            except (RuntimeError, TypeError, ValueError) as err:
                names = " > ".join(getattr(stage, "names", [type(stage).__name__]))
                raise type(err)(
                    f"stage {s} ({names}) failed on input {_describe(out)}: {err}. Check that the model's layers "
                    "fit together and that the micro-batch has the shape the model expects."
                ) from err
        return out

    def _bind_weights(
        self, n: int
    ) -> tuple[Optional[SavedWeightRebinder], Callable[[int, Any], Any], Optional[tuple[list[Tensor], list[Tensor]]]]:
        """The forward weights of micro-batch ``n`` per stage, and what each saved weight resolves to at backward.

        Returns the rebinder, the context to enter around each stage, and — where no stage needs a context of
        its own (no derived-weight tracking, no weight read by two stages, no autocast) — the swap of every
        stage's weights at once, ``(params, tensors)``, to enter once around the whole forward instead.
        """
        opt = self.optimizer
        # weight stashing rebinds too: autograd saves a parameter itself, whose data is live again at backward
        rebind = self.weight_mode == "pb" or self._overrides_backward
        binder = SavedWeightRebinder() if any(self._rebinds) else None
        bwd_override: dict[int, list[Tensor]] = {}
        if self._overrides_backward:
            for s, group in enumerate(opt.param_groups):
                override = opt.backward_weights(group)
                if override is not None:
                    bwd_override[s] = list(override)
        swaps: list[tuple[list[Tensor], list[Tensor]]] = []
        stash = self.weight_mode == "stash"
        for s, reads in enumerate(self._reads):
            if not self._rebinds[s]:
                swaps.append(([], []))
                continue
            params, tensors = [], []
            for (p, o, i), w in zip(reads, self._stage_forward_weights(s, n)):
                if binder is not None:  # what the backward sees: the override, the stashed or the live weight
                    resolve: Any = (lambda o=o, i=i: bwd_override[o][i]) if o in bwd_override else w if stash else p
                    binder.register(w, resolve, self._param_names.get(id(p), ""), stage=s)
                if w is not p:
                    params.append(p)
                    tensors.append(w)
            swaps.append((params, tensors))
        autocast_params = self._all_params
        precision = self.precision
        tracks = binder is not None and rebind and any(t is not False for t in self._track)
        whole = None
        if not tracks and not any(self._readers) and precision in ("32", "64"):
            whole = ([p for ps, _ in swaps for p in ps], [t for _, ts in swaps for t in ts])

        @contextmanager
        def stage_context(s: int, inp: Any):
            with ExitStack() as stack:
                stack.enter_context(autocast(precision, autocast_params))
                params, tensors = swaps[s]
                if params:
                    stack.enter_context(swapped_weights(params, tensors))
                if binder is not None and rebind and self._track[s] is not False:
                    tracker = DerivedWeightTracker(binder, s, f"stage {s}")
                    tracker.mark_activations(inp)
                    stack.enter_context(tracker)
                yield

        return binder, stage_context, whole

    def step(self, x: Any, y: Any, *, sync: bool = True) -> Any:
        """Push micro-batch ``(x, y)`` through the pipeline; returns its loss (from stale forward weights).

        With ``sync=False`` the loss comes back as a detached tensor instead of a ``float``, so the step does
        not wait for the device (unless ``check_finite``, which must read the loss before the update). A loss
        with one entry per run (:func:`pipeprop.train_many`) is summed for the backward pass.
        """
        n = self.step_count
        opt = self.optimizer
        for p in self._all_params:  # opt.zero_grad(set_to_none=True), without its per-call overhead
            p.grad = None
        if self._model_computes_loss:
            x = model_inputs(x, y, self._target_keyword)
        if self.precision == "64":
            x = cast_input(x, torch.float64)
        if self._static and self._stage_inputs is not None:
            if not self._static_ready:
                self._enter_static_weights()
            output = self._static_step_forward(x, n)
            with autocast(self.precision, self._all_params):
                loss = self.loss_fn(output, y)
            return self._finish_step(loss, n, sync)
        binder, stage_context, whole = self._bind_weights(n)
        if self._static:  # the first step: eager, records the stage inputs the graphs are captured on
            inputs: list[Tensor] = []
            record = stage_context

            @contextmanager
            def stage_context(s: int, inp: Any):  # type: ignore[no-redef]
                inputs.append(inp.detach() if isinstance(inp, Tensor) else inp)  # not this step's graph
                with record(s, inp):
                    yield

            self._stage_inputs, whole = inputs, None
        with ExitStack() as stack:
            if binder is not None:
                stack.enter_context(binder.hooks())
            if whole is None:
                output = self.forward(x, stage_context)
            else:  # one swap for all stages: the same weights, less per-stage overhead
                if whole[0]:
                    stack.enter_context(swapped_weights(*whole))
                output = self.forward(x)
            with autocast(self.precision, self._all_params):
                loss = self.loss_fn(output, y)
        if binder is not None and any(t is None for t in self._track):
            check_ctx_weights(loss, binder, {id(p): self._param_names.get(id(p), "") for s, r in enumerate(self._reads) if self._rebinds[s] for p, _, _ in r})
            self._track = [t if t is not None else s in binder.derived_hits for s, t in enumerate(self._track)]
        return self._finish_step(loss, n, sync)

    def _finish_step(self, loss: Tensor, n: int, sync: bool) -> Any:
        """Check the loss, backward, update, push the next forward weights."""
        opt = self.optimizer
        loss_value = loss.detach()
        if self.check_finite:
            _check_finite(loss_value, n)
        total = loss if loss.dim() == 0 else loss.sum()
        if self._keeps_previous:
            opt.spare_weights = self._spare_weights(n + 1)
        if self._scaler is None:
            total.backward()
            opt.engine_step()
        else:
            (total.float() * self._scaler.scale).backward()
            if self._scaler.unscale(self._all_params):
                opt.engine_step()
        opt.spare_weights = None
        self.step_count = n + 1
        self._push_forward_weights(n + 1)
        return float(loss_value) if sync and loss_value.dim() == 0 else loss_value

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Step count and weight-version ring buffers (the model and optimizer are saved separately)."""
        state = {
            "step_count": self.step_count,
            "rings": [None if r is None else [[t.clone() for t in slot] for slot in r.slots] for r in self._rings],
        }
        readers = [[None if r is None else [[t.clone() for t in slot] for slot in r.slots] for *_, r in g] for g in self._readers]
        if any(any(r is not None for r in g) for g in readers):
            state["reader_rings"] = readers
        if self._scaler is not None:
            state["loss_scaler"] = self._scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rings = state["rings"]
        if len(rings) != len(self._rings):
            raise ValueError("checkpoint was written for a pipeline with a different number of stages")
        for s, (mine, theirs) in enumerate(zip(self._rings, rings)):
            if (mine is None) != (theirs is None) or (mine is not None and len(mine.slots) != len(theirs)):
                raise ValueError(f"checkpoint stage {s} has different delays/method than this pipeline")
            if mine is not None:
                params = group_params(self.optimizer.param_groups[s])
                for k, saved in enumerate(theirs):
                    for p, v in zip(params, saved):
                        if p.shape != v.shape:
                            raise ValueError(f"checkpoint stage {s}: weight shape {tuple(v.shape)} != {tuple(p.shape)}")
                    if mine.by_reference:
                        mine.slots[k] = [v.detach().clone().to(p.device, p.dtype) for v, p in zip(saved, params)]
                    else:
                        for t, v in zip(mine.slots[k], saved):
                            t.copy_(v)
        for mine, saved_readers in zip(self._readers, state.get("reader_rings") or [[None] * len(g) for g in self._readers]):
            for (_, params, _, ring), saved in zip(mine, saved_readers):
                if ring is None or saved is None:
                    continue
                ring.slots = [
                    [v.detach().clone().to(p.device, p.dtype) for v, p in zip(slot, params)] if ring.by_reference else
                    [t.copy_(v) for t, v in zip(ring.slots[k], slot)]
                    for k, slot in enumerate(saved)
                ]
        if self._scaler is not None and "loss_scaler" in state:
            self._scaler.load_state_dict(state["loss_scaler"])
        self.step_count = int(state["step_count"])
