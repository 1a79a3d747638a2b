"""Language modelling through the run driver: a char-GPT on a text made in the test (or Tiny Shakespeare's
configs): plain-PyTorch reference, bit-exact resume, loss-based metrics and reports, clear config errors."""

from __future__ import annotations

import json
import math
import random
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeprop.experiments import ExperimentConfig, Runner, run_experiment
from pipeprop.experiments.checkpoint import load_checkpoint
from pipeprop.experiments.config import ConfigError, load_config
from pipeprop.models import char_gpt

CONTEXT = 16
WORDS = ["the", "king", "shall", "not", "speak", "of", "love", "and", "death", "my", "lord", "good", "night"]


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.simplefilter("ignore")  # the LWP regime warning of the deep, delayed stages


@pytest.fixture
def text_dir(tmp_path: Path) -> Path:
    """A small text with some structure: seeded random words, lines and punctuation (about 6,000 characters)."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize() + rng.choice(".,!?")
             for _ in range(200)]
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "input.txt").write_text("\n".join(lines) + "\n")
    return tmp_path / "text"


def lm(text_dir: Path, **kw) -> ExperimentConfig:
    base = dict(name="tiny-lm", dataset="tinyshakespeare", data_dir=str(text_dir), data_options={"verify": False},
                model="char-gpt", model_options={"d_model": 16, "n_layers": 1, "n_heads": 2}, context=CONTEXT,
                dtype="float64", optimizer="adamw", batch_size=1, lr=3e-3, betas=[0.9, 0.99], weight_decay=0.1,
                schedule="cosine", warmup_samples=5, min_lr_factor=0.1, samples=40, eval_every=10, test_subset=8,
                method="pb+sc+lwp", progress=False)
    base.update(kw)
    return ExperimentConfig(**base)


def corpus(text_dir: Path) -> tuple[str, torch.Tensor, torch.Tensor]:
    """The vocabulary and the 90/10 train/validation split, computed here from the file."""
    text = (text_dir / "input.txt").read_text()
    chars = "".join(sorted(set(text)))
    ids = torch.tensor([chars.index(c) for c in text])
    cut = int(len(ids) * 0.9)
    return chars, ids[:cut], ids[cut:]


def metrics_without_time(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "time"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_synchronous_lm_run_equals_plain_pytorch_adamw(text_dir: Path, tmp_path: Path) -> None:
    """Method sgd (no delays): the runner's run is torch.optim.AdamW on the same windows with the same schedule, and
    its validation loss is the cross-entropy of those weights on the validation windows, cut here by hand."""
    cfg = lm(text_dir, method="sgd", samples=30, eval_every=30)
    summary = run_experiment(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["samples"] == 30
    chars, train, val = corpus(text_dir)
    torch.manual_seed(cfg.seed)
    model = char_gpt(len(chars), CONTEXT, 16, 1, 2).double()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    for k in range(30):
        s = k + 1  # the factor of update k is taken at its last sample
        factor = s / 5 if s < 5 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 5) / (30 - 5)))
        for g in opt.param_groups:
            g["lr"] = 3e-3 * factor
        start = int(torch.randint(0, len(train) - CONTEXT, (1,), generator=gen))
        x, y = train[start : start + CONTEXT][None], train[start + 1 : start + CONTEXT + 1][None]
        opt.zero_grad()
        F.cross_entropy(model(x).reshape(-1, len(chars)), y.reshape(-1)).backward()
        opt.step()
    got = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    for name, want in model.state_dict().items():
        torch.testing.assert_close(got[name], want, rtol=1e-9, atol=1e-12, msg=name)
    xv = torch.stack([val[i * CONTEXT : (i + 1) * CONTEXT] for i in range(8)])
    yv = torch.stack([val[i * CONTEXT + 1 : (i + 1) * CONTEXT + 1] for i in range(8)])
    with torch.no_grad():
        want_loss = float(F.cross_entropy(model(xv).reshape(-1, len(chars)), yv.reshape(-1)))
    assert summary["final_test_loss"] == pytest.approx(want_loss, rel=1e-9)
    # the char-frequency baseline: -mean log p(c) of the validation targets under the train-split frequencies
    counts = torch.bincount(train, minlength=len(chars)).double()
    baseline = float(-(counts / counts.sum()).log()[yv.reshape(-1)].mean())
    assert summary["baseline_test_loss"] == pytest.approx(baseline, rel=1e-12)


def test_stopped_lm_run_resumes_bit_exactly(text_dir: Path, tmp_path: Path) -> None:
    cfg = lm(text_dir)  # pb+sc+lwp, AdamW, warm-up + cosine to 10%, float64
    full = run_experiment(cfg, tmp_path / "full")
    stopped = run_experiment(cfg, tmp_path / "split", stop_after_steps=17)
    assert full["status"] == "completed" and stopped["status"] == "stopped" and stopped["samples"] == 17
    resumed = Runner(cfg, tmp_path / "split").setup().run(resume=True)
    assert resumed["status"] == "completed"
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["stream"]["position"] == b["stream"]["position"] == 40
    assert metrics_without_time(tmp_path / "full") == metrics_without_time(tmp_path / "split")
    # it trained: the validation loss fell from its value at the start
    rows = metrics_without_time(tmp_path / "full")
    assert rows[-1]["test_loss"] < rows[0]["test_loss"]


def test_lm_metrics_are_loss_based(text_dir: Path, tmp_path: Path) -> None:
    summary = run_experiment(lm(text_dir, method="pb"), tmp_path / "run")
    rows = metrics_without_time(tmp_path / "run")
    assert [r["samples"] for r in rows] == [0, 10, 20, 30, 40]
    for r in rows:
        assert "test_acc" not in r and "train_acc" not in r
        assert r["test_bpc"] == pytest.approx(r["test_loss"] / math.log(2), rel=1e-12)
        assert r["test_ppl"] == pytest.approx(math.exp(r["test_loss"]), rel=1e-12)
    assert rows[0]["test_loss"] == pytest.approx(math.log(len(corpus(text_dir)[0])), abs=0.05)  # untrained: ~uniform
    assert summary["task"] == "language-modelling" and summary["metric"] == "loss"
    assert summary["final_test_acc"] is None and summary["final_train_acc"] is None and summary["best_test_acc"] is None
    assert summary["final_test_loss"] == rows[-1]["test_loss"]
    assert summary["best_test_loss"] == min(r["test_loss"] for r in rows)
    assert summary["final_test_bpc"] == rows[-1]["test_bpc"] and summary["evaluations"] == 5
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["task"] == "language-modelling" and stored["test_size"] == 8 and stored["test_characters"] == 128
    assert (tmp_path / "run" / "curves.png").stat().st_size > 5_000


def test_lm_sweep_reports_loss_lower_is_better_with_the_baseline(text_dir: Path, tmp_path: Path) -> None:
    from pipeprop.experiments.compare import run_sweep

    cfg = lm(text_dir, samples=20, eval_every=10, seeds=[0, 1], methods=["sgd", "pb+sc+lwp"])
    summaries, paths = run_sweep(cfg, tmp_path / "sweep", echo=lambda s: None)
    assert len(summaries) == 4 and all(s["status"] == "completed" for s in summaries)
    table = paths["table"].read_text()
    assert "final val loss (nats/char) ↓" in table and "bits/char" in table and "perplexity" in table
    assert "| tiny-lm | pb+sc+lwp | 1 | 2 |" in table and "final test acc" not in table
    assert f"{summaries[0]['baseline_test_loss']:.3f} nats/char" in table
    mean = sum(s["final_test_loss"] for s in summaries[2:]) / 2
    row = next(line for line in table.splitlines() if line.startswith("| tiny-lm | pb+sc+lwp |"))
    assert f"| {mean:.3f} ± " in row  # mean over its two seeds
    assert paths["plot"].stat().st_size > 5_000
    echoed: list[str] = []
    again, _ = run_sweep(cfg, tmp_path / "sweep", echo=echoed.append)  # finished runs are reused
    assert again == summaries and sum("reusing" in e for e in echoed) == 4


def test_lm_train_command_prints_the_validation_loss(text_dir: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pipeprop.cli import main

    res = CliRunner().invoke(main, ["train", "--dataset", "tinyshakespeare", "--data-dir", str(text_dir), "--set",
                                    'data_options={"verify": false}', "--model", "char-gpt", "--set",
                                    'model_options={"d_model": 16, "n_layers": 1, "n_heads": 2}', "--set", "context=16",
                                    "--optimizer", "adamw", "--batch-size", "1", "--lr", "0.003", "--samples", "10",
                                    "--set", "test_subset=4", "--no-progress", "--out", str(tmp_path / "run")],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "final val loss" in res.output and "nats/char" in res.output


def test_bad_lm_configs_are_clear_errors(text_dir: Path) -> None:
    with pytest.raises(ConfigError, match="metric = 'accuracy'.*language modelling.*metric = 'auto' or 'loss'"):
        lm(text_dir, metric="accuracy")
    with pytest.raises(ConfigError, match="engine = 'distributed'.*simulator"):
        lm(text_dir, engine="distributed")
    with pytest.raises(ConfigError, match="augment = true"):
        lm(text_dir, augment=True)
    with pytest.raises(ConfigError, match="context = 16.*image classification; remove context"):
        ExperimentConfig(dataset="digits", context=16)
    with pytest.raises(ConfigError, match="min_lr_factor.*schedule = 'cosine'"):
        lm(text_dir, schedule="step")
    with pytest.raises(ConfigError, match="method 'asyncpp' is defined for optimizer.*nadam only, not 'adamw'"):
        lm(text_dir, method="asyncpp")  # found when a sweep is planned, not after its first runs
    assert lm(text_dir, metric="loss").headline_metric == "loss"
    assert ExperimentConfig(dataset="digits").headline_metric == "accuracy"
    assert ExperimentConfig(dataset="shakespeare").task == "language-modelling"
    # keys added for language models leave the results hash of existing (image) configs unchanged
    assert "metric" not in ExperimentConfig(dataset="digits").result_dict()


def test_shakespeare_configs_are_named_experiments_with_cost() -> None:
    from pipeprop.experiments.config import list_configs
    from pipeprop.experiments.cost import estimate_cost

    names = [n for n in list_configs() if n.startswith("shakespeare-gpt")]
    assert set(names) == {"shakespeare-gpt", "shakespeare-gpt-sgd", "shakespeare-gpt-asyncpp", "shakespeare-gpt-budget",
                          "shakespeare-gpt-sgd-budget"}
    for name in names:
        cfg = load_config(name)
        assert cfg.task == "language-modelling" and cfg.headline_metric == "loss"
        assert "pb+sc+lwp" in cfg.methods and len(cfg.seeds) >= 3 and cfg.model == "char-gpt"
    budget = load_config("shakespeare-gpt-budget")
    cost = estimate_cost(budget, with_model=False)
    assert cost.runs == 18 and cost.samples == 18 * 800 and cost.seconds == pytest.approx(18 * 800 * 0.11)
    # the paper config's AdamW recipe at batch 64, scaled to micro-batch 1 by the square-root rule
    recipe = load_config("shakespeare-gpt").scaled(7842)
    assert recipe.lr == pytest.approx(1e-3 / 8) and recipe.eps == pytest.approx(8e-8)
    assert recipe.betas == pytest.approx((1 - 0.1 / 64, 1 - 0.01 / 64))
    assert recipe.warmup_samples == 2000 and recipe.min_lr_factor == 0.1 and recipe.total_samples == 200_000
    paper = estimate_cost(load_config("shakespeare-gpt"))
    assert paper.macs_per_sample and paper.stages == 26  # 6 blocks x 4 + embedding + head
    assert "asyncpp" in load_config("shakespeare-gpt-asyncpp").methods


def test_batched_lm_runs_equal_runs_done_one_by_one(text_dir: Path, tmp_path: Path) -> None:
    from pipeprop.experiments.run_group import RunGroup

    configs = [lm(text_dir, optimizer="sgd", betas=None, momentum=0.9, lr=0.05, weight_decay=0.0, seed=s, samples=20)
               for s in (0, 1)]
    dirs = [tmp_path / f"group{k}" for k in range(2)]
    summaries = RunGroup(configs, dirs).setup().run()
    for cfg, run_dir, summary in zip(configs, dirs, summaries):
        alone = run_experiment(cfg, tmp_path / f"alone{cfg.seed}")
        assert summary["status"] == alone["status"] == "completed"
        assert summary["final_test_loss"] == pytest.approx(alone["final_test_loss"], abs=1e-9)
        a = load_checkpoint(run_dir / "checkpoint.pt")["model"]
        b = load_checkpoint(tmp_path / f"alone{cfg.seed}" / "checkpoint.pt")["model"]
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-9)
    assert summaries[0]["final_test_loss"] != summaries[1]["final_test_loss"]  # two seeds, two runs
