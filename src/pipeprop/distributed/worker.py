"""What every rank runs under ``torchrun -m pipeprop.distributed``: the run driver of the distributed engine.

Every rank reads the run's config (``--config RUN/config.json``, as :func:`~.launcher.run_distributed`
passes it, or the same options as ``pipeprop train``), builds the same data set, model (same seed),
partition and stream with :mod:`pipeprop.experiments.builders`, and checks everything *before* joining
the process group (bad input and damaged checkpoints fail on every rank, and nobody waits). Rank ``r``
checkpoints to ``RUN/checkpoint/rank<r>.pt`` (checksummed, atomic). At the end rank 0 gathers the stage
weights, evaluates the model and writes the same ``metrics.jsonl``, ``summary.json`` and ``curves.png``
as a simulator run (:mod:`pipeprop.experiments.run_folder`) plus ``model.pt``. On a NaN/inf loss the
last rank writes them instead, with status ``"diverged"``, and leaves (its neighbours follow). A failing rank prints
``pipeprop.distributed rank R: error: ...``, writes it to ``errors/rank<r>.txt`` and exits at once, so its
neighbours notice within the timeout.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..experiments.config import ExperimentConfig

__all__ = ["main", "prepare", "Setup", "EXIT_CONFIG", "EXIT_FAILED", "EXIT_DIVERGED", "resolve_backend",
           "rank_checkpoint", "verify_rank_checkpoints", "write_run_config", "stored_ranges", "measure_ranges"]

EXIT_CONFIG = 2
EXIT_FAILED = 1
EXIT_DIVERGED = 3


def resolve_backend(backend: str, device: str) -> str:
    """``"auto"`` -> NCCL on CUDA, gloo on CPU; rejects NCCL without CUDA."""
    import torch.distributed as dist

    if backend == "auto":
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available() or not dist.is_nccl_available():
            raise ValueError("backend 'nccl' needs CUDA GPUs and an NCCL build of torch; use --backend gloo")
        if not str(device).startswith("cuda"):
            raise ValueError("backend 'nccl' sends GPU tensors: use --device cuda (or --backend gloo on CPU)")
    elif not dist.is_gloo_available():
        raise ValueError("this torch build lacks gloo; use --backend nccl on GPUs")
    return backend


@dataclass
class Setup:
    """Everything a rank builds before it talks to any other rank."""

    config: ExperimentConfig
    data: Any
    recipe: Any
    model: torch.nn.Module
    partition: Any
    ranges: Optional[list[range]]  # None: assignment 'measured' of a fresh run, timed by the ranks together
    backend: str
    total_steps: int
    dtype: torch.dtype
    sample: Any = None  # one micro-batch of inputs (captures the model, times the stages)


def prepare(cfg: ExperimentConfig, world_size: int, *, resumed_from: Optional[Path] = None) -> Setup:
    """Build and check the run for ``world_size`` processes (raises ``ValueError`` on bad configuration).

    With ``assignment = "measured"`` the stage ranges of a fresh run are left ``None`` (the ranks time the
    stages together once they are connected, :func:`measure_ranges`); a resumed run (``resumed_from``: its
    run folder) reuses the ranges its ``config.json`` records (:func:`stored_ranges`) and is never re-timed.
    """
    from ..experiments.builders import build_dataset, build_model
    from ..partition import partition
    from .assignment import assign_stages
    from .build import check_method

    check_method(cfg.method, cfg.delay_offset)
    backend = resolve_backend(cfg.backend, cfg.device)
    if world_size < 1:
        raise ValueError(f"need at least one process, got {world_size}")
    torch.manual_seed(cfg.seed)
    data = build_dataset(cfg)
    recipe = cfg.scaled(len(data.train))
    model = build_model(cfg, data)
    dtype = getattr(torch, cfg.dtype)
    b = cfg.micro_batch
    if len(data.train) < b:
        raise ValueError(f"micro_batch {b} is larger than the training set ({len(data.train)} examples)")
    sample = data.normalize(data.train.images[:b], dtype)  # one micro-batch: captures a non-Sequential model
    part = partition(model, cfg.partition, example_input=sample)
    if world_size > len(part):
        raise ValueError(
            f"{world_size} processes but the model has only {len(part)} pipeline stages (partition "
            f"{cfg.partition!r}): use --nproc <= {len(part)} or a finer partition"
        )
    ranges: Optional[list[range]]
    if cfg.assignment != "measured":
        ranges = assign_stages(part.stages, world_size, cfg.assignment, sample)
    elif resumed_from is not None:
        ranges = stored_ranges(resumed_from, world_size, len(part))
    else:
        ranges = [range(0, len(part))] if world_size == 1 else None
    return Setup(cfg, data, recipe, model, part, ranges, backend, recipe.total_samples // b, dtype, sample)


def measure_ranges(setup: Setup, comm: Any) -> list[range]:
    """The stage ranges of a fresh ``"measured"`` run: every rank times every stage on the sample micro-batch,
    the ranks average their timings (a collective over ``comm``) and balance them; stored in ``setup``."""
    from .assignment import assign_stages

    setup.ranges = assign_stages(setup.partition.stages, comm.world_size, "measured", setup.sample, comm=comm)
    return setup.ranges


def stored_ranges(run_dir: Path, world_size: int, num_stages: int) -> list[range]:
    """The stage ranges recorded in ``run_dir/config.json`` (``"ranges"``: ``[first, last]`` stage per rank),
    checked to be ``world_size`` contiguous non-empty ranges covering the ``num_stages`` stages."""
    path = Path(run_dir) / "config.json"
    fix = ("resume with the stage counts per process the checkpoints were written with (--assignment 'a,b,...'), "
           "or start again with --overwrite")
    try:
        raw = json.loads(path.read_text())["ranges"]
        ranges = [range(int(first), int(last) + 1) for first, last in raw]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--resume with assignment 'measured': {path} records no readable stage ranges "
                         f"({type(err).__name__}: {err}); {fix}") from None
    bounds = [r.start for r in ranges] + [ranges[-1].stop if ranges else 0]
    if (len(ranges) != world_size or bounds[0] != 0 or bounds[-1] != num_stages
            or any(r.stop <= r.start or r.stop != bounds[i + 1] for i, r in enumerate(ranges))):
        raise ValueError(f"--resume with assignment 'measured': the stage ranges {raw} in {path} do not split "
                         f"{num_stages} stages over {world_size} processes; {fix}")
    return ranges


def write_run_config(setup: Setup, run_dir: Path) -> None:
    """The run folder's ``config.json`` (what every rank reads, and ``--resume`` and ``report`` use)."""
    from ..experiments.run_folder import write_config_json

    cfg, recipe = setup.config, setup.recipe
    ranges = None if setup.ranges is None else [[r.start, r.stop - 1] for r in setup.ranges]  # None: not timed yet
    write_config_json(run_dir, cfg, recipe=recipe, delays=setup.partition.delays, train_size=len(setup.data.train),
                      test_size=len(setup.data.test), eval_every=cfg.eval_interval(recipe.total_samples),
                      ranges=ranges)


def rank_checkpoint(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / "checkpoint" / f"rank{rank}.pt"


def verify_rank_checkpoints(run_dir: Path, cfg: ExperimentConfig, world: int) -> None:
    """Check the checksum and config hash of *every* rank's checkpoint (so each rank reports any damage)."""
    from ..experiments.checkpoint import CheckpointError, verify_checkpoint

    found = sorted((Path(run_dir) / "checkpoint").glob("rank*.pt"))
    if len(found) != world:
        raise CheckpointError(
            f"--resume: {Path(run_dir) / 'checkpoint'} holds {len(found)} rank checkpoints for {world} processes; resume "
            "with the --nproc of the interrupted run, or start again with --overwrite"
        )
    for r in range(world):
        verify_checkpoint(rank_checkpoint(run_dir, r), cfg.config_hash())


def _device(cfg: ExperimentConfig) -> torch.device:
    if str(cfg.device).startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


class _CountingLoss:
    """Cross-entropy that records the correct predictions of every micro-batch (for train accuracy).

    The counts stay tensors until :meth:`counts` reads them all in one host read (at checkpoints and at the
    end), so the loop does not wait for the device every step.
    """

    def __init__(self) -> None:
        from ..experiments.builders import TrackedCrossEntropy

        self.inner = TrackedCrossEntropy()
        self._read: list[int] = []
        self._pending: list[torch.Tensor] = []

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.inner(output, target)
        self._pending.append(torch.as_tensor(self.inner.correct))
        return loss

    def counts(self, limit: Optional[int] = None) -> list[int]:
        """The correct counts of the micro-batches so far (the first ``limit`` of them)."""
        from ..simulator import read_pending

        read_pending(self._pending, self._read)
        return list(self._read if limit is None else self._read[:limit])

    def restore(self, counts: list[int]) -> None:
        self._read, self._pending = [int(v) for v in counts], []


def _run_rank(cfg: ExperimentConfig, run_dir: Path, rank: int, world: int, *, resume: bool, overwrite: bool,
              stop_after_steps: Optional[int], show_progress: bool) -> int:
    import torch.distributed as dist

    from ..experiments.builders import build_lr_schedule, build_stream, optimizer_options
    from ..experiments.checkpoint import load_checkpoint, save_checkpoint
    from ..experiments.run_folder import check_run_folder, claim_run_folder
    from ..simulator import DivergenceError
    from .build import build_pipeline
    from .comm import PipelineComm
    from .report import write_rank0_results

    # before any waiting: bad config, an occupied folder or a damaged checkpoint fail here on every rank
    check_run_folder(run_dir, cfg, resume=resume, overwrite=overwrite)
    setup = prepare(cfg, world, resumed_from=run_dir if resume else None)
    if resume:
        verify_rank_checkpoints(run_dir, cfg, world)
    device = _device(cfg)
    dist.init_process_group(setup.backend, timeout=datetime.timedelta(seconds=cfg.timeout),
                            **({"device_id": device} if device.type == "cuda" else {}))
    comm = PipelineComm.from_env(cfg.timeout, device=device if setup.backend == "nccl" else "cpu")
    if rank == 0:
        claim_run_folder(run_dir, cfg, resume=resume, overwrite=overwrite)
    measured = setup.ranges is None
    if measured:  # assignment 'measured', fresh run: timed once, here; config.json and checkpoints keep the ranges
        measure_ranges(setup, comm)
    if rank == 0 and (measured or not (run_dir / "config.json").is_file()):  # (or started by torchrun directly)
        write_run_config(setup, run_dir)
    comm.barrier()
    counting = _CountingLoss()
    engine = build_pipeline(
        setup.partition, counting, comm=comm, method=cfg.method, lr=setup.recipe.lr,
        **setup.recipe.optimizer_kwargs(), weight_decay=setup.recipe.weight_decay,
        assignment=[len(r) for r in setup.ranges], device=device, queue_capacity=cfg.queue_capacity,
        lr_schedule=build_lr_schedule(setup.recipe), **optimizer_options(cfg),
    )
    stream = build_stream(cfg, setup.data, setup.total_steps, device)
    ranges = [[r.start, r.stop] for r in setup.ranges]
    path = rank_checkpoint(run_dir, rank)
    if resume:
        state = load_checkpoint(path, cfg.config_hash(), required=("ranges", "engine", "stream", "corrects"),
                                map_location=device)
        if state["ranges"] != ranges:
            fix = ("the run folder is inconsistent (config.json records other measured ranges than the checkpoints): "
                   "start again with --overwrite" if cfg.assignment == "measured" else
                   "resume with the --nproc and --assignment of the interrupted run")
            raise ValueError(f"checkpoint {path} was written with stages per process {state['ranges']}, not {ranges}: "
                             + fix)
        engine.load_state_dict(state["engine"])
        stream.load_state_dict(state["stream"])
        counting.restore(state["corrects"])

    def save(engine_state: dict[str, Any]) -> None:
        state = {"ranges": ranges, "engine": engine_state, "stream": stream.state_dict(), "corrects": counting.counts()}
        save_checkpoint(path, state, config_hash=cfg.config_hash())

    b = cfg.micro_batch
    every = cfg.checkpoint_every or cfg.eval_interval(setup.recipe.total_samples)
    wants_data = engine.reads_inputs or engine.reads_targets
    try:
        stats = engine.run(
            stream if wants_data else None,
            setup.total_steps,
            stop_after_step=None if stop_after_steps is None else stop_after_steps - 1,
            checkpoint_every=max(1, every // b),
            checkpoint_fn=save,
            progress=show_progress and engine.reads_targets,
        )
    except DivergenceError as err:
        # the last rank computes the loss: it reports the divergence; its neighbours stop when it leaves
        print(f"pipeprop.distributed rank {rank}: {err}", file=sys.stderr, flush=True)
        mine = {"stats": {"rank": rank, "wall": 0.0}, "losses": engine.losses,
                "corrects": counting.counts(len(engine.losses)), "stages": {}}
        write_rank0_results(setup, run_dir, [mine], "diverged", diverged_at=len(engine.losses) * b)
        os._exit(EXIT_DIVERGED)
    mine = {
        "stats": stats.as_dict(),
        "losses": stats.losses,
        "corrects": counting.counts(),
        "stages": {slot.index: {k: v.cpu() for k, v in slot.module.state_dict().items()} for slot in engine.slots},
    }
    gathered: Optional[list[Any]] = [None] * world if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if rank == 0:
        assert gathered is not None
        write_rank0_results(setup, run_dir, gathered, "completed" if stats.completed else "stopped")
    dist.destroy_process_group()
    return 0


def _report_error(run_dir: Optional[Path], rank: int, err: BaseException) -> None:
    text = f"{type(err).__name__}: {err}"
    print(f"pipeprop.distributed rank {rank}: error: {text}", file=sys.stderr, flush=True)
    if os.environ.get("PIPEPROP_DEBUG"):
        traceback.print_exc()
    if run_dir is not None:
        try:
            path = run_dir / "errors" / f"rank{rank}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n")
        except OSError:
            pass


def _command() -> Any:
    import click

    from ..experiments.cli_options import config_options, resolve_config

    @click.command(name="torchrun --nproc_per_node=N -m pipeprop.distributed")
    @config_options
    @click.option("--seed", type=int, default=None, help="random seed (model init, data order)")
    @click.option("--out", type=click.Path(file_okay=False), required=True, help="run folder")
    @click.option("--resume", is_flag=True, help="continue the run in --out from its checkpoints")
    @click.option("--overwrite", is_flag=True, help="replace a run already in --out")
    @click.option("--stop-after-steps", type=click.IntRange(1), default=None,
                  help="stop (with checkpoints) after this many pipeline steps, as an interruption would")
    @click.option("--no-progress", is_flag=True, help="no progress bar")
    def command(config_name: Optional[str], sets: tuple[str, ...], seed: Optional[int], out: str, resume: bool,
                overwrite: bool, stop_after_steps: Optional[int], no_progress: bool, **options: Any) -> Any:
        """Train with real asynchronous Pipelined Backpropagation, one process per group of stages."""
        cfg = resolve_config(config_name, sets, **options)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cfg = cfg.replace(engine="distributed", nproc=world, **({} if seed is None else {"seed": seed}))
        return cfg, Path(out), resume, overwrite, stop_after_steps, cfg.progress and not no_progress

    return command


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of one rank (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` from torchrun)."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    run_dir: Optional[Path] = None
    stage = "config"
    try:
        parsed = _command().main(list(sys.argv[1:] if argv is None else argv), standalone_mode=False)
        if isinstance(parsed, int):  # --help
            return parsed
        cfg, run_dir, resume, overwrite, stop_after_steps, progress = parsed
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        t0 = time.perf_counter()
        stage = "run"
        code = _run_rank(cfg, run_dir, rank, world, resume=resume, overwrite=overwrite,
                         stop_after_steps=stop_after_steps, show_progress=progress)
        if rank == 0 and progress:
            print(f"pipeprop.distributed: done in {time.perf_counter() - t0:.1f}s, results in {run_dir}", file=sys.stderr)
        return code
    except BaseException as err:  # noqa: BLE001 - every failure must end the process promptly
        if isinstance(err, SystemExit) and err.code in (0, None):
            raise
        from ..experiments.checkpoint import CheckpointError
        from ..experiments.run_folder import RunDirError

        _report_error(run_dir, rank, err)
        sys.stdout.flush()
        sys.stderr.flush()
        config_like = isinstance(err, (ValueError, CheckpointError, RunDirError)) or type(err).__name__ == "UsageError"
        # exit at once: a clean interpreter shutdown could wait on pending communication forever
        os._exit(EXIT_CONFIG if stage == "config" or config_like else EXIT_FAILED)
