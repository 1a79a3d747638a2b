"""Stability map (bisection, quadratic prediction), regime map and the linear-LWP regime warning."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from torch import nn

import pipeprop
from pipeprop.analysis import stability_boundary
from pipeprop.experiments import ExperimentConfig
from pipeprop.experiments import stability as stab
from pipeprop.experiments.regime import regime_map, summarize_cells, write_regime_report
from pipeprop.regime_warnings import LWP_LIMIT, SC_LWP_LIMIT, LWPRegimeWarning, warn_if_lwp_overshoots


def tiny(**kw) -> ExperimentConfig:
    base = dict(name="tiny", model="mlp", model_options={"hidden": 16, "depth": 3}, dataset="digits", method="pb",
                batch_size=16, lr=0.1, momentum=0.9, samples=60, eval_every=60, test_subset=100, progress=False,
                methods=["sgd@1", "pb"], seeds=[0])
    base.update(kw)
    return ExperimentConfig(**base)


# ---------------------------------------------------------------- stability search
@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0, 7.0, 100.0])
def test_bisection_finds_the_threshold_of_a_monotone_oracle(monkeypatch, tmp_path: Path, limit: float) -> None:
    """With runs replaced by 'diverges iff lr > limit', the bracket is the grid's, in ⌈log2(n+1)⌉ runs."""
    calls = []

    def fake_sweep(cfg, out_dir, *, methods, seeds, **kw):
        calls.append(cfg.lr)
        status = "diverged" if cfg.lr > limit else "completed"
        return [{"status": status, "lr": cfg.lr / 16, "momentum": 0.99, "samples": cfg.samples, "max_delay": 4}], {}

    monkeypatch.setattr(stab, "run_sweep", fake_sweep)
    grid = [0.1 * 2**k for k in range(7)]  # 0.1 ... 6.4
    (result,) = stab.stability_search(tiny(), tmp_path, methods=["pb"], lrs=grid, samples=60)
    stable = [lr for lr in grid if lr <= limit]
    diverged = [lr for lr in grid if lr > limit]
    assert result.max_stable_lr == (max(stable) if stable else None)
    assert result.min_diverged_lr == (min(diverged) if diverged else None)
    assert len(calls) == 3  # 7 grid points: exactly 3 runs
    assert sorted(p.lr for p in result.points) == sorted(calls)


def test_an_lr_is_stable_only_if_every_seed_is(monkeypatch, tmp_path: Path) -> None:
    def fake_sweep(cfg, out_dir, *, methods, seeds, **kw):
        bad = cfg.lr >= 0.4 or (cfg.lr >= 0.2 and seeds[0] == 1)  # seed 1 diverges from 0.2 on
        return [{"status": "diverged" if bad else "completed", "max_delay": 2}], {}

    monkeypatch.setattr(stab, "run_sweep", fake_sweep)
    (result,) = stab.stability_search(tiny(), tmp_path, methods=["pb"], lrs=[0.1, 0.2, 0.4], seeds=[0, 1], samples=60)
    assert (result.max_stable_lr, result.min_diverged_lr) == (0.1, 0.2)


def test_bad_grids_are_refused(tmp_path: Path) -> None:
    for lrs in ([], [0.2, 0.1], [0.0, 0.1], [0.1, 0.1]):
        with pytest.raises(ValueError, match="increasing"):
            stab.stability_search(tiny(), tmp_path, methods=["pb"], lrs=lrs, samples=60)


def test_real_search_brackets_divergence_and_writes_the_report(tmp_path: Path) -> None:
    """Real runs: a tiny lr trains, an absurd one diverges (NaN or loss above the threshold)."""
    cfg = tiny(num_threads=1)
    results = stab.stability_search(cfg, tmp_path, methods=["sgd@1", "pb"], lrs=[0.01, 1e4], samples=60, threshold=10.0)
    for r in results:
        assert (r.max_stable_lr, r.min_diverged_lr) == (0.01, 1e4)
        assert [p.status for p in r.points] == ["completed", "diverged"]
    assert results[0].max_delay == 0 and results[1].max_delay == 4  # 3 stages: delays 4, 2, 0
    paths = stab.write_stability_report(results, tmp_path, title="tiny", samples=60, threshold=10.0)
    table = paths["table"].read_text()
    assert "| pb | 0.01 | 10000 | 1.00 |" in table and paths["plot"].is_file()
    assert all(row["train_loss_at_max_stable"] is not None for row in json.loads(paths["json"].read_text())["rows"])


def test_quadratic_prediction_matches_closed_forms() -> None:
    """m = 0: undelayed GD is stable for ηλ < 2, GD with delay 1 (w' = w − h w₋₁) for ηλ < 1."""
    ratios = stab.predicted_ratios(["sgd@1", "pb", "pb+stash", "pb+ab"], momentum=0.0, max_delay=1)
    assert ratios["sgd@1"] == 1.0
    assert ratios["pb"] == pytest.approx(0.5, rel=1e-6)
    assert ratios["pb+stash"] == ratios["pb"]  # stashing is plain PB on a quadratic
    assert ratios["pb+ab"] is None  # no quadratic model


# ---------------------------------------------------------------- regime map
def test_regime_cells_compare_with_sgd_of_the_same_rule_and_lr() -> None:
    def run(acc, status="completed", delay=10, m=0.9):
        return {"final_test_acc": acc, "status": status, "max_delay": delay, "momentum": m, "lr": 0.01}

    cells = [
        {"rule": "linear", "lr": 0.2, "delay_offset": 0, "method": "sgd@1", "runs": [run(0.8, delay=0), run(0.9, delay=0)]},
        {"rule": "linear", "lr": 0.2, "delay_offset": 0, "method": "pb", "runs": [run(0.6), run(None, "diverged")]},
        {"rule": "linear", "lr": 0.2, "delay_offset": 50, "method": "pb+sc+lwp", "runs": [run(0.5, delay=60), run(0.7, delay=60)]},
    ]
    rows = {r["method"]: r for r in summarize_cells(cells)}
    assert rows["pb"]["acc_mean"] == pytest.approx(30.0) and rows["pb"]["diverged"] == 1  # no final accuracy = 0 %
    assert rows["pb"]["delta_vs_sgd"] == pytest.approx(30.0 - 85.0)
    assert rows["pb+sc+lwp"]["delta_vs_sgd"] == pytest.approx(60.0 - 85.0)
    assert rows["pb+sc+lwp"]["d_one_minus_m"] == pytest.approx(6.0)
    expected = stability_boundary("pb+sc+lwp", 0.9, 60) / stability_boundary("pb", 0.9, 60)
    assert rows["pb+sc+lwp"]["quadratic_gain_vs_pb"] == pytest.approx(expected)
    assert rows["sgd@1"]["quadratic_gain_vs_pb"] is None


def test_regime_map_runs_a_tiny_grid(tmp_path: Path) -> None:
    cfg = tiny(num_threads=1, samples=40, eval_every=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LWPRegimeWarning)
        cells = regime_map(cfg, tmp_path, offsets=[0, 3], rules=["linear"], lrs=[0.1], methods=["pb"], seeds=[0])
    assert [(c["method"], c["delay_offset"]) for c in cells] == [("pb", 0), ("sgd@1", 0), ("pb", 3)]
    assert [c["runs"][0]["max_delay"] for c in cells] == [4, 0, 7]
    assert all(c["runs"][0]["momentum"] == 0.9 for c in cells)  # linear rule keeps the momentum
    paths = write_regime_report(cells, tmp_path, title="tiny")
    table = paths["table"].read_text()
    assert paths["plot"].is_file() and "| linear | 0.1 | 7 |" in table
    # pivot: one line per (delay, method), D·(1−m) = 7 × 0.1, accuracy and its difference to sgd at b=1
    rows = {r["max_delay"]: r for r in summarize_cells(cells) if r["method"] == "pb"}
    assert f"| 7 | 0.70 | pb | {rows[7]['acc_mean']:.1f} ({rows[7]['delta_vs_sgd']:+.1f})" in table


def test_regime_map_batches_seeds_and_learning_rates_like_runs_done_one_by_one(tmp_path: Path) -> None:
    """The runs of one method, rule and delay (2 lrs x 2 seeds) form one batched group; float64 results
    equal the same runs trained alone through run_sweep."""
    from pipeprop.experiments.compare import run_sweep

    cfg = tiny(num_threads=1, samples=40, eval_every=40, dtype="float64")
    lines: list[str] = []
    cells = regime_map(cfg, tmp_path / "map", offsets=[2], rules=["momentum"], lrs=[0.1, 0.4], methods=["pb+sc"],
                       seeds=[0, 1], echo=lines.append)
    assert sum("4 runs batched" in line for line in lines) == 2  # pb+sc and sgd@1, each 2 lrs x 2 seeds
    for cell in cells:
        entry = cell["method"]
        alone, _ = run_sweep(cfg.replace(rule="momentum", lr=cell["lr"], delay_offset=2), tmp_path / "alone" / entry /
                             str(cell["lr"]), methods=[entry], seeds=[0, 1], batch_runs=1, echo=lambda s: None)
        for batched, single in zip(cell["runs"], alone):
            assert batched["lr"] == single["lr"] and batched["seed"] == single["seed"]
            assert batched["final_train_loss"] == pytest.approx(single["final_train_loss"], abs=1e-9)


# ---------------------------------------------------------------- warning
def _groups(delay: int, momentum: float, **kw) -> list[dict]:
    return [{"delay": delay, "momentum": momentum, "weight_prediction": True, "lwp_mode": "linear", **kw}]


def test_warning_thresholds_follow_the_quadratic_crossovers_at_m09() -> None:
    """At m = 0.9, SC+LWP (linear) is less stable than pb exactly from D·(1−m) = SC_LWP_LIMIT, LWP alone from LWP_LIMIT."""
    m = 0.9
    for d in range(1, 40):
        sc_lwp_worse = stability_boundary("pb+sc+lwp", m, d) < stability_boundary("pb", m, d)
        lwp_worse = stability_boundary("pb+lwp", m, d) < stability_boundary("pb", m, d)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert warn_if_lwp_overshoots(_groups(d, m, spike_compensation=True)) == sc_lwp_worse, d
            assert warn_if_lwp_overshoots(_groups(d, m)) == lwp_worse, d
        assert all(w.category is LWPRegimeWarning for w in caught)
    assert SC_LWP_LIMIT <= LWP_LIMIT


def test_build_simulator_warns_for_deep_pipelines_with_linear_lwp_only() -> None:
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(8)])  # 8 stages: first delay 14, 14·(1−0.9) = 1.4
    loss = lambda out, y: ((out - y) ** 2).mean()  # noqa: E731
    with pytest.warns(LWPRegimeWarning, match="momentum-decay"):
        pipeprop.build_simulator(model, loss, method="pb+sc+lwp", lr=0.01, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LWPRegimeWarning)
        pipeprop.build_simulator(model, loss, method="pb+sc+lwp", lr=0.01, momentum=0.9, lwp_mode="momentum-decay")
        pipeprop.build_simulator(model, loss, method="pb+sc+lwp", lr=0.01, momentum=0.999)  # 14·0.001 ≪ 1
        pipeprop.build_simulator(model, loss, method="pb+lwp", lr=0.01, momentum=0.9)  # 1.4 < 1.8 without SC
        pipeprop.build_simulator(model, loss, method="pb+sc", lr=0.01, momentum=0.9)
        warnings.simplefilter("ignore", LWPRegimeWarning)  # users can silence it by category
        pipeprop.build_simulator(model, loss, method="pb+sc+lwp", lr=0.01, momentum=0.9)


def test_lwp_warning_reads_beta1_as_the_momentum_of_adam_groups():
    from pipeprop.regime_warnings import lwp_overshoot

    adam = {"weight_prediction": True, "delay": 10, "betas": (0.99, 0.999)}
    assert lwp_overshoot(adam) is None  # 10 x (1 - 0.99) = 0.1: well inside
    assert lwp_overshoot({**adam, "betas": (0.8, 0.999)}) == (10, 0.8, pytest.approx(2.0))
