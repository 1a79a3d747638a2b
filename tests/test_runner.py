"""The experiment runner: bit-exact resume, reference SGD, divergence, checkpoints, schedules, run folders,
typed config, honest reporting, experiment tracking."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeprop.data import MicroBatchStream, load_digits
from pipeprop.experiments import ExperimentConfig, Runner, run_experiment
from pipeprop.experiments.checkpoint import CheckpointError, load_checkpoint
from pipeprop.experiments.config import ConfigError, load_config, parse_override
from pipeprop.experiments.lr_schedule import lr_factor
from pipeprop.experiments.runner import RunDirError
from pipeprop.models import get as get_model
from pipeprop.scaling import ScaledRecipe


def tiny(**kw) -> ExperimentConfig:
    base = dict(name="tiny", model="mlp", model_options={"hidden": 16}, dataset="digits", method="pb+sc+lwp",
                batch_size=16, lr=0.1, momentum=0.9, samples=300, eval_every=60, checkpoint_every=60,
                test_subset=200, progress=False)
    base.update(kw)
    return ExperimentConfig(**base)


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoint.pt")["model"]


def metrics_without_time(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


def test_stopped_run_resumes_to_identical_weights_and_metrics(tmp_path: Path) -> None:
    cfg = tiny(augment=False, weight_decay=1e-3, schedule="step", milestones=[0.1], warmup_epochs=0.05)
    full = run_experiment(cfg, tmp_path / "full")
    assert full["status"] == "completed" and full["samples"] == 300
    # stop between two checkpoints (after 130 of 300 steps), then resume in a fresh Runner
    stopped = run_experiment(cfg, tmp_path / "split", stop_after_steps=130)
    assert stopped["status"] == "stopped" and stopped["samples"] == 130
    resumed = Runner(cfg, tmp_path / "split").setup().run(resume=True)
    assert resumed["status"] == "completed"
    a, b = final_state(tmp_path / "full"), final_state(tmp_path / "split")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert metrics_without_time(tmp_path / "full") == metrics_without_time(tmp_path / "split")
    # the run trained: the weights moved from their initialization
    torch.manual_seed(cfg.seed)
    init = get_model("mlp", hidden=16, num_classes=10, in_features=64).state_dict()
    assert any(not torch.equal(init[k], a[k]) for k in a)


def test_resumed_run_with_augmentation_is_identical(tmp_path: Path) -> None:
    cfg = tiny(augment=True, method="pb", samples=200, eval_every=50, checkpoint_every=1000)
    run_experiment(cfg, tmp_path / "full")
    run_experiment(cfg, tmp_path / "split", stop_after_steps=77)
    Runner(cfg, tmp_path / "split").setup().run(resume=True)
    a, b = final_state(tmp_path / "full"), final_state(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics_without_time(tmp_path / "full") == metrics_without_time(tmp_path / "split")


def test_reference_sgd_at_batch_b_equals_plain_torch_sgd(tmp_path: Path) -> None:
    cfg = tiny(method="sgd", micro_batch=32, batch_size=32, lr=0.05, momentum=0.9, weight_decay=1e-3,
               samples=320, schedule="constant", test_subset=None)
    summary = run_experiment(cfg, tmp_path / "sgd")
    assert summary["lr"] == 0.05 and summary["momentum"] == 0.9  # B == b: the recipe is used unchanged
    # independent reference: torch.optim.SGD over the same batches
    torch.manual_seed(cfg.seed)
    model = get_model("mlp", hidden=16, num_classes=10, in_features=64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    data = load_digits()
    for x, y in MicroBatchStream(data, batch_size=32, epochs=10 / (len(data.train) // 32), seed=cfg.seed):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    got = final_state(tmp_path / "sgd")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)
    # the recorded final test accuracy is that of these weights
    with torch.no_grad():
        acc = (model(data.normalize(data.test.images)).argmax(1) == data.test.labels).float().mean().item()
    assert summary["final_test_acc"] == pytest.approx(acc, abs=1e-6)


def test_divergence_ends_with_status_not_traceback(tmp_path: Path) -> None:
    cfg = tiny(method="pb", micro_batch=1, batch_size=1, lr=50.0, momentum=0.9, samples=200, rule="linear")
    summary = run_experiment(cfg, tmp_path / "div")
    assert summary["status"] == "diverged"
    assert summary["diverged_at"] is not None and summary["diverged_at"] < 200
    assert json.loads((tmp_path / "div" / "summary.json").read_text())["status"] == "diverged"
    assert (tmp_path / "div" / "curves.png").is_file()


def test_divergence_threshold(tmp_path: Path) -> None:
    summary = run_experiment(tiny(divergence_loss=0.01, samples=100), tmp_path / "thr")
    assert summary["status"] == "diverged" and summary["diverged_at"] == 1


def test_damaged_checkpoint_gives_clear_error(tmp_path: Path) -> None:
    cfg = tiny(samples=60)
    run_experiment(cfg, tmp_path / "r", stop_after_steps=30)
    ckpt = tmp_path / "r" / "checkpoint.pt"
    intact = ckpt.read_bytes()
    flipped = bytearray(intact)
    flipped[len(intact) // 2] ^= 0x01  # one bit inside the weights
    zeroed = bytearray(intact)
    zeroed[-4096:-2048] = bytes(2048)
    for damaged in (bytes(flipped), bytes(zeroed), intact[:500], b"not a checkpoint"):
        ckpt.write_bytes(damaged)
        with pytest.raises(CheckpointError, match=rf"checkpoint {ckpt} is damaged.*--overwrite"):
            Runner(cfg, tmp_path / "r").setup().run(resume=True)
    ckpt.write_bytes(intact)
    assert Runner(cfg, tmp_path / "r").setup().run(resume=True)["status"] == "completed"
    with pytest.raises(RunDirError, match="holds no run"):
        Runner(cfg, tmp_path / "empty").setup().run(resume=True)


def test_run_folder_with_another_config_is_refused_naming_the_keys(tmp_path: Path) -> None:
    cfg = tiny(samples=60)
    run_experiment(cfg, tmp_path / "r", stop_after_steps=10)
    with pytest.raises(RunDirError, match=r"different config \(lr: 0.2 vs 0.1 stored\).*--overwrite.*--out"):
        Runner(cfg.replace(lr=0.2), tmp_path / "r").setup().run(resume=True)
    with pytest.raises(RunDirError, match=r"samples: 80 vs 60 stored.*--overwrite"):
        run_experiment(cfg.replace(samples=80), tmp_path / "r")
    with pytest.raises(RunDirError, match="--resume"):
        run_experiment(cfg, tmp_path / "r")
    # settings that do not change results (progress bar, threads, logger) may differ
    assert run_experiment(cfg.replace(progress=True, num_threads=1), tmp_path / "r", resume=True)["status"] == "completed"
    assert run_experiment(cfg.replace(lr=0.2), tmp_path / "r", overwrite=True)["lr"] == pytest.approx(_lr(0.2))
    # a folder holding files of some other program's run is not written into
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "result.json").write_text("{}")
    with pytest.raises(RunDirError, match="holds files of another run"):
        run_experiment(cfg, tmp_path / "other")


def _lr(lr: float) -> float:
    from pipeprop.scaling import scale_hparams

    return scale_hparams(lr, 0.9, 16, 1)[0]


def test_sweep_reuses_only_runs_of_the_same_config(tmp_path: Path) -> None:
    from pipeprop.experiments.compare import run_sweep

    cfg = tiny(samples=40, methods=["pb"], seeds=[0], name="sw")
    summaries, _ = run_sweep(cfg, tmp_path / "cmp", echo=lambda s: None)
    again, _ = run_sweep(cfg.replace(progress=True), tmp_path / "cmp", echo=lambda s: None)
    assert again == summaries
    with pytest.raises(RunDirError, match=r"lr: 0.05 vs 0.1 stored"):
        run_sweep(cfg.replace(lr=0.05), tmp_path / "cmp", echo=lambda s: None)
    new, _ = run_sweep(cfg.replace(lr=0.05), tmp_path / "cmp", overwrite=True, echo=lambda s: None)
    assert new[0]["lr"] != summaries[0]["lr"]


def test_killed_write_leaves_no_temporary_files_and_files_follow_the_umask(tmp_path: Path) -> None:
    import os

    run = tmp_path / "r"
    run_experiment(tiny(samples=40), run, stop_after_steps=5)
    stale = run / ".checkpoint.pt.abc123.tmp"  # what a SIGKILL during a checkpoint write leaves behind
    stale.write_bytes(b"partial")
    old = os.umask(0o022)
    try:
        run_experiment(tiny(samples=40), run, resume=True)
    finally:
        os.umask(old)
    assert not stale.exists()
    for name in ("checkpoint.pt", "config.json", "metrics.jsonl", "summary.json"):
        assert (run / name).stat().st_mode & 0o777 == 0o644, name


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("lr", "fast", r"lr = 'fast': Input should be a valid number"),
        ("seed", 1.5, r"seed = 1.5: Input should be a valid integer"),
        ("augment", "maybe", r"augment = 'maybe': Input should be a valid boolean"),
        ("momentum", 1.5, r"momentum = 1.5: Input should be less than 1"),
        ("schedule", "exp", r"schedule = 'exp': allowed: 'step', 'cosine' or 'constant'"),
        ("partition", "rows", r"partition = 'rows': use 'layer', 'block' or a number of stages"),
        ("micro_batch", 0, r"micro_batch = 0: Input should be greater than or equal to 1"),
        ("method", "warp", r"method = 'warp': unknown method 'warp'; choose one of: sgd, pb"),
        ("model", "resnet7", r"model = 'resnet7': unknown model; choose one of mlp"),
        ("betas", [0.9, 1.2], r"betas = \[0.9, 1.2\]: both betas must lie in \[0, 1\)"),
        ("learning_rate", 0.1, r"unknown config key 'learning_rate'"),
        ("assignment", "timed", r"assignment = 'timed': use one of flops, params, uniform, measured or stages"),
    ],
)
def test_wrong_config_values_name_key_value_and_choices(tmp_path: Path, key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):  # Python API
        ExperimentConfig(**{key: value})
    toml = tmp_path / "c.toml"
    toml.write_text(f"[recipe]\n{key} = {json.dumps(value)}\n")
    with pytest.raises(ConfigError, match=message):  # TOML (in a table)
        load_config(toml)
    text = value if isinstance(value, str) else json.dumps(value)
    with pytest.raises(ConfigError, match=message):  # --set
        load_config(None, [parse_override(f"{key}={text}")])


def test_method_names_are_canonical_and_set_values_parse() -> None:
    cfg = load_config(None, [parse_override(s) for s in ("method=SC", "methods=plain,lwp+sc@4", "milestones=1,2.5",
                                                          "partition=3", "norm=none", "augment=yes")])
    assert cfg.method == "pb+sc" and cfg.methods == ["sgd", "pb+sc+lwp@4"]
    assert cfg.milestones == [1.0, 2.5] and cfg.partition == 3 and cfg.norm == "none" and cfg.augment is True


def test_other_optimizers_are_refused_until_the_engines_take_them(tmp_path: Path) -> None:
    import inspect

    from pipeprop import build_simulator

    cfg = tiny(samples=20, optimizer="adamw", betas=[0.8, 0.9])
    assert cfg.betas == (0.8, 0.9) and cfg.eps == 1e-8
    if "optimizer" in inspect.signature(build_simulator).parameters:
        assert run_experiment(cfg, tmp_path / "a")["optimizer"] == "adamw"
    else:
        with pytest.raises(ConfigError, match="optimizer = 'adamw' is not available yet"):
            run_experiment(cfg, tmp_path / "a")


def test_default_evaluation_is_bounded_and_final_train_numbers_cover_a_stated_window(tmp_path: Path) -> None:
    cfg = tiny(samples=20, eval_every=None, checkpoint_every=None)
    summary = run_experiment(cfg, tmp_path / "short")
    rows = metrics_without_time(tmp_path / "short")
    assert [r["samples"] for r in rows] == [0, 20]  # short runs: at the start and at the end only
    assert summary["evaluations"] == 2 and summary["final_train_window"] == 20
    long = ExperimentConfig(samples=100_000)
    assert long.eval_interval(100_000) == 5000 and ExperimentConfig().eval_interval(3000) == 1000
    # the final train loss is the mean over the last `train_window` samples, whatever the evaluation grid
    cfg = tiny(samples=70, eval_every=30, train_window=25, method="pb")
    summary = run_experiment(cfg, tmp_path / "w")
    torch.manual_seed(cfg.seed)
    data = load_digits()
    model = get_model("mlp", hidden=16, num_classes=10, in_features=64)
    from pipeprop import build_simulator
    from pipeprop.scaling import scale_hparams

    lr, m = scale_hparams(0.1, 0.9, 16, 1)
    sim = build_simulator(model, F.cross_entropy, method="pb", lr=lr, momentum=m)
    losses = [sim.step(x, y) for x, y in MicroBatchStream(data, batch_size=1, epochs=70 / len(data.train), seed=0)][:70]
    assert summary["final_train_window"] == 25
    assert summary["final_train_loss"] == pytest.approx(sum(losses[-25:]) / 25, rel=1e-6)


def test_report_separates_statuses_and_spreads_only_completed_runs(tmp_path: Path) -> None:
    from pipeprop.experiments.report import aggregate, collect_runs, format_table

    root = tmp_path / "runs"
    base = tiny(samples=20, name="st")
    for seed in (0, 1):
        run_experiment(base.replace(seed=seed), root / f"done{seed}")
    run_experiment(base.replace(seed=2), root / "stopped", stop_after_steps=5)
    run_experiment(base.replace(seed=3), root / "killed", stop_after_steps=5)
    (root / "killed" / "summary.json").unlink()  # what a SIGKILL leaves: config and checkpoint, no summary
    run_experiment(base.replace(seed=4, lr=1e4, rule="linear", method="pb"), root / "div")
    rows = {r["method"]: r for r in aggregate(collect_runs(root))}
    row = rows["pb+sc+lwp"]
    assert (row["completed"], row["interrupted"], row["killed"], row["diverged"]) == (2, 1, 1, 0)
    accs = [json.loads((root / f"done{s}" / "summary.json").read_text())["final_test_acc"] for s in (0, 1)]
    assert row["final_test_acc_mean"] == pytest.approx(sum(accs) / 2)
    assert rows["pb"]["diverged"] == 1 and rows["pb"]["final_test_acc_mean"] is None
    table = format_table(list(rows.values()))
    assert "| 2 | 1 | 1 | 0 |" in table


def test_tensorboard_logger_writes_events_read_back_by_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_experiment(tiny(samples=60, eval_every=20, logger="tensorboard"), tmp_path / "tb")
    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()
    rows = metrics_without_time(tmp_path / "tb")
    events = acc.Scalars("test_acc")
    assert [e.step for e in events] == [r["samples"] for r in rows]
    assert [e.value for e in events] == pytest.approx([r["test_acc"] for r in rows])


def _recipe(schedule: str) -> ScaledRecipe:
    return ScaledRecipe(batch_size=1, lr=1.0, momentum=0.0, weight_decay=0.0, rule="momentum", from_batch=1,
                        total_samples=1000, warmup_samples=100, milestone_samples=[500, 800], gamma=0.1, schedule=schedule)


def test_lr_factor_by_hand() -> None:
    step = _recipe("step")
    assert [lr_factor(s, step) for s in (0, 50, 100, 500, 501, 800, 801)] == pytest.approx([0, 0.5, 1, 1, 0.1, 0.1, 0.01])
    cos = _recipe("cosine")
    assert lr_factor(550, cos) == pytest.approx(0.5)  # halfway through the 900 post-warm-up samples
    assert lr_factor(325, cos) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(1000, cos) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(700, _recipe("constant")) == 1.0


def test_runner_applies_the_schedule_in_samples(tmp_path: Path) -> None:
    # b=2, 200 samples, warm-up 0.04 epochs of 1348 = 54 samples, decay x0.1 after 100 samples
    cfg = tiny(micro_batch=2, batch_size=2, momentum=0.0, lr=0.01, samples=200, eval_every=40, warmup_epochs=54 / 1348,
               milestones=[100 / 1348], schedule="step", method="sgd")
    run_experiment(cfg, tmp_path / "s")
    lrs = {m["samples"]: m["lr"] for m in metrics_without_time(tmp_path / "s")}
    # the lr in a record is the one for the *next* step (samples s..s+1): factor((s + 2) samples)
    assert lrs[40] == pytest.approx(0.01 * 42 / 54)
    assert lrs[80] == pytest.approx(0.01)
    assert lrs[120] == pytest.approx(0.001)


@pytest.mark.parametrize("method", [m for m in __import__("pipeprop").available_methods()
                                    if m != "sgd" and "sgd" in __import__("pipeprop").get_method(m).optimizers])
def test_every_method_resumes_bit_exactly(tmp_path: Path, method: str) -> None:
    cfg = tiny(method=method, samples=60, eval_every=30, checkpoint_every=1000, test_subset=50, weight_decay=1e-4)
    run_experiment(cfg, tmp_path / "full")
    run_experiment(cfg, tmp_path / "split", stop_after_steps=23)
    assert Runner(cfg, tmp_path / "split").setup().run(resume=True)["status"] == "completed"
    a, b = final_state(tmp_path / "full"), final_state(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a), method
    assert metrics_without_time(tmp_path / "full") == metrics_without_time(tmp_path / "split")


def test_lr_schedule_scales_each_update_by_the_stage_update_count() -> None:
    """Closed form: plain SGD (no momentum) with schedule f gives w_k+1 = w_k - lr f(k) g_k."""
    import pipeprop

    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = pipeprop.PipelineSGD([{"params": [w], "delay": 0}], lr=0.1)
    opt.set_lr_schedule(lambda k: 1.0 / (k + 1))
    expected = w.detach().clone()
    for k in range(4):
        g = torch.tensor([0.5, 1.5], dtype=torch.float64) * (k + 1)
        w.grad = g.clone()
        opt.step()
        expected -= 0.1 / (k + 1) * g
    assert torch.equal(w.detach(), expected)
    state = opt.state_dict()
    assert state["param_groups"][0]["updates"] == 4 and state["param_groups"][0]["lr"] == 0.1
    fresh = pipeprop.PipelineSGD([{"params": [w], "delay": 0}], lr=0.1)
    fresh.set_lr_schedule(lambda k: 1.0 / (k + 1))
    fresh.load_state_dict(state)
    assert fresh._group_lr(fresh.param_groups[0]) == pytest.approx(0.1 / 5)
