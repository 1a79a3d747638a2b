"""The one-call API: build a PB pipeline for a model and train it."""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Optional, Sequence

from torch import Tensor, nn

from .methods import get_method
from .partition import Granularity, Partition, partition as make_partition
from .precision import check_precision, prepare_model
from .regime_warnings import warn_if_lwp_overshoots
from .simulator import PipelineSimulator

__all__ = ["stage_param_groups", "build_simulator", "train"]


def stage_param_groups(stages: Sequence[nn.Module], delays: Optional[Sequence[int]] = None) -> list[dict[str, Any]]:
    """One optimizer parameter group per stage, with its ``"delay"`` (default: each stage's ``.delay``).

    A parameter read by several stages (tied weights) goes into the group of the first stage reading it,
    which updates it once per step with its delay (for Spike Compensation); later readers see it with
    their own delay (see :class:`~pipeprop.simulator.PipelineSimulator`).
    """
    if delays is None:
        delays = [int(getattr(st, "delay", 0)) for st in stages]
    if len(delays) != len(stages):
        raise ValueError(f"{len(delays)} delays given for {len(stages)} stages")
    seen: set[int] = set()
    groups = []
    for st, d in zip(stages, delays):
        params = [p for p in st.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        groups.append({"params": params, "delay": int(d)})
    return groups


def build_simulator(
    model: nn.Module | Partition,
    loss_fn: Optional[Callable[[Any, Any], Tensor]],
    *,
    method: str = "pb+sc+lwp",
    optimizer: Optional[str] = None,
    lr: float,
    momentum: Optional[float] = None,
    betas: Optional[Sequence[float]] = None,
    eps: Optional[float] = None,
    weight_decay: float = 0.0,
    partition: Granularity = "layer",
    delay_offset: int = 0,
    precision: str = "32",
    example_input: Any = None,
    example_target: Any = None,
    split_points: Optional[Sequence[str]] = None,
    compile: bool | str = False,
    cuda_graphs: bool = False,
    **options: Any,
) -> PipelineSimulator:
    """Partition ``model`` (unless it already is a :class:`Partition`) and build its simulator for ``method``.

    A model that is not an ``nn.Sequential`` of layers is captured as a graph on ``example_input`` (one
    micro-batch). ``loss_fn=None``: the model computes its own loss; give ``example_target`` (one target)
    so the capture includes it. ``precision``: ``"32"``, ``"64"``, ``"bf16-mixed"`` or ``"16-mixed"``
    (:mod:`pipeprop.precision`). ``compile``: run the stages through ``torch.compile`` (``True`` or a
    backend name). ``cuda_graphs``: replay each stage's forward and backward as CUDA graphs (CUDA only; see
    :class:`PipelineSimulator`). ``optimizer`` is ``"sgd"`` (the default for every method but ``asyncpp``; with
    ``momentum``) or ``"adam"``, ``"adamw"``, ``"nadam"`` (with ``betas``, default ``(0.9, 0.999)``, and
    ``eps``, default ``1e-8``). Extra ``options`` go to the method's optimizer (e.g. ``lwp_horizon=4``).
    """
    spec = get_method(method)
    precision = check_precision(precision)
    if isinstance(model, Partition):
        part = model
    else:
        prepare_model(model, precision)
        if precision == "64":
            example_input = _to_float64(example_input)
        if loss_fn is None and example_target is None:
            raise ValueError(
                "loss_fn=None (the model computes its own loss) needs example_target=<one target> to capture the "
                "model with it; pipeprop.train takes it from the first batch"
            )
        part = make_partition(
            model, partition, delay_offset=delay_offset, example_input=example_input,
            example_target=example_target if loss_fn is None else None, split_points=split_points,
        )
    delays = part.delays if spec.pipelined else [0] * len(part)
    opt = spec.build_optimizer(
        stage_param_groups(part.stages, delays), optimizer=optimizer, lr=lr, momentum=momentum, betas=betas, eps=eps,
        weight_decay=weight_decay, **options,
    )
    warn_if_lwp_overshoots(opt.param_groups)
    return PipelineSimulator(part.stages, opt, loss_fn, weight_mode=spec.weight_mode, precision=precision, compile=compile,
                             cuda_graphs=cuda_graphs)


def _to_float64(x: Any) -> Any:
    from .precision import cast_input
    import torch

    return cast_input(x, torch.float64)


def train(
    model: nn.Module,
    batches: Iterable[tuple[Any, Any]],
    loss_fn: Optional[Callable[[Any, Any], Tensor]],
    *,
    method: str = "pb+sc+lwp",
    optimizer: Optional[str] = None,
    lr: float,
    momentum: Optional[float] = None,
    betas: Optional[Sequence[float]] = None,
    eps: Optional[float] = None,
    weight_decay: float = 0.0,
    partition: Granularity = "layer",
    delay_offset: int = 0,
    precision: str = "32",
    split_points: Optional[Sequence[str]] = None,
    compile: bool | str = False,
    engine: str = "simulator",
    **options: Any,
) -> list[float]:
    """Train ``model`` in place with Pipelined Backpropagation; returns the loss of every step.

    One ``(x, y)`` micro-batch from ``batches`` enters the pipeline per step (its size is the micro-batch
    size, 1 for the paper's setting). ``method`` is one of :func:`pipeprop.available_methods`, e.g.
    ``"sgd"``, ``"pb"``, ``"pb+sc"``, ``"pb+lwp"``, ``"pb+sc+lwp"``, ``"pb+stash"``; ``optimizer`` is one of
    ``"sgd"`` (heavy-ball momentum ``momentum``), ``"adam"``, ``"adamw"``, ``"nadam"`` (``betas``, ``eps``),
    independent of the method. When it returns, every micro-batch's update has been applied.

    ``model`` may be any ``nn.Module`` whose forward ``torch.export`` can capture; it is captured on the
    first micro-batch (all micro-batches must have its shape). With ``loss_fn=None`` the model computes its
    own loss: the target is passed to it (as ``labels=`` when its forward takes that, else as the second
    argument) and it returns the loss (a scalar, a tuple ending with it, or an object with ``.loss``).

    ``engine="tick"`` runs the pipeline tick by tick on live weights (:class:`pipeprop.TickPipeline`: the
    same numbers, faster where the weights dominate the memory traffic, e.g. wide MLPs) for an
    ``nn.Sequential`` of ``Conv2d``/``Linear``/``GroupNorm`` and per-sample layers, in the model's dtype, with
    methods whose backward reads the live weights; it refuses anything else, naming why. A NaN/inf loss is
    then found up to 256 micro-batches after it happened.
    """
    get_method(method)  # bad names fail before any data is read
    check_precision(precision)
    if engine not in ("simulator", "tick"):
        raise ValueError(f"unknown engine {engine!r}; choose 'simulator' or 'tick'")
    if engine == "tick":
        unsupported = {"precision": precision != "32", "delay_offset": delay_offset != 0, "compile": bool(compile),
                       "split_points": split_points is not None, "loss_fn=None": loss_fn is None}
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"engine='tick' does not support {', '.join(bad)}; use the default engine='simulator'")
        from .tick_engine import build_tick_pipeline

        pipe = build_tick_pipeline(model, loss_fn, method=method, optimizer=optimizer, lr=lr, momentum=momentum,
                                   betas=betas, eps=eps, weight_decay=weight_decay, partition=partition, **options)
        return pipe.run(batches)
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        return []
    sim = build_simulator(
        model, loss_fn, method=method, optimizer=optimizer, lr=lr, momentum=momentum, betas=betas, eps=eps,
        weight_decay=weight_decay, partition=partition, delay_offset=delay_offset, precision=precision,
        example_input=first[0], example_target=first[1], split_points=split_points, compile=compile, **options,
    )
    return [sim.step(x, y) for x, y in itertools.chain([first], batches)]
