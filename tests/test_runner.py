"""The experiment runner: bit-exact resume, reference SGD, divergence, checkpoints, schedules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeprop.data import MicroBatchStream, load_digits
from pipeprop.experiments import ExperimentConfig, Runner, run_experiment
from pipeprop.experiments.checkpoint import CheckpointError
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
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


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


def test_corrupt_checkpoint_gives_clear_error(tmp_path: Path) -> None:
    cfg = tiny(samples=60)
    run_experiment(cfg, tmp_path / "r", stop_after_steps=30)
    ckpt = tmp_path / "r" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:500])  # truncated
    with pytest.raises(CheckpointError, match="corrupt or truncated.*Delete it"):
        Runner(cfg, tmp_path / "r").setup().run(resume=True)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        Runner(cfg, tmp_path / "r").setup().run(resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Runner(cfg, tmp_path / "empty").setup().run(resume=True)


def test_resume_with_other_config_and_reuse_of_run_dir_are_refused(tmp_path: Path) -> None:
    cfg = tiny(samples=60)
    run_experiment(cfg, tmp_path / "r", stop_after_steps=10)
    with pytest.raises(CheckpointError, match="lr: checkpoint 0.1 vs now 0.2"):
        Runner(cfg.replace(lr=0.2), tmp_path / "r").setup().run(resume=True)
    with pytest.raises(RunDirError, match="--resume"):
        run_experiment(cfg, tmp_path / "r")
    assert run_experiment(cfg, tmp_path / "r", overwrite=True)["status"] == "completed"


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
