"""The run driver reads losses to the host in blocks, not every step: its metrics and divergence handling
equal a per-step loop written out here, and it reads the step results at most once per block."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
import torch.nn.functional as F

import pipeprop
from pipeprop.data import MicroBatchStream, load_digits
from pipeprop.experiments import ExperimentConfig, Runner, run_experiment
from pipeprop.experiments.run_group import RunGroup
from pipeprop.experiments.runner import StepResults
from pipeprop.models import get as get_model
from pipeprop.simulator import DivergenceError

BLOCK = 256  # steps between the progress bar's updates at micro-batch 1: the driver's read interval


def tiny(**kw: Any) -> ExperimentConfig:
    base = dict(name="sync", model="mlp", model_options={"hidden": 16}, dataset="digits", method="pb+sc+lwp",
                batch_size=1, micro_batch=1, lr=0.05, momentum=0.9, schedule="constant", dtype="float64",
                samples=600, eval_every=200, test_subset=50, progress=False, seed=4)
    base.update(kw)
    return ExperimentConfig(**base)


def reference(cfg: ExperimentConfig) -> tuple[list[tuple[int, float, float]], Optional[int], list[tuple[float, int]]]:
    """The run written out step by step: each loss read as it comes (``float``), the running train loss and
    accuracy since the last evaluation, and the sample at which the run diverges (as the driver defines it: a
    non-finite loss is not counted; a running mean above ``divergence_loss`` is, then the run stops); also each
    counted step's ``(loss, correct)``."""
    torch.manual_seed(cfg.seed)
    data = load_digits()
    dtype = getattr(torch, cfg.dtype)
    model = get_model("mlp", hidden=16, num_classes=10, in_features=64).to(dtype)
    counted: list[int] = []

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        counted.append(int((out.argmax(dim=1) == y).sum()))
        return F.cross_entropy(out, y)

    sim = pipeprop.build_simulator(model, loss_fn, method=cfg.method, lr=cfg.lr, momentum=cfg.momentum)
    stream = MicroBatchStream(data, batch_size=1, epochs=cfg.samples / len(data.train), seed=cfg.seed,
                              dtype=dtype)
    stream.total_steps = cfg.samples
    rows: list[tuple[int, float, float]] = []
    steps: list[tuple[float, int]] = []
    loss_sum, correct, count, samples = 0.0, 0, 0, 0
    for x, y in stream:
        try:
            loss = sim.step(x, y)
        except DivergenceError:  # the simulator's own per-step check: NaN/inf
            return rows, samples, steps
        samples += 1
        steps.append((loss, counted[-1]))
        loss_sum, correct, count = loss_sum + loss, correct + counted[-1], count + 1
        if cfg.divergence_loss is not None and loss_sum / count > cfg.divergence_loss:
            return rows, samples, steps
        if samples % cfg.eval_every == 0 or samples == cfg.samples:
            rows.append((samples, loss_sum / count, correct / count))
            loss_sum, correct, count = 0.0, 0, 0
    return rows, None, steps


def train_rows(run_dir: Path) -> list[tuple[int, float, float]]:
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["samples"] == 0  # the evaluation before training
    return [(m["samples"], m["train_loss"], m["train_acc"]) for m in metrics[1:]]


def test_step_results_read_the_values_a_per_step_read_gives() -> None:
    acc = StepResults(2)
    losses = [torch.tensor([0.1, float("nan")], dtype=torch.float32), torch.tensor([1 / 3, 2.5], dtype=torch.float32)]
    for loss, c in zip(losses, ([1, 0], [3, 2])):
        acc.add(loss, torch.tensor(c), 4)
    got = acc.read()
    assert len(acc) == 0 and [n for n, _, _ in got] == [4, 4]
    assert got[1][1] == [float(losses[1][0]), float(losses[1][1])] and got[1][2] == [3, 2]
    assert got[0][1][0] == float(losses[0][0]) and math.isnan(got[0][1][1])
    single = StepResults(1)
    single.add(torch.tensor(0.7, dtype=torch.bfloat16), 0, 1)  # a language-model run counts no correct
    assert single.read() == [(1, [float(torch.tensor(0.7, dtype=torch.bfloat16))], [0])]


def test_metrics_and_window_equal_a_per_step_loop(tmp_path: Path) -> None:
    cfg = tiny(train_window=150)
    summary = run_experiment(cfg, tmp_path / "run")
    rows, diverged, steps = reference(cfg)
    assert summary["status"] == "completed" and diverged is None
    assert train_rows(tmp_path / "run") == rows  # exactly: the same floats summed in the same order
    last = steps[-150:]
    assert summary["final_train_window"] == 150
    assert summary["final_train_loss"] == sum(loss for loss, _ in last) / 150
    assert summary["final_train_acc"] == sum(c for _, c in last) / 150


@pytest.mark.parametrize("kind", ["nan", "limit"])
def test_divergence_is_found_at_the_same_sample_inside_a_block(tmp_path: Path, kind: str) -> None:
    # float32 overflows to inf/NaN; float64 grows past the limit
    cfg = tiny(lr=40.0, eval_every=600, dtype="float32") if kind == "nan" else \
        tiny(lr=40.0, eval_every=600, method="pb", divergence_loss=50.0)
    rows, diverged, _ = reference(cfg)
    assert diverged is not None and diverged > 1 and diverged % BLOCK not in (0, BLOCK - 1)  # inside a block
    summary = run_experiment(cfg, tmp_path / kind)
    assert summary["status"] == "diverged" and summary["diverged_at"] == diverged
    assert summary["samples"] == diverged and train_rows(tmp_path / kind) == rows


def test_diverged_run_of_a_group_stops_counting_while_the_others_go_on(tmp_path: Path) -> None:
    configs = [tiny(method="pb", seed=s, lr=lr, divergence_loss=50.0) for s, lr in ((4, 0.05), (5, 40.0), (6, 0.02))]
    dirs = [tmp_path / f"run{k}" for k in range(3)]
    summaries = RunGroup(configs, dirs).setup().run()
    assert [s["status"] for s in summaries] == ["completed", "diverged", "completed"]
    for cfg, run_dir, summary in zip(configs, dirs, summaries):
        rows, diverged, _ = reference(cfg)
        assert summary["diverged_at"] == diverged
        got = train_rows(run_dir)
        assert [r[0] for r in got] == [r[0] for r in rows]  # batched runs equal separate ones to rounding
        for (_, loss, acc), (_, want_loss, want_acc) in zip(got, rows):
            assert loss == pytest.approx(want_loss, rel=0, abs=1e-9) and acc == want_acc
    assert 1 < summaries[1]["diverged_at"] < BLOCK - 1  # inside the first block


@pytest.mark.parametrize("batched", [False, True])
def test_at_most_one_host_read_per_block_of_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  count_host_reads: Callable[[], Any], batched: bool) -> None:
    """600 steps, evaluations at 0 and 600 only: the training steps read the device 3 times (after steps 256,
    512 and 600), where a read per step would be 600 or more. Evaluations and checkpoints may read."""
    cfg = tiny(eval_every=600, checkpoint_every=600)
    if batched:
        configs = [cfg, cfg.replace(seed=5, lr=0.02)]
        group = RunGroup(configs, [tmp_path / "a", tmp_path / "b"]).setup()
        counter = count_host_reads()
        monkeypatch.setattr(Runner, "_record", counter.paused(Runner._record))
        monkeypatch.setattr(group, "_save", counter.paused(group._save))
        monkeypatch.setattr(group.multi, "write_back", counter.paused(group.multi.write_back))
        statuses = [s["status"] for s in group.run()]
    else:
        runner = Runner(cfg, tmp_path / "run").setup()
        counter = count_host_reads()
        monkeypatch.setattr(Runner, "_record", counter.paused(Runner._record))
        monkeypatch.setattr(runner, "save", counter.paused(runner.save))
        statuses = [runner.run()["status"]]
    counter.on = False
    assert statuses == ["completed"] * len(statuses)
    assert 1 <= counter.reads <= math.ceil(600 / BLOCK), counter.reads
