"""Batched run groups (compare/reproduce --batch-runs): equal to the same runs done one by one, resumable
bit for bit, each run in its own complete run folder, and a notice when runs cannot be batched."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeprop.experiments import ExperimentConfig, Runner, run_experiment
from pipeprop.experiments.checkpoint import load_checkpoint
from pipeprop.experiments.compare import run_sweep
from pipeprop.experiments.run_group import RunGroup
from pipeprop.experiments.runner import RunDirError


def tiny(**kw) -> ExperimentConfig:
    base = dict(name="grp", model="mlp", model_options={"hidden": 16}, dataset="digits", method="pb+sc+lwp",
                batch_size=16, lr=0.1, momentum=0.9, samples=120, eval_every=40, checkpoint_every=40,
                test_subset=100, progress=False, dtype="float64", weight_decay=1e-3, schedule="step",
                milestones=[0.05])
    base.update(kw)
    return ExperimentConfig(**base)


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoint.pt")["model"]


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


def assert_close_metrics(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) and len(a) >= 3
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            if isinstance(ra[k], float):
                assert math.isclose(ra[k], rb[k], rel_tol=0, abs_tol=1e-9), (k, ra[k], rb[k])
            else:
                assert ra[k] == rb[k], k


@pytest.mark.parametrize("method", ["pb", "pb+sc+lwp"])
def test_batched_group_equals_the_runs_done_one_by_one(tmp_path: Path, method: str) -> None:
    configs = [tiny(method=method, seed=0, lr=0.1), tiny(method=method, seed=1, lr=0.05), tiny(method=method, seed=2, lr=0.2)]
    dirs = [tmp_path / "group" / f"run{k}" for k in range(3)]
    summaries = RunGroup(configs, dirs).setup().run()
    assert [s["status"] for s in summaries] == ["completed"] * 3
    for k, cfg in enumerate(configs):
        alone = tmp_path / "alone" / f"run{k}"
        ref = run_experiment(cfg, alone)
        # each batched run folder has the files of a run done alone
        assert sorted(p.name for p in dirs[k].iterdir()) == sorted(p.name for p in alone.iterdir())
        a, b = final_state(dirs[k]), final_state(alone)
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-9)
        assert_close_metrics(metrics(dirs[k]), metrics(alone))
        assert summaries[k]["samples"] == ref["samples"] and summaries[k]["lr"] == ref["lr"]
        assert json.loads((dirs[k] / "config.json").read_text())["config"]["seed"] == cfg.seed
    # the runs really differ (seeds, data orders, learning rates)
    w0, w1 = final_state(dirs[0]), final_state(dirs[1])
    assert any(not torch.allclose(w0[n], w1[n]) for n in w0)


def test_batched_group_resumes_bit_exactly(tmp_path: Path) -> None:
    configs = [tiny(seed=0, lr=0.1), tiny(seed=1, lr=0.05)]
    full = [tmp_path / "full" / f"s{k}" for k in range(2)]
    split = [tmp_path / "split" / f"s{k}" for k in range(2)]
    RunGroup(configs, full).setup().run()
    stopped = RunGroup(configs, split).setup().run(stop_after_steps=53)  # between two checkpoints
    assert [s["status"] for s in stopped] == ["stopped", "stopped"] and stopped[0]["samples"] == 53
    resumed = RunGroup(configs, split).setup().run(resume=True)
    assert [s["status"] for s in resumed] == ["completed", "completed"]
    for a_dir, b_dir in zip(full, split):
        a, b = final_state(a_dir), final_state(b_dir)
        assert all(torch.equal(a[n], b[n]) for n in a)
        assert metrics(a_dir) == metrics(b_dir)
    # a run checkpointed in a group is not resumed alone by mistake
    with pytest.raises(RunDirError, match="batched group"):
        Runner(configs[0], tmp_path / "x").setup().load_state_dict(load_checkpoint(split[0] / "checkpoint.pt"))


def test_sweep_batches_seeds_and_resumes_a_stopped_group(tmp_path: Path) -> None:
    cfg = tiny(methods=["pb", "pb+sc+lwp"], seeds=[0, 1])
    lines: list[str] = []
    batched, _ = run_sweep(cfg, tmp_path / "b", batch_runs=2, echo=lines.append)
    assert sum("2 runs batched" in line for line in lines) == 2
    single, _ = run_sweep(cfg, tmp_path / "s", batch_runs=1, echo=lambda s: None)
    for a, b in zip(batched, single):
        assert a["status"] == b["status"] == "completed"
        assert math.isclose(a["final_test_loss"], b["final_test_loss"], abs_tol=1e-9)
    # a group stopped part-way resumes batched from the sweep (and then equals the uninterrupted one)
    stop_dirs = [tmp_path / "r" / "pb" / f"seed{s}" for s in (0, 1)]
    RunGroup([cfg.replace(method="pb", seed=s) for s in (0, 1)], stop_dirs).setup().run(stop_after_steps=30)
    lines.clear()
    resumed, _ = run_sweep(cfg.replace(methods=["pb"]), tmp_path / "r", batch_runs=2, echo=lines.append)
    assert any("batched (resuming)" in line for line in lines)
    for s in (0, 1):
        a, b = final_state(stop_dirs[s]), final_state(tmp_path / "b" / "pb" / f"seed{s}")
        assert all(torch.equal(a[n], b[n]) for n in a)


class DropoutMLP(nn.Sequential):
    def __init__(self, num_classes: int = 10, in_features: int = 64, hidden: int = 16) -> None:
        super().__init__(nn.Flatten(), nn.Linear(in_features, hidden), nn.Dropout(0.2), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


def test_runs_that_cannot_be_batched_run_one_by_one_with_a_notice(tmp_path: Path) -> None:
    cfg = tiny(methods=["pb"], seeds=[0, 1], samples=40)
    lines: list[str] = []
    summaries, _ = run_sweep(cfg, tmp_path / "d", batch_runs=2, model_factory=DropoutMLP, echo=lines.append)
    assert [s["status"] for s in summaries] == ["completed", "completed"]
    assert sum(line.startswith("notice:") and "dropout" in line for line in lines) == 1
    lines.clear()
    run_sweep(cfg.replace(methods=["pb+ab"]), tmp_path / "ab", batch_runs=2,
              echo=lines.append)
    assert sum(line.startswith("notice:") and "stacked runs" in line for line in lines) == 1


def test_a_diverging_run_stops_alone_and_leaves_the_others_untouched(tmp_path: Path) -> None:
    configs = [tiny(method="pb", seed=0, lr=0.1), tiny(method="pb", seed=1, lr=1e6)]
    dirs = [tmp_path / "g0", tmp_path / "g1"]
    summaries = RunGroup(configs, dirs).setup().run()
    alone = [run_experiment(c, tmp_path / f"a{k}") for k, c in enumerate(configs)]
    assert [s["status"] for s in summaries] == [s["status"] for s in alone] == ["completed", "diverged"]
    assert summaries[1]["diverged_at"] == alone[1]["diverged_at"]
    a, b = final_state(dirs[0]), final_state(tmp_path / "a0")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-9)
    assert_close_metrics(metrics(dirs[0]), metrics(tmp_path / "a0"))


def test_default_leaves_groups_unbatched_where_batching_is_slower(tmp_path: Path) -> None:
    """Two seeds of an MLP (batching pays from 4 runs of linear layers) run one by one by default, with a notice
    naming --batch-runs; an explicit batch_runs batches them; each then resumes as it started."""
    cfg = tiny(methods=["pb"], seeds=[0, 1], samples=40)
    lines: list[str] = []
    summaries, _ = run_sweep(cfg, tmp_path / "d", echo=lines.append)
    assert [s["status"] for s in summaries] == ["completed", "completed"]
    notices = [line for line in lines if line.startswith("notice:")]
    assert len(notices) == 1 and "not batched" in notices[0] and "--batch-runs 2" in notices[0]
    assert not any("runs batched" in line for line in lines)
    assert not any("batched" in load_checkpoint(tmp_path / "d" / "pb" / f"seed{s}" / "checkpoint.pt") for s in (0, 1))
    lines.clear()
    run_sweep(cfg, tmp_path / "f", batch_runs=2, echo=lines.append)
    assert any("2 runs batched" in line for line in lines) and not any(line.startswith("notice:") for line in lines)


def test_two_named_experiments_differing_in_lr_share_one_group(tmp_path: Path) -> None:
    """`pipeprop reproduce A B`: runs of two experiments that differ only in name, description, lr and seed are
    one batched group; each experiment keeps its folder and report, and each run equals the same run done alone."""
    from pipeprop.experiments.compare import run_sweeps

    first = tiny(name="grp-a", description="reference lr", methods=["pb+sc+lwp"], seeds=[0, 1])
    second = tiny(name="grp-b", description="twice the lr", methods=["pb+sc+lwp"], seeds=[0, 1], lr=0.2)
    said: list[str] = []
    results = run_sweeps([(first, tmp_path / "a"), (second, tmp_path / "b")], batch_runs=4, echo=said.append)
    assert any("4 runs batched" in line for line in said), said
    for (summaries, paths), cfg, folder in zip(results, (first, second), ("a", "b")):
        assert [s["status"] for s in summaries] == ["completed", "completed"]
        assert paths["table"].parent == tmp_path / folder and cfg.name in paths["table"].read_text()
        for seed in (0, 1):
            run_dir = tmp_path / folder / "pb+sc+lwp" / f"seed{seed}"
            stored = json.loads((run_dir / "config.json").read_text())["config"]
            assert (stored["name"], stored["lr"], stored["seed"]) == (cfg.name, cfg.lr, seed)
            alone = tmp_path / "alone" / folder / f"seed{seed}"
            run_experiment(cfg.replace(method="pb+sc+lwp", seed=seed), alone)
            a, b = final_state(run_dir), final_state(alone)
            for name in a:
                torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-9)
