"""Weights that share storage (views of one flat buffer, as cuDNN's flatten_parameters makes), zero-size
parameters, and random-number states in checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeprop
from pipeprop.rng import get_rng_state, set_rng_state

DT = torch.float64


class WithEmpty(nn.Module):
    """A linear layer that also holds a zero-size parameter it uses (adds its sum, 0)."""

    def __init__(self, i, o):
        super().__init__()
        self.lin = nn.Linear(i, o)
        self.empty = nn.Parameter(torch.zeros(0))

    def forward(self, x):
        return self.lin(x) + self.empty.sum()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), WithEmpty(5, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)


def _flatten_parameters(model):
    """Point every parameter at a slice of one flat buffer (what flatten_parameters does for RNNs)."""
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        n = p.numel()
        p.data = flat[offset : offset + n].view_as(p)
        offset += n
    return flat


@pytest.mark.parametrize("method", ["pb", "pb+sc+lwp", "pb+stash"])
def test_views_of_one_buffer_and_zero_size_parameters_train_like_separate_ones(method):
    plain = _model()
    flat = _model()
    buf = _flatten_parameters(flat)
    assert all(p.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr() for p in flat.parameters())
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(2, 4, generator=g, dtype=DT), torch.randint(0, 3, (2,), generator=g)) for _ in range(10)]
    kw = dict(method=method, lr=0.2, momentum=0.8)
    la = pipeprop.train(plain, data, F.cross_entropy, **kw)
    lb = pipeprop.train(flat, data, F.cross_entropy, **kw)
    assert la == lb
    for a, b in zip(plain.parameters(), flat.parameters()):
        assert torch.equal(a, b)


def test_rng_state_round_trip_cpu_and_old_format():
    state = get_rng_state()
    a = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), a)
    set_rng_state(state["cpu"])  # checkpoints written before CUDA states were kept
    assert torch.equal(torch.rand(3), a)


def test_rng_state_includes_every_gpu(monkeypatch):
    fake = [torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [t.clone() for t in fake])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.extend(states))
    state = get_rng_state()
    assert [int(t) for t in state["cuda"]] == [1, 2]
    set_rng_state(state)
    assert [int(t) for t in restored] == [1, 2]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        set_rng_state(state)
