"""Weight versions held by reference (the update writes into the storage of the version leaving the ring)
must give the same numbers as versions held as copies, also when a stage gets no gradient in some steps."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

import pipeprop
from pipeprop.api import stage_param_groups
from pipeprop.optim import PipelineSGD
from pipeprop.simulator import PipelineSimulator

DT = torch.float64


class SometimesUsed(nn.Module):
    """A linear layer that uses its weights in a fixed pseudo-random half of the calls (no gradient in the others)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.lin = nn.Linear(n, n)
        self.uses = iter(torch.rand(1000, generator=torch.Generator().manual_seed(3)) < 0.5)

    def forward(self, x):
        return self.lin(x) if next(self.uses) else x


def _run(by_reference: bool, method_options: dict) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), SometimesUsed(6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    part = pipeprop.partition(model, "layer")
    opt = PipelineSGD(stage_param_groups(part.stages, part.delays), lr=0.05, momentum=0.9, **method_options)
    if not by_reference:
        opt.supports_keeping_previous_weights = False  # ring slots hold copies; the update works in place
    sim = PipelineSimulator(part.stages, opt, F.cross_entropy)
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        sim.step(torch.randn(1, 4, generator=g, dtype=DT), torch.randint(0, 3, (1,), generator=g))
    return [p.detach().clone() for p in model.parameters()]


def test_reference_ring_equals_copy_ring_when_a_stage_skips_updates():
    for options in ({}, {"spike_compensation": True}, {"weight_prediction": True}):
        for a, b in zip(_run(True, options), _run(False, options)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
