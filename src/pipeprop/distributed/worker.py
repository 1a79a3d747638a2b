"""What every rank runs under ``torchrun -m pipeprop.distributed``: set up, train its stages, report.

Every rank builds the same data set, model (same seed) and partition as single-process training
(:mod:`pipeprop.experiments`), checks the configuration *before* joining the process group (so bad input
fails fast on every rank and nobody waits), keeps its stages and runs the pipeline. Rank 0 gathers the
final stage weights, evaluates the model and writes ``result.json`` and ``model.pt`` into ``--out``;
checkpoints are ``checkpoint/rank<r>.pt``. A failing rank prints ``pipeprop.distributed rank R: error:
...``, writes it to ``errors/rank<r>.txt`` and exits at once, so its neighbours notice within the timeout.
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
import torch.nn.functional as F

from .config import DistributedConfig, parse_args

__all__ = ["main", "prepare", "Setup", "EXIT_CONFIG", "EXIT_FAILED", "resolve_backend"]

EXIT_CONFIG = 2
EXIT_FAILED = 1


def resolve_backend(backend: str, device: str) -> str:
    """``"auto"`` -> NCCL on CUDA, gloo on CPU; rejects NCCL without CUDA."""
    import torch.distributed as dist

    if backend == "auto":
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"unknown backend {backend!r}; choose gloo (CPU), nccl (GPU) or auto")
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

    config: DistributedConfig
    experiment: Any
    data: Any
    recipe: Any
    model: torch.nn.Module
    partition: Any
    ranges: list[range]
    backend: str
    total_steps: int
    dtype: torch.dtype


def prepare(cfg: DistributedConfig, world_size: int) -> Setup:
    """Build and check the run for ``world_size`` processes (raises ``ValueError`` on bad configuration)."""
    from ..experiments.builders import build_dataset, build_model
    from ..partition import partition
    from .assignment import assign_stages
    from .build import check_method

    exp = cfg.experiment_config()
    check_method(exp.method, exp.delay_offset)
    backend = resolve_backend(cfg.backend, exp.device)
    if world_size < 1:
        raise ValueError(f"need at least one process, got {world_size}")
    torch.manual_seed(exp.seed)
    data = build_dataset(exp)
    recipe = exp.scaled(len(data.train))
    model = build_model(exp, data)
    part = partition(model, exp.partition)
    if world_size > len(part):
        raise ValueError(
            f"{world_size} processes but the model has only {len(part)} pipeline stages (partition "
            f"{exp.partition!r}): use --nproc_per_node <= {len(part)} or a finer partition"
        )
    dtype = getattr(torch, exp.dtype)
    b = exp.micro_batch
    sample = data.normalize(data.train.images[:b], dtype)
    ranges = assign_stages(part.stages, world_size, cfg.assignment, sample)
    steps_per_epoch = len(data.train) // b
    if steps_per_epoch == 0:
        raise ValueError(f"micro_batch {b} is larger than the training set ({len(data.train)} examples)")
    total_steps = recipe.total_samples // b
    return Setup(cfg, exp, data, recipe, model, part, ranges, backend, total_steps, dtype)


def _stream(setup: Setup, device: torch.device) -> Any:
    from ..data import MicroBatchStream
    from ..experiments.builders import build_augment

    exp, data, b = setup.experiment, setup.data, setup.experiment.micro_batch
    stream = MicroBatchStream(
        data,
        batch_size=b,
        epochs=setup.total_steps / (len(data.train) // b),
        seed=exp.seed,
        augment=build_augment(exp, data),
        dtype=setup.dtype,
        device=device,
    )
    stream.total_steps = setup.total_steps
    return stream


def _device(exp: Any) -> torch.device:
    if str(exp.device).startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _run_rank(cfg: DistributedConfig, rank: int, world: int) -> int:
    import torch.distributed as dist

    from ..schedule import fill_bubble_fraction
    from ..experiments.lr_schedule import SampleSchedule
    from .build import build_pipeline
    from .comm import PipelineComm

    setup = prepare(cfg, world)  # before any waiting: bad config fails here on every rank
    exp, out = setup.experiment, Path(cfg.out)
    ckpt_path = out / "checkpoint" / f"rank{rank}.pt"
    if cfg.resume and not ckpt_path.is_file():
        raise ValueError(f"--resume: no checkpoint {ckpt_path}; was the run started with --checkpoint-every or stopped?")
    device = _device(exp)
    td = datetime.timedelta(seconds=cfg.timeout)
    dist.init_process_group(setup.backend, timeout=td, **({"device_id": device} if device.type == "cuda" else {}))
    comm = PipelineComm.from_env(cfg.timeout, device=device if setup.backend == "nccl" else "cpu")
    engine = build_pipeline(
        setup.partition,
        F.cross_entropy,
        comm=comm,
        method=exp.method,
        lr=setup.recipe.lr,
        **setup.recipe.optimizer_kwargs(),
        weight_decay=setup.recipe.weight_decay,
        assignment=[len(r) for r in setup.ranges],
        device=device,
        queue_capacity=cfg.queue_capacity,
        lr_lambda=SampleSchedule(setup.recipe),
        **exp.method_options,
    )
    stream = _stream(setup, device)
    meta = {"world_size": world, "ranges": [[r.start, r.stop] for r in setup.ranges], "experiment": exp.result_dict()}
    if cfg.resume:
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        if state["meta"]["world_size"] != world or state["meta"]["ranges"] != meta["ranges"]:
            raise ValueError(
                f"checkpoint {ckpt_path} was written by {state['meta']['world_size']} processes with stages "
                f"{state['meta']['ranges']}; resume with the same --nproc_per_node and --assignment"
            )
        if state["meta"]["experiment"] != meta["experiment"]:
            raise ValueError(f"checkpoint {ckpt_path} belongs to a different configuration; resume with the same options")
        engine.load_state_dict(state["engine"])
        stream.load_state_dict(state["stream"])

    def save(engine_state: dict[str, Any]) -> None:
        _save_atomic({"meta": meta, "engine": engine_state, "stream": stream.state_dict()}, ckpt_path)

    wants_data = engine.reads_inputs or engine.reads_targets
    stats = engine.run(
        stream if wants_data else None,
        setup.total_steps,
        stop_after_step=cfg.stop_after_step,
        checkpoint_every=cfg.checkpoint_every,
        checkpoint_fn=save,
        progress=cfg.progress and engine.reads_targets,
    )
    mine = {
        "stats": stats.as_dict(),
        "losses": stats.losses,
        "stages": {slot.index: {k: v.cpu() for k, v in slot.module.state_dict().items()} for slot in engine.slots},
    }
    gathered: Optional[list[Any]] = [None] * world if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if rank == 0:
        assert gathered is not None
        _write_results(setup, gathered, stats.completed, out, fill_bubble_fraction)
    dist.destroy_process_group()
    return 0


def _write_results(setup: Setup, gathered: list[Any], completed: bool, out: Path, bubble: Any) -> None:
    from ..experiments.runner import evaluate

    for item in gathered:
        for s, sd in item["stages"].items():
            setup.partition.stages[s].load_state_dict(sd)
    losses = next((it["losses"] for it in gathered if it["losses"]), [])
    ranks = [it["stats"] for it in gathered]
    wall = max(r["wall"] for r in ranks)
    b, M = setup.experiment.micro_batch, setup.total_steps
    result: dict[str, Any] = {
        "completed": completed,
        "world_size": len(gathered),
        "backend": setup.backend,
        "stages": len(setup.partition),
        "assignment": [[r.start, r.stop - 1] for r in setup.ranges],
        "microbatches": M,
        "micro_batch": b,
        "losses": losses,
        "wall_seconds": wall,
        "samples_per_second": M * b / wall if completed and wall > 0 else None,
        "bubble_fill_drain": bubble(M, len(setup.partition)),
        "ranks": ranks,
        "config": setup.config.to_dict(),
        "experiment": setup.experiment.to_dict(),
    }
    if completed:
        _save_atomic(setup.model.state_dict(), out / "model.pt")
        if setup.config.evaluate:
            loss, acc = evaluate(setup.model, setup.data, batch=setup.experiment.eval_batch, dtype=setup.dtype)
            result["final_test_loss"], result["final_test_acc"] = loss, acc
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, out / "result.json")


def _report_error(cfg: Optional[DistributedConfig], rank: int, err: BaseException) -> None:
    text = f"{type(err).__name__}: {err}"
    print(f"pipeprop.distributed rank {rank}: error: {text}", file=sys.stderr, flush=True)
    if os.environ.get("PIPEPROP_DEBUG"):
        traceback.print_exc()
    if cfg is not None:
        try:
            path = Path(cfg.out) / "errors" / f"rank{rank}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n")
        except OSError:
            pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of one rank (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` from torchrun)."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    cfg: Optional[DistributedConfig] = None
    stage = "config"
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        stage = "run"
        t0 = time.perf_counter()
        code = _run_rank(cfg, rank, world)
        if rank == 0 and cfg.progress:
            print(f"pipeprop.distributed: done in {time.perf_counter() - t0:.1f}s, results in {cfg.out}", file=sys.stderr)
        return code
    except BaseException as err:  # noqa: BLE001 - every failure must end the process promptly
        if isinstance(err, SystemExit) and err.code in (0, None):
            raise
        _report_error(cfg, rank, err)
        sys.stdout.flush()
        sys.stderr.flush()
        # exit at once: a clean interpreter shutdown could wait on pending communication forever
        os._exit(EXIT_CONFIG if stage == "config" or isinstance(err, ValueError) else EXIT_FAILED)
