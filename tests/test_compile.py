"""``compile=``: stages run through torch.compile give the numbers of eager mode."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeprop

DT = torch.float64


class Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.c(torch.relu(self.b(h)) + h)


@pytest.mark.parametrize("method", ["pb+sc+lwp"])
def test_compiled_stages_equal_eager(method):
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    eager = Res().to(DT)
    compiled = copy.deepcopy(eager)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(2, 4, generator=g, dtype=DT), torch.randint(0, 3, (2,), generator=g)) for _ in range(8)]
    kw = dict(method=method, lr=0.2, momentum=0.8)
    before = counters["stats"]["calls_captured"]
    la = pipeprop.train(eager, data, F.cross_entropy, **kw)
    lb = pipeprop.train(compiled, data, F.cross_entropy, compile="aot_eager", **kw)
    assert counters["stats"]["calls_captured"] > before  # the stages really were compiled
    assert la == pytest.approx(lb, rel=1e-12)
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
