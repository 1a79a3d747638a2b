"""Adam on the quadratic reduces to the SGD recurrence; Tiny Shakespeare loader; the char-level GPT pipeline
(language-model runs through the run driver: tests/test_lm_runner.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import pipeprop
import numpy as np

from pipeprop.analysis.adam import adam_effective_h, adam_trajectory, measure_adam_reduction


@pytest.mark.parametrize("lr", [0.002, 0.05])
@pytest.mark.parametrize("method", ["pb", "pb+sc", "pb+lwp", "pb+sc+lwp"])
def test_adam_with_frozen_preconditioner_follows_the_sgd_recurrence(method, lr):
    rel, rate = measure_adam_reduction(method, lr=lr, lam=1.0, beta1=0.9, delay=6, v_hat=0.25, steps=400)
    assert rel < 1e-10, f"{method}: PipelineAdam left the SGD recurrence (relative gap {rel:.2e})"


def test_adam_effective_h_and_a_guard_that_the_comparison_can_fail():
    assert adam_effective_h(0.01, 2.0, 0.9, 0.25, eps=0.0) == pytest.approx(0.01 * 0.1 * 2.0 / 0.5)
    from pipeprop.analysis import simulate

    sc = adam_trajectory("pb+sc", lr=0.05, lam=1.0, beta1=0.9, delay=6, v_hat=0.25, steps=200)
    plain, _ = simulate(adam_effective_h(0.05, 1.0, 0.9, 0.25), "pb", 0.9, 6, 200)
    assert np.max(np.abs(sc - plain)) > 1e-3  # SC changes the trajectory: matching the SC recurrence means something


# ----------------------------------------------------------------------------- Tiny Shakespeare
def test_tiny_shakespeare_loader(shared_data, tmp_path):
    from pipeprop.data import DatasetNotFoundError, SequenceStream, load_tiny_shakespeare
    from pipeprop.data.files import CorruptDatasetError

    data = load_tiny_shakespeare(shared_data)
    assert data.vocab_size == 65 and len(data.train) + len(data.val) == 1_115_394
    assert data.decode(data.train[:14]) == "First Citizen:"
    assert data.decode(data.encode("To be")) == "To be"
    x, y = data.validation_windows(32, limit=5)
    assert x.shape == y.shape == (5, 32) and torch.equal(x[0, 1:], y[0, :-1])
    stream = SequenceStream(data, context=16, steps=3, seed=4)
    first = list(stream)
    assert len(first) == 3 and all(torch.equal(a[0, 1:], b[0, :-1]) for a, b in first)
    again = SequenceStream(data, context=16, steps=3, seed=4)
    assert all(torch.equal(a, c) for (a, _), (c, _) in zip(first, again))
    (tmp_path / "input.txt").write_text("not shakespeare")
    with pytest.raises(CorruptDatasetError, match="SHA-256"):
        load_tiny_shakespeare(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="data_dir"):
        load_tiny_shakespeare(tmp_path / "nowhere", cache_dir=tmp_path / "cache")


# ----------------------------------------------------------------------------- the GPT as a fine-grained pipeline
def test_char_gpt_is_a_fine_grained_causal_pipeline():
    from pipeprop.models import char_gpt, lm_loss

    torch.manual_seed(0)
    model = char_gpt(vocab_size=11, context=8, d_model=16, n_layers=4, n_heads=2).double()
    part = pipeprop.partition(model, "layer")
    assert len(part) == 18 and part.delays[0] == 34
    x = torch.randint(0, 11, (1, 8))
    out = model(x)
    assert out.shape == (1, 8, 11)
    x2 = x.clone()
    x2[0, 5] = (x2[0, 5] + 1) % 11  # causal: changing position 5 leaves positions 0-4 alone
    torch.testing.assert_close(model(x2)[0, :5], out[0, :5])
    assert not torch.allclose(model(x2)[0, 5:], out[0, 5:])
    # the pipeline with no delay is the same model trained with torch.optim.AdamW
    twin = copy.deepcopy(model)
    sim = pipeprop.build_simulator(model, lm_loss, method="sgd", optimizer="adamw", lr=1e-3, weight_decay=0.1)
    opt = torch.optim.AdamW(twin.parameters(), lr=1e-3, weight_decay=0.1)
    for _ in range(3):
        xs, ys = torch.randint(0, 11, (1, 8)), torch.randint(0, 11, (1, 8))
        loss = sim.step(xs, ys)
        opt.zero_grad()
        want = lm_loss(twin(xs), ys)
        want.backward()
        opt.step()
        assert loss == pytest.approx(want.item(), rel=1e-10)
    losses = pipeprop.train(model, [(xs, ys)] * 3, lm_loss, method="pb+sc+lwp", optimizer="adamw", lr=1e-3)
    assert all(math.isfinite(v) for v in losses)
