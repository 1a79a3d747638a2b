"""The experiment commands: scale, train, compare, reproduce, report (click's CliRunner and one subprocess)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeprop.cli import main
from pipeprop.experiments import load_config, run_experiment
from pipeprop.experiments.checkpoint import load_checkpoint

TINY = ["--model", "mlp", "--set", 'model_options={"hidden": 16}', "--dataset", "digits", "--batch-size", "16",
        "--lr", "0.1", "--momentum", "0.9", "--test-subset", "200", "--no-progress"]


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _number(output: str, label: str) -> list[float]:
    line = next(l for l in output.splitlines() if l.startswith(label))
    return [float(v) for v in re.findall(r"[-+]?\d*\.?\d+(?:e[-+]?\d+)?", line.split(":", 1)[1])]


def test_scale_prints_the_hand_computed_numbers() -> None:
    res = invoke("scale", "--from-batch", "128", "--lr", "0.1", "--momentum", "0.9", "--to-batch", "1")
    assert res.exit_code == 0, res.output
    assert _number(res.output, "learning rate")[1] == pytest.approx(6.42805e-6, rel=1e-5)
    assert _number(res.output, "momentum")[1] == pytest.approx(0.9991772, abs=1e-6)
    lin = invoke("scale", "--from-batch", "128", "--lr", "0.1", "--momentum", "0.9", "--to-batch", "1", "--rule", "linear", "--json")
    data = json.loads(lin.output)
    assert data["lr"] == pytest.approx(0.1 / 128) and data["momentum"] == 0.9
    sched = invoke("scale", "--from-batch", "128", "--lr", "0.1", "--to-batch", "1", "--epochs", "164",
                   "--milestones", "82,123", "--dataset-size", "50000")
    assert "8,200,000 samples" in sched.output and "4,100,000, 6,150,000 samples" in sched.output
    bad = invoke("scale", "--from-batch", "128", "--lr", "0.1", "--momentum", "1.0", "--to-batch", "1")
    assert bad.exit_code != 0 and "momentum must lie in [0, 1)" in bad.output


def test_compare_on_digits_writes_table_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    res = invoke("compare", *TINY, "--samples", "160", "--methods", "sgd,pb,pb+sc+lwp,pipemare", "--seeds", "2x",
                 "--out", str(out))
    assert res.exit_code == 0, res.output
    table = (out / "results.md").read_text()
    for method, b in (("sgd", 16), ("pb", 1), ("pb+sc+lwp", 1), ("pipemare", 1)):
        assert re.search(rf"\| {re.escape(method)} \| {b} \| 2 \| 0 \| 0 \| 0 \| \d+\.\d\d ± \d+\.\d\d", table), (method, table)
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (out / "pb+sc+lwp").iterdir()) == ["seed0", "seed1"]
    rows = json.loads((out / "results.json").read_text())["rows"]
    # the table's mean is the mean of the per-seed summaries
    accs = [json.loads((out / "pb" / f"seed{s}" / "summary.json").read_text())["final_test_acc"] for s in (0, 1)]
    assert next(r for r in rows if r["method"] == "pb")["final_test_acc_mean"] == pytest.approx(sum(accs) / 2)
    # rerunning reuses the finished runs; rerunning with another setting is refused, naming the keys
    again = invoke("compare", *TINY, "--samples", "160", "--methods", "pb", "--seeds", "0", "--out", str(out))
    assert "reusing" in again.output
    other = invoke("compare", *TINY, "--samples", "160", "--lr", "0.05", "--methods", "pb", "--seeds", "0", "--out", str(out))
    assert other.exit_code == 1 and "lr: 0.05 vs 0.1 stored" in other.output and "--overwrite" in other.output
    # report rebuilds the table from the run directories
    rep = invoke("report", str(out), "--out", str(tmp_path / "rep"))
    assert rep.exit_code == 0 and (tmp_path / "rep" / "results.md").read_text().count("| cli |") == 0
    assert "pipemare" in (tmp_path / "rep" / "results.md").read_text()


def test_unknown_method_and_key_are_clear_errors(tmp_path: Path) -> None:
    res = invoke("compare", *TINY, "--methods", "pb,warp-drive", "--out", str(tmp_path / "x"))
    assert res.exit_code == 1 and "unknown method 'warp-drive'" in res.output and "pb+sc+lwp" in res.output
    res = invoke("train", *TINY, "--set", "learning_rate=0.1", "--out", str(tmp_path / "y"))
    assert res.exit_code == 1 and "unknown config key 'learning_rate'" in res.output


def test_train_divergence_exit_code_and_summary(tmp_path: Path) -> None:
    res = invoke("train", *TINY, "--method", "pb", "--batch-size", "1", "--lr", "50", "--rule", "linear",
                 "--samples", "200", "--out", str(tmp_path / "d"))
    assert res.exit_code == 3
    assert json.loads((tmp_path / "d" / "summary.json").read_text())["status"] == "diverged"
    assert "Traceback" not in res.output


def test_train_resume_after_corruption_is_a_clear_error(tmp_path: Path) -> None:
    run = tmp_path / "r"
    assert invoke("train", *TINY, "--samples", "40", "--out", str(run)).exit_code == 0
    (run / "checkpoint.pt").write_bytes(b"garbage")
    res = invoke("train", "--out", str(run), "--resume")
    assert res.exit_code == 1 and f"checkpoint {run / 'checkpoint.pt'} is damaged" in res.output


def test_wrong_types_from_the_command_line_name_the_key(tmp_path: Path) -> None:
    for args, message in ((["--set", "weight_decay=fast"], "weight_decay = 'fast': Input should be a valid number"),
                          (["--set", "seed=1.5"], "seed = 1.5: Input should be a valid integer"),
                          (["--set", "augment=maybe"], "augment = 'maybe': Input should be a valid boolean"),
                          (["--partition", "rows"], "partition = 'rows': use 'layer', 'block'")):
        res = invoke("train", *TINY, *args, "--samples", "8", "--out", str(tmp_path / "x"))
        assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output, res.output


PAPER_NETWORKS = [f"cifar10-{n}" for n in ("vgg11", "vgg13", "vgg16", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110")]
PAPER_NETWORKS += ["imagenet-resnet50", "cifar10-resnet20-baselines"]


def test_reproduce_list_shows_every_paper_experiment_at_both_scales() -> None:
    res = invoke("reproduce", "--list", "--no-estimate")
    assert res.exit_code == 0, res.output
    lines = {l.split()[0]: l.split()[1] for l in res.output.splitlines() if l and not l.startswith(("name", " "))
             and len(l.split()) > 2}
    for name in PAPER_NETWORKS:
        assert lines.get(name) == "paper", name
        assert lines.get(f"{name}-budget") == "budget", name
    for name in PAPER_NETWORKS:
        cfg = load_config(name)
        assert "pb+sc+lwp" in cfg.methods and "pb" in cfg.methods
        assert cfg.micro_batch == 1 and cfg.device == "cuda"
        if "baselines" not in name:
            assert "sgd" in cfg.methods and cfg.sgd_batch == "reference"  # SGD at its original batch size


def test_reproduce_list_estimates_cost() -> None:
    from pipeprop.experiments.cost import count_macs, estimate_cost

    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    assert count_macs(lin, (1, 8, 8)) == 640
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1))
    assert count_macs(conv, (3, 8, 8)) == 8 * 8 * 4 * 3 * 9
    cost = estimate_cost(load_config("cifar10-resnet20-budget"))
    cfg = load_config("cifar10-resnet20-budget")
    assert cost.runs == len(cfg.methods) * len(cfg.seeds)
    # 4 PB methods x 2 seeds x 13000 samples, plus SGD at B=128: 13000 cut to whole batches (12928) x 2 seeds
    assert cfg.samples == 13000 and cost.samples == 8 * 13000 + 2 * 12928
    assert cost.stages == 20 and cost.seconds is not None and cost.seconds > 0


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_identically(tmp_path: Path) -> None:
    run = tmp_path / "sig"
    args = [*TINY, "--method", "pb+sc+lwp", "--samples", "2400", "--eval-every", "200"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    code = "import sys, torch; torch.set_num_threads(1); from pipeprop.cli import main; sys.exit(main())"
    proc = subprocess.Popen([sys.executable, "-c", code, "train", *args, "--out", str(run)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    summary = json.loads((run / "summary.json").read_text())
    if summary["status"] == "completed":  # the run was faster than the signal: nothing to test here
        pytest.skip("run finished before the signal arrived")
    assert proc.returncode == 130, err
    assert summary["status"] == "interrupted" and 0 < summary["samples"] < 2400
    assert "--resume" in err and "Traceback" not in err
    res = invoke("train", "--out", str(run), "--resume", "--no-progress")
    assert res.exit_code == 0, res.output
    # the same run without interruption, in process
    ref = run_experiment(load_config(run / "config.json").replace(progress=False), tmp_path / "ref")
    assert ref["status"] == "completed"
    a = load_checkpoint(run / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "ref" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if k != "time"} for l in p.read_text().splitlines()]  # noqa: E731
    assert strip(run / "metrics.jsonl") == strip(tmp_path / "ref" / "metrics.jsonl")


RESIDUAL_MODULE = '''
import torch
from torch import nn


class ResMLP(nn.Module):
    def __init__(self, in_features, num_classes):
        super().__init__()
        self.inp, self.hidden, self.out = nn.Linear(in_features, 16), nn.Linear(16, 16), nn.Linear(16, num_classes)

    def forward(self, x):
        h = torch.relu(self.inp(x.flatten(1)))
        h = h + torch.relu(self.hidden(h))
        return self.out(h)


def build(image_shape, num_classes):
    c, h, w = image_shape
    return ResMLP(c * h * w, num_classes)
'''


def test_train_takes_a_non_sequential_model_as_module_function(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "user_resmlp.py").write_text(RESIDUAL_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    res = invoke("train", "--dataset", "digits", "--model", "user_resmlp:build", "--method", "pb+sc+lwp",
                 "--samples", "40", "--batch-size", "32", "--lr", "0.1", "--no-progress", "--out", str(run))
    assert res.exit_code == 0, res.output
    summary = json.loads((run / "summary.json").read_text())
    # captured as a graph: one stage per Linear (the skip travels with the activations), not one stage
    assert summary["status"] == "completed" and summary["num_stages"] == 3 and summary["max_delay"] == 4


def test_reproduce_with_two_names_batches_their_runs_and_writes_each_report(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    body = ('methods = ["pb"]\nseeds = [0]\n[model]\nmodel = "mlp"\nmodel_options = {{ hidden = 16 }}\n'
            '[data]\ndataset = "digits"\ntest_subset = 100\n[recipe]\nbatch_size = 16\nlr = {lr}\nmomentum = 0.9\n'
            'samples = 60\n[run]\neval_every = 30\n')
    (configs / "tiny-a.toml").write_text('description = "a"\n' + body.format(lr=0.1))
    (configs / "tiny-b.toml").write_text('description = "b"\n' + body.format(lr=0.2))
    monkeypatch.setenv("PIPEPROP_CONFIGS", str(configs))
    res = CliRunner().invoke(main, ["reproduce", "tiny-a", "tiny-b", "--batch-runs", "2", "--no-progress", "--out",
                                    str(tmp_path / "out")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "2 runs batched" in res.output and "tiny-a" in res.output and "tiny-b" in res.output
    for name, lr in (("tiny-a", 0.1), ("tiny-b", 0.2)):
        assert (tmp_path / "out" / name / "results.md").is_file()
        stored = json.loads((tmp_path / "out" / name / "pb" / "seed0" / "config.json").read_text())["config"]
        assert (stored["name"], stored["lr"]) == (name, lr)
    again = CliRunner().invoke(main, ["reproduce", "tiny-a", "tiny-a"])
    assert again.exit_code != 0 and "named twice" in again.output
