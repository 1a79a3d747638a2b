"""Scaling rules against numbers computed by hand (PAPER.md §2.2)."""

from __future__ import annotations

import math

import pytest

from pipeprop.scaling import Recipe, scale_hparams, scale_recipe

# By hand: ln 0.9 = -0.1053605157; /128 = -8.231290e-4; exp(.) = 0.9991772097.
# 1 - m_b = 8.227903e-4; lr_b = 0.1 * (1/128) * 8.227903e-4 / 0.1 = 6.42805e-6.
M_B1 = 0.9991772097
LR_B1 = 6.42805e-6


def test_momentum_rule_b128_to_b1_matches_hand_numbers() -> None:
    lr, m = scale_hparams(0.1, 0.9, 128, 1, rule="momentum")
    assert m == pytest.approx(M_B1, abs=1e-9)
    assert lr == pytest.approx(LR_B1, rel=1e-5)


def test_momentum_rule_quarter_batch() -> None:
    # 0.9 ** 0.25 = sqrt(sqrt(0.9)) = sqrt(0.9486832981) = 0.9740037464; lr = 0.1 * 0.25 * 0.0259962536 / 0.1
    lr, m = scale_hparams(0.1, 0.9, 256, 64, rule="effective_lr")
    assert m == pytest.approx(0.9740037464, abs=1e-9)
    assert lr == pytest.approx(0.25 * 0.0259962536, rel=1e-8)


def test_linear_rule_keeps_momentum() -> None:
    lr, m = scale_hparams(0.1, 0.9, 128, 1, rule="linear")
    assert m == 0.9
    assert lr == pytest.approx(7.8125e-4, rel=1e-12)


def test_same_batch_is_identity_and_no_momentum_is_linear() -> None:
    assert scale_hparams(0.1, 0.9, 128, 128) == pytest.approx((0.1, 0.9))
    assert scale_hparams(0.2, 0.0, 100, 10) == pytest.approx((0.02, 0.0))


def test_effective_lr_per_sample_is_preserved() -> None:
    for rule in ("momentum", "linear"):
        lr, m = scale_hparams(0.05, 0.95, 512, 4, rule=rule)
        # each of the 512/4 small steps contributes lr/(1-m); together one reference step's 0.05/(1-0.95) = 1.0
        assert (512 / 4) * lr / (1 - m) == pytest.approx(1.0, rel=1e-9)


def test_bad_input_names_the_fix() -> None:
    with pytest.raises(ValueError, match="'momentum'.*'linear'"):
        scale_hparams(0.1, 0.9, 128, 1, rule="sqrt")
    with pytest.raises(ValueError, match="batch sizes"):
        scale_hparams(0.1, 0.9, 0, 1)
    with pytest.raises(ValueError, match="momentum"):
        scale_hparams(0.1, 1.0, 128, 1)


def test_recipe_schedules_become_samples() -> None:
    ref = Recipe(batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4, epochs=164, warmup_epochs=1,
                 milestones=[82, 123], dataset_size=50_000)
    out = scale_recipe(ref, 1)
    assert out.total_samples == 8_200_000
    assert out.warmup_samples == 50_000
    assert out.milestone_samples == [4_100_000, 6_150_000]
    assert out.steps == 8_200_000
    assert out.weight_decay == 5e-4
    assert out.momentum == pytest.approx(M_B1, abs=1e-9)
    assert out.effective_lr == pytest.approx(0.1 / 128 / 0.1, rel=1e-9)


def test_recipe_in_steps() -> None:
    # He et al.: 64k iterations at B=128, decays at 32k and 48k
    ref = Recipe(batch_size=128, lr=0.1, momentum=0.9, steps=64_000, milestone_steps=[32_000, 48_000])
    out = scale_recipe(ref, 2, rule="linear")
    assert (out.total_samples, out.milestone_samples) == (8_192_000, [4_096_000, 6_144_000])
    assert out.steps == 4_096_000
    assert (out.lr, out.momentum) == pytest.approx((0.1 / 64, 0.9))


def test_epochs_without_dataset_size_is_an_error() -> None:
    with pytest.raises(ValueError, match="dataset_size"):
        scale_recipe(Recipe(batch_size=128, lr=0.1, epochs=10), 1)
    assert math.isclose(scale_recipe(Recipe(batch_size=8, lr=0.1), 1).lr, 0.0125)


# ---------------------------------------------------------------------------------------------- Adam: square-root rule
def test_square_root_rule_hand_numbers() -> None:
    from pipeprop.scaling import scale_adam_hparams

    lr, (b1, b2), eps = scale_adam_hparams(4e-3, (0.9, 0.99), 1e-8, 16, 4)  # κ = 1/4
    assert lr == pytest.approx(2e-3)
    assert 1 - b1 == pytest.approx(0.025) and 1 - b2 == pytest.approx(0.0025)
    assert eps == pytest.approx(2e-8)
    assert scale_adam_hparams(4e-3, (0.9, 0.99), 1e-8, 16, 4, scale_eps=False)[2] == 1e-8
    assert scale_adam_hparams(1e-3, (0.9, 0.999), 1e-8, 8, 8) == (1e-3, (0.9, 0.999), 1e-8)
    with pytest.raises(ValueError, match="1 - beta"):
        scale_adam_hparams(1e-3, (0.5, 0.999), 1e-8, 1, 4)  # 1 − β1 would be 2


def test_recipe_with_adamw_uses_the_square_root_rule() -> None:
    out = scale_recipe(Recipe(batch_size=64, lr=1e-3, optimizer="adamw", betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1,
                              steps=100), 1)
    assert out.rule == "sqrt" and out.optimizer == "adamw"
    assert out.lr == pytest.approx(1e-3 / 8)
    assert out.betas == pytest.approx((1 - 0.1 / 64, 1 - 0.01 / 64))
    assert out.weight_decay == 0.1 and out.total_samples == 6400
    with pytest.raises(ValueError, match="unknown optimizer"):
        scale_recipe(Recipe(batch_size=64, lr=1e-3, optimizer="lamb"), 1)


def test_scale_cli_adamw() -> None:
    from click.testing import CliRunner

    from pipeprop.cli import main

    res = CliRunner().invoke(main, ["scale", "--optimizer", "adamw", "--from-batch", "64", "--lr", "1e-3", "--betas",
                                    "0.9,0.99", "--to-batch", "1"])
    assert res.exit_code == 0, res.output
    assert "0.000125" in res.output and "0.9984375" in res.output and "sqrt" in res.output
