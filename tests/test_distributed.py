"""The distributed engine equals the simulator; faults end every rank promptly; bad config fails before waiting.

The tests start their own processes (spawn, gloo on CPU, a free port); one launch runs every model and
method in turn to keep process start-ups (the slow part on a small machine) few.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import pipeprop
from pipeprop.distributed import DistributedPipeline, PipelineComm, assign_stages, build_pipeline
from pipeprop.distributed.comm import decode_header, encode_header
from pipeprop.models.blocks import Fork, Join, OnBranch

METHODS = ("pb", "pb+sc", "pb+lwp", "pb+sc+lwp", "pb+stash", "spectrain")  # spectrain needs the pipeline-wide max delay
MICROBATCHES = 14
LR, MOMENTUM, WD = 0.05, 0.9, 1e-3
# stage counts per rank; the CNN's first boundary carries the residual tuple (x, x) between ranks
ASSIGN = {("mlp", 2): "params", ("mlp", 4): "uniform", ("cnn", 2): "1,3", ("cnn", 4): "uniform"}


# ---------------------------------------------------------------------------------------------- models and data
def make_model(name: str) -> nn.Sequential:
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(
            nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 8), nn.ReLU(),
            nn.Linear(8, 5),
        )
    else:  # a small CNN with a residual skip carried as a tuple, and a GroupNorm
        model = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), Fork(),
            OnBranch(nn.Conv2d(4, 4, 3, padding=1)), Join(),
            nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.GroupNorm(2, 6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(6, 5),
        )
    return model.double()


def make_batches(name: str, n: int = MICROBATCHES) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Micro-batches of varying size (2, 1, 3, ...): message shapes change from step to step."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        b = (2, 1, 3)[i % 3]
        shape = (b, 16) if name == "mlp" else (b, 1, 6, 6)
        out.append((torch.randn(*shape, generator=g, dtype=torch.float64), torch.randint(0, 5, (b,), generator=g)))
    return out


def simulator_reference(name: str, method: str) -> tuple[list[list[torch.Tensor]], list[float]]:
    """Final weights per stage and losses of the exact sequential simulator (the project's reference)."""
    sim = pipeprop.build_simulator(make_model(name), F.cross_entropy, method=method, lr=LR, momentum=MOMENTUM, weight_decay=WD)
    losses = [sim.step(x, y) for x, y in make_batches(name)]
    return [[p.detach().clone() for p in st.parameters()] for st in sim.stages], losses


# ---------------------------------------------------------------------------------------------- process plumbing
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, timeout: float, job: Callable[..., None], args: tuple, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        # start-up (imports, building stages) may be slow on a busy machine: the group's timeout covers it,
        # the pipeline's per-message waits use ``timeout``
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=max(timeout, 120)))
        job(PipelineComm.from_env(timeout), out, *args)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as err:  # noqa: BLE001 - report and leave at once, as the CLI worker does
        Path(out, f"err{rank}.txt").write_text(f"{time.time()}\n{type(err).__name__}: {err}")
        os._exit(1)
    os._exit(0)


def run_procs(job: Callable[..., None], world: int, out: Path, *, timeout: float, args: tuple = (), limit: float = 120.0,
              hanging: tuple[int, ...] = ()):
    """Start ``world`` ranks running ``job``; returns exit codes (None: still running, then killed).

    Waits until every rank except those in ``hanging`` has exited (or ``limit`` seconds passed).
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, timeout, job, args, str(out))) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and any(p.is_alive() for r, p in enumerate(procs) if r not in hanging):
        time.sleep(0.05)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return codes


def read_error(out: Path, rank: int) -> tuple[float, str]:
    stamp, text = Path(out, f"err{rank}.txt").read_text().split("\n", 1)
    return float(stamp), text


# ---------------------------------------------------------------------------------------------- jobs (run in the ranks)
def _equivalence_job(comm4: PipelineComm, out: str) -> None:
    """All models and methods on 4 ranks, then on ranks 0-1 as a 2-rank pipeline (one launch for both)."""
    comm2 = PipelineComm.from_env(comm4.timeout, ranks=2)
    _equivalence_runs(comm4, out)
    if comm2 is not None:
        _equivalence_runs(comm2, out)


def _equivalence_runs(comm: PipelineComm, out: str) -> None:
    results: dict[str, Any] = {}
    for name in ("mlp", "cnn"):
        for method in METHODS:
            engine = build_pipeline(
                make_model(name), F.cross_entropy, comm=comm, method=method, lr=LR, momentum=MOMENTUM, weight_decay=WD,
                assignment=ASSIGN[(name, comm.world_size)],
            )
            stats = engine.run(make_batches(name), MICROBATCHES)
            results[f"{name}/{method}"] = {
                "params": {slot.index: [p.detach().clone() for p in slot.params] for slot in engine.slots},
                "losses": stats.losses,
            }
    torch.save(results, Path(out, f"world{comm.world_size}-rank{comm.rank}.pt"))


def _fault_job(comm: PipelineComm, out: str, kind: str, bad_rank: int, at_step: int) -> None:
    engine = build_pipeline(make_model("mlp"), F.cross_entropy, comm=comm, method="pb", lr=LR, assignment="uniform"
                            if comm.world_size == 4 else "params")

    def fault(step: int) -> None:
        if comm.rank == bad_rank and step == at_step:
            Path(out, "fault.txt").write_text(str(time.time()))
            if kind == "raise":
                raise RuntimeError("injected failure")
            time.sleep(300)  # hang

    engine.run(make_batches("mlp", 40), 40, on_step=fault)


# ---------------------------------------------------------------------------------------------- equivalence
@pytest.mark.slow
def test_distributed_equals_simulator(tmp_path: Path) -> None:
    codes = run_procs(_equivalence_job, 4, tmp_path, timeout=60.0)
    errors = {r: read_error(tmp_path, r)[1] for r in range(4) if Path(tmp_path, f"err{r}.txt").exists()}
    assert codes == [0] * 4, f"ranks failed: {codes} {errors}"
    references = {(name, method): simulator_reference(name, method) for name in ("mlp", "cnn") for method in METHODS}
    for world in (2, 4):
        ranks = [torch.load(tmp_path / f"world{world}-rank{r}.pt") for r in range(world)]
        check_against_simulator(ranks, references)


def check_against_simulator(ranks: list[dict[str, Any]], references: dict) -> None:
    for name in ("mlp", "cnn"):
        for method in METHODS:
            ref_params, ref_losses = references[(name, method)]
            key = f"{name}/{method}"
            seen = set()
            for res in ranks:
                for s, params in res[key]["params"].items():
                    seen.add(s)
                    for got, want in zip(params, ref_params[s], strict=True):
                        if name == "mlp":  # chains of single tensors: bit for bit
                            assert torch.equal(got, want), f"{key} stage {s} differs from the simulator"
                        else:
                            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13, msg=f"{key} stage {s}")
            assert seen == set(range(len(ref_params))), f"{key}: stages {seen} held by the ranks"
            torch.testing.assert_close(torch.tensor(ranks[-1][key]["losses"]), torch.tensor(ref_losses), rtol=1e-12, atol=0)
            assert all(not r[key]["losses"] for r in ranks[:-1]), "only the last rank computes losses"


# ---------------------------------------------------------------------------------------------- faults
@pytest.mark.slow
def test_rank_that_raises_ends_every_rank(tmp_path: Path) -> None:
    timeout = 20.0  # the failure is noticed by the broken connection, long before the timeout
    codes = run_procs(_fault_job, 2, tmp_path, timeout=timeout, args=("raise", 0, 6), limit=90)
    assert codes == [1, 1], codes
    fault_time = float((tmp_path / "fault.txt").read_text())
    assert "injected failure" in read_error(tmp_path, 0)[1]
    when, text = read_error(tmp_path, 1)
    assert "PeerLostError" in text or "PeerTimeoutError" in text, text
    assert "rank 0" in text, text
    assert when - fault_time < timeout, "the neighbour of a crashed rank must fail within the timeout"


@pytest.mark.slow
def test_rank_that_hangs_ends_every_other_rank(tmp_path: Path) -> None:
    timeout = 5.0
    codes = run_procs(_fault_job, 3, tmp_path, timeout=timeout, args=("hang", 1, 6), limit=60, hanging=(1,))
    assert codes[0] == 1 and codes[2] == 1, codes
    assert codes[1] is None, "the hanging rank was still running (and got killed by the test)"
    fault_time = float((tmp_path / "fault.txt").read_text())
    for r in (0, 2):
        when, text = read_error(tmp_path, r)
        assert "PeerTimeoutError" in text or "PeerLostError" in text, text
        assert "rank 1" in text, text
        assert when - fault_time < timeout + 10.0, f"rank {r} failed {when - fault_time:.1f}s after the hang"


# ---------------------------------------------------------------------------------------------- configuration
CLI_ARGS = [
    "--model", "mlp", "--set", 'model_options={"hidden": 16}', "--dataset", "digits", "--method", "pb+sc+lwp",
    "--samples", "24", "--batch-size", "1", "--micro-batch", "1", "--lr", "0.05", "--momentum", "0.9",
    "--schedule", "constant", "--dtype", "float64", "--seed", "3", "--timeout", "60", "--no-progress",
]
TINY = dict(model="mlp", model_options={"hidden": 16}, dataset="digits", method="pb+sc+lwp", samples=24, batch_size=1,
            micro_batch=1, lr=0.05, momentum=0.9, schedule="constant", dtype="float64", seed=3, timeout=60.0,
            progress=False, engine="distributed", nproc=2, test_subset=100)


def test_bad_configuration_is_rejected_before_any_process_starts(tmp_path: Path) -> None:
    from pipeprop.experiments import ExperimentConfig, run_experiment
    from pipeprop.experiments.config import ConfigError
    from pipeprop.experiments.run_folder import RunDirError

    cfg = ExperimentConfig(**TINY)
    with pytest.raises(ValueError, match="only 3 pipeline stages"):
        run_experiment(cfg.replace(nproc=4), tmp_path / "a")
    with pytest.raises(ConfigError, match="backend = 'carrier-pigeon': allowed: 'auto', 'gloo' or 'nccl'"):
        cfg.replace(backend="carrier-pigeon")
    with pytest.raises(ValueError, match="synchronous"):
        run_experiment(cfg.replace(method="sgd"), tmp_path / "c")
    with pytest.raises(ValueError, match="at least one stage"):
        assign_stages(pipeprop.partition(make_model("mlp")).stages, 2, "4,0")
    assert not (tmp_path / "a").exists()
    # a folder holding a simulator run (or any other run) is never written into
    sim = cfg.replace(engine="simulator", samples=8)
    run_experiment(sim, tmp_path / "sim")
    before = {p.name: p.read_bytes() for p in (tmp_path / "sim").iterdir() if p.is_file()}
    with pytest.raises(RunDirError, match=r"engine: 'distributed' vs 'simulator' stored.*--overwrite"):
        run_experiment(cfg, tmp_path / "sim")
    assert {p.name: p.read_bytes() for p in (tmp_path / "sim").iterdir() if p.is_file()} == before


@pytest.mark.slow
def test_rank_with_bad_configuration_exits_without_waiting(tmp_path: Path) -> None:
    """A rank launched into a world larger than the pipeline fails at once, without joining the group."""
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "8", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipeprop.distributed", *CLI_ARGS, "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "only 3 pipeline stages" in proc.stderr
    assert time.monotonic() - t0 < 60  # the 60 s rendezvous timeout was never waited for


def test_header_round_trip() -> None:
    payload = (torch.zeros(2, 3, dtype=torch.float64), None, torch.ones(4, dtype=torch.int64))
    header, tensors = encode_header(payload)
    layout = decode_header(header)
    assert layout.specs == [(torch.float64, (2, 3)), None, (torch.int64, (4,))]
    assert len(tensors) == 2
    with pytest.raises(TypeError, match="tensor or a tuple"):
        encode_header("text")


def test_engine_rejects_delays_it_cannot_realize() -> None:
    part = pipeprop.partition(make_model("mlp"), delay_offset=1)
    comm = PipelineComm(0, 1, timeout=1.0, device=torch.device("cpu"))
    opt = pipeprop.PipelineSGD(pipeprop.stage_param_groups(part.stages), lr=0.1)
    with pytest.raises(ValueError, match="delay_offset"):
        DistributedPipeline(part.stages, 0, len(part), opt, F.cross_entropy, comm=comm)


# ---------------------------------------------------------------------------------------------- torchrun, checkpoint, resume
def _ranks_on_their_own(run: Path, world: int, *extra: str) -> list[subprocess.CompletedProcess]:
    """Start every rank of a ``torchrun -m pipeprop.distributed`` job by hand (as torchrun would)."""
    port = str(free_port())
    procs = []
    for r in range(world):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "pipeprop.distributed", "--config", str(run / "config.json"),
                                       "--out", str(run), *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=120), *p.communicate()) for p in procs]


@pytest.mark.slow
def test_cli_resume_of_a_distributed_run_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    """Stop after pipeline step 9 (checkpoints), resume with `pipeprop train --engine distributed --resume`,
    and match the uninterrupted run written out by hand with the simulator; then damage a checkpoint."""
    from click.testing import CliRunner

    from pipeprop.cli import main
    from pipeprop.data import MicroBatchStream, load_digits
    from pipeprop.experiments import ExperimentConfig, run_experiment
    from pipeprop.experiments.report import collect_runs, format_table, aggregate

    out = tmp_path / "run"
    first = run_experiment(ExperimentConfig(**TINY, checkpoint_every=3), out, stop_after_steps=9)
    assert first["status"] == "stopped" and first["samples"] < 24
    assert (out / "checkpoint" / "rank0.pt").is_file() and (out / "checkpoint" / "rank1.pt").is_file()
    intact = tmp_path / "intact"
    subprocess.run(["cp", "-r", str(out), str(intact)], check=True)
    res = CliRunner().invoke(main, ["train", "--engine", "distributed", "--out", str(out), "--resume"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    second = json.loads((out / "summary.json").read_text())
    assert second["status"] == "completed" and second["samples"] == 24 and second["world_size"] == 2
    assert all(0.0 < r["busy_fraction"] <= 1.0 for r in second["ranks"])

    # the same run in one process, written out by hand: seed, digits, zoo MLP, simulator, stream
    torch.manual_seed(3)
    data = load_digits()
    model = pipeprop.models.get("mlp", num_classes=10, in_features=64, hidden=16).double()
    sim = pipeprop.build_simulator(model, F.cross_entropy, method="pb+sc+lwp", lr=0.05, momentum=0.9)
    stream = MicroBatchStream(data, batch_size=1, epochs=24 / len(data.train), seed=3, dtype=torch.float64)
    stream.total_steps = 24
    losses = [sim.step(x, y) for x, y in stream]
    final = torch.load(out / "model.pt")
    for key, want in model.state_dict().items():
        assert torch.equal(final[key], want), f"{key}: resumed distributed run differs from the simulator"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["samples"] == 24 and metrics[-1]["train_loss"] == pytest.approx(sum(losses) / 24, rel=1e-12)
    assert second["final_train_loss"] == pytest.approx(sum(losses) / 24, rel=1e-12)  # window = the 24 samples

    # the run folder reads like a simulator run's
    rows = aggregate(collect_runs(out))
    assert rows[0]["completed"] == 1 and rows[0]["final_test_acc_mean"] == second["final_test_acc"]
    assert "| pb+sc+lwp | 1 | 1 | 0 | 0 | 0 |" in format_table(rows)
    rep = CliRunner().invoke(main, ["report", str(out), "--out", str(tmp_path / "rep")], catch_exceptions=False)
    assert rep.exit_code == 0 and (tmp_path / "rep" / "comparison.png").is_file()

    # a flipped bit in one rank's checkpoint: a clear error naming the file, on every rank, nobody waits
    ckpt = intact / "checkpoint" / "rank1.pt"
    raw = bytearray(ckpt.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    ckpt.write_bytes(bytes(raw))
    t0 = time.monotonic()
    done = _ranks_on_their_own(intact, 2, "--resume")
    assert time.monotonic() - t0 < 60
    for r, proc in enumerate(done):
        assert proc.returncode == 2, proc.stderr
        assert f"rank {r}: error: CheckpointError: checkpoint {ckpt} is damaged" in proc.stderr, proc.stderr
        assert "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    res = CliRunner().invoke(main, ["train", "--out", str(intact), "--resume"], catch_exceptions=False)
    assert res.exit_code == 1 and f"checkpoint {ckpt} is damaged" in res.output


def test_assignment_balances_estimated_cost() -> None:
    from pipeprop.distributed import balance_stages, stage_costs

    assert balance_stages([4.0, 1.0, 1.0, 1.0, 1.0], 2) == [range(0, 1), range(1, 5)]
    assert balance_stages([1.0, 1.0, 1.0, 1.0], 4) == [range(i, i + 1) for i in range(4)]
    model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.Linear(32, 4)).double()
    stages = pipeprop.partition(model).stages
    before = model[1].running_mean.clone()
    costs = stage_costs(stages, "flops", torch.randn(3, 8, dtype=torch.float64))
    assert costs[0] == pytest.approx(2 * 3 * 8 * 32 + 3 * 32)  # matmul FLOPs + output elements
    assert torch.equal(model[1].running_mean, before), "estimating costs must not touch buffers"
    with pytest.raises(ValueError, match="only 2 pipeline stages"):
        balance_stages([1.0, 1.0], 3)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_single_rank_pipeline_and_in_process_resume_equal_simulator(name: str) -> None:
    """All stages on one rank (no process group needed): the step-by-step schedule with several local
    stages, interrupted after step 7 and resumed from its state dict in a fresh engine, equals the simulator."""
    comm = PipelineComm(0, 1, timeout=5.0, device=torch.device("cpu"))
    for method in METHODS:
        ref_params, ref_losses = simulator_reference(name, method)
        saved: list[dict[str, Any]] = []
        first = build_pipeline(make_model(name), F.cross_entropy, comm=comm, method=method, lr=LR, momentum=MOMENTUM,
                               weight_decay=WD, assignment="uniform")
        batches = make_batches(name)
        stats = first.run(batches, MICROBATCHES, stop_after_step=7, checkpoint_fn=saved.append)
        assert not stats.completed and len(saved) == 1
        state = saved[0]
        second = build_pipeline(make_model(name), F.cross_entropy, comm=comm, method=method, lr=LR, momentum=MOMENTUM,
                                weight_decay=WD, assignment="uniform")
        second.load_state_dict(state)
        stats = second.run(batches[second.consumed:], MICROBATCHES)
        assert stats.completed
        for slot in second.slots:
            for got, want in zip(slot.params, ref_params[slot.index], strict=True):
                torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-13, msg=f"{name}/{method} stage {slot.index}")
        torch.testing.assert_close(torch.tensor(stats.losses), torch.tensor(ref_losses), rtol=1e-12, atol=0)


def test_every_registered_pipelined_method_matches_the_simulator_on_one_rank() -> None:
    """Baseline mitigations (PipeMare, SpecTrain, ...) plug in through the same optimizer hooks."""
    comm = PipelineComm(0, 1, timeout=5.0, device=torch.device("cpu"))
    for method in pipeprop.available_methods():
        if not pipeprop.get_method(method).pipelined or "sgd" not in pipeprop.get_method(method).optimizers:
            continue  # Adam-only methods (asyncpp): tests/test_distributed_adam.py
        ref_params, ref_losses = simulator_reference("mlp", method)
        engine = build_pipeline(make_model("mlp"), F.cross_entropy, comm=comm, method=method, lr=LR, momentum=MOMENTUM,
                                weight_decay=WD, assignment="uniform")
        stats = engine.run(make_batches("mlp"), MICROBATCHES)
        for slot in engine.slots:
            for got, want in zip(slot.params, ref_params[slot.index], strict=True):
                torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-13, msg=f"{method} stage {slot.index}")
        torch.testing.assert_close(torch.tensor(stats.losses), torch.tensor(ref_losses), rtol=1e-12, atol=0)


def test_engine_reads_losses_in_blocks_and_reports_a_divergence_at_its_micro_batch(
        count_host_reads: Callable[[], Any]) -> None:
    """The engine reads the losses to the host every ``read_every`` steps, not every step; a NaN loss is still
    reported at its own micro-batch, with only the finite losses before it kept (checked against the simulator)."""
    from pipeprop.simulator import DivergenceError

    comm = PipelineComm(0, 1, timeout=5.0, device=torch.device("cpu"))
    batches = make_batches("mlp", 30)
    ref = pipeprop.build_simulator(make_model("mlp"), F.cross_entropy, method="pb+sc+lwp", lr=LR, momentum=MOMENTUM)
    ref_losses = [ref.step(x, y) for x, y in batches]

    def engine() -> DistributedPipeline:
        return build_pipeline(make_model("mlp"), F.cross_entropy, comm=comm, method="pb+sc+lwp", lr=LR,
                              momentum=MOMENTUM, assignment="uniform")

    clean = engine()
    counter = count_host_reads()
    stats = clean.run(batches, 30, read_every=5)
    counter.on = False
    steps = stats.steps  # 30 + S - 1 (fill and drain)
    assert 1 <= counter.reads <= math.ceil(steps / 5), counter.reads
    torch.testing.assert_close(torch.tensor(stats.losses), torch.tensor(ref_losses), rtol=1e-12, atol=0)

    batches[17] = (torch.full_like(batches[17][0], float("nan")), batches[17][1])
    broken = engine()
    with pytest.raises(DivergenceError) as err:
        broken.run(batches, 30, read_every=5)
    assert err.value.step == 17 and math.isnan(err.value.loss)
    torch.testing.assert_close(torch.tensor(broken.losses), torch.tensor(ref_losses[:17]), rtol=1e-12, atol=0)
    computed = 17 + broken.num_stages  # the steps done when micro-batch 17 reached the loss
    assert broken.step == 5 * math.ceil(computed / 5)  # found at the first read after it


class _Halving:
    """A picklable schedule: the factor halves every 3 updates of a stage."""

    def __call__(self, k: int) -> float:
        return 0.5 ** (k // 3)


def test_lr_schedule_inside_the_optimizer_is_shared_by_both_engines() -> None:
    """One schedule mechanism: each stage scales its lr at its own update count, in both engines, and the
    count travels in the optimizer's state_dict (the engine is interrupted and resumed from it)."""
    ref = pipeprop.build_simulator(make_model("mlp"), F.cross_entropy, method="pb+sc+lwp", lr=LR, momentum=MOMENTUM)
    ref.optimizer.set_lr_schedule(_Halving())
    ref_losses = [ref.step(x, y) for x, y in make_batches("mlp")]
    assert [g["updates"] for g in ref.optimizer.param_groups] == [MICROBATCHES] * len(ref.stages)
    comm = PipelineComm(0, 1, timeout=5.0, device=torch.device("cpu"))
    saved: list[dict[str, Any]] = []
    first = build_pipeline(make_model("mlp"), F.cross_entropy, comm=comm, method="pb+sc+lwp", lr=LR, momentum=MOMENTUM,
                           assignment="uniform", lr_schedule=_Halving())
    first.run(make_batches("mlp"), MICROBATCHES, stop_after_step=8, checkpoint_fn=saved.append)
    # after steps 0..8 stage s has run the backwards of micro-batches n <= 8 - 2(S-1) + s: 3 + s updates (S = 4)
    assert [g["updates"] for g in saved[0]["optimizer"]["param_groups"]] == [3, 4, 5, 6]
    second = build_pipeline(make_model("mlp"), F.cross_entropy, comm=comm, method="pb+sc+lwp", lr=LR, momentum=MOMENTUM,
                            assignment="uniform", lr_schedule=_Halving())
    second.load_state_dict(saved[0])
    stats = second.run(make_batches("mlp")[second.consumed:], MICROBATCHES)
    for slot, ref_stage in zip(second.slots, ref.stages):
        for got, want in zip(slot.params, ref_stage.parameters(), strict=True):
            torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(torch.tensor(stats.losses), torch.tensor(ref_losses), rtol=1e-12, atol=0)


@pytest.mark.slow
def test_diverged_distributed_run_ends_with_status_not_traceback(tmp_path: Path) -> None:
    from pipeprop.experiments import ExperimentConfig, run_experiment

    cfg = ExperimentConfig(**{**TINY, "method": "pb", "lr": 1e6, "rule": "linear", "dtype": "float32", "samples": 40})
    summary = run_experiment(cfg, tmp_path / "div")
    assert summary["status"] == "diverged" and 0 < summary["diverged_at"] < 40
    assert json.loads((tmp_path / "div" / "summary.json").read_text())["status"] == "diverged"
    assert (tmp_path / "div" / "curves.png").is_file() and not (tmp_path / "div" / "model.pt").exists()


def _simulator_twin_of_tiny(samples: int = 24) -> dict[str, torch.Tensor]:
    """The final weights of the TINY run done in one process by the simulator, written out by hand."""
    from pipeprop.data import MicroBatchStream, load_digits

    torch.manual_seed(3)
    data = load_digits()
    model = pipeprop.models.get("mlp", num_classes=10, in_features=64, hidden=16).double()
    sim = pipeprop.build_simulator(model, F.cross_entropy, method="pb+sc+lwp", lr=0.05, momentum=0.9)
    stream = MicroBatchStream(data, batch_size=1, epochs=samples / len(data.train), seed=3, dtype=torch.float64)
    stream.total_steps = samples
    for x, y in stream:
        sim.step(x, y)
    return model.state_dict()


@pytest.mark.slow
def test_measured_assignment_is_timed_once_stored_and_reused_on_resume(tmp_path: Path) -> None:
    """`--set assignment=measured` through the run driver: a fresh run times the stages and records the ranges
    (config.json, every rank's checkpoint); `--resume` reuses them (the resumed run equals the simulator bit for
    bit); a missing record and ranges that disagree with the checkpoints are refused, naming the fix."""
    from click.testing import CliRunner

    from pipeprop.cli import main
    from pipeprop.distributed import DistributedRunError
    from pipeprop.experiments import ExperimentConfig, run_experiment
    from pipeprop.experiments.checkpoint import load_checkpoint

    out = tmp_path / "run"
    cfg = ExperimentConfig(**TINY, checkpoint_every=3, assignment="measured")
    first = run_experiment(cfg, out, stop_after_steps=9)
    assert first["status"] == "stopped"
    stored = json.loads((out / "config.json").read_text())["ranges"]
    assert len(stored) == 2 and stored[0][0] == 0 and stored[1][0] == stored[0][1] + 1 and stored[1][1] == 2
    for r in range(2):  # every rank checkpointed the same ranges ([start, stop) per rank)
        assert load_checkpoint(out / "checkpoint" / f"rank{r}.pt")["ranges"] == [[a, b + 1] for a, b in stored]
    for name in ("missing", "other"):
        subprocess.run(["cp", "-r", str(out), str(tmp_path / name)], check=True)

    res = CliRunner().invoke(main, ["train", "--out", str(out), "--resume"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    second = json.loads((out / "summary.json").read_text())
    assert second["status"] == "completed" and second["samples"] == 24
    assert second["assignment"] == stored == json.loads((out / "config.json").read_text())["ranges"]
    final = torch.load(out / "model.pt")
    for key, want in _simulator_twin_of_tiny().items():
        assert torch.equal(final[key], want), f"{key}: resumed measured run differs from the simulator"

    # no record of the ranges: refused before any process starts
    info = json.loads((tmp_path / "missing" / "config.json").read_text())
    del info["ranges"]
    (tmp_path / "missing" / "config.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"records no readable stage ranges .*--assignment 'a,b,...'.*--overwrite"):
        run_experiment(cfg, tmp_path / "missing", resume=True)
    # ranges that split the stages otherwise than the checkpoints: refused by the ranks
    info = json.loads((tmp_path / "other" / "config.json").read_text())
    info["ranges"] = [[0, 0], [1, 2]] if stored == [[0, 1], [2, 2]] else [[0, 1], [2, 2]]
    (tmp_path / "other" / "config.json").write_text(json.dumps(info))
    with pytest.raises(DistributedRunError, match=r"written with stages per process .*inconsistent.*--overwrite"):
        run_experiment(cfg, tmp_path / "other", resume=True)
