"""The static-weight mechanism behind ``cuda_graphs=True`` (copies instead of saved-tensor hooks) equals the
ordinary simulator bit for bit (float64), and ``cuda_graphs=True`` is refused with a clear message where it
cannot work. The CUDA graphs themselves need a GPU and are not tested here."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import pipeprop
from pipeprop.simulator import PipelineSimulator

DT = torch.float64


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, 4)).to(DT)


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).to(DT)


def static_copy(sim: PipelineSimulator) -> PipelineSimulator:
    return PipelineSimulator(sim.stages, sim.optimizer, sim.loss_fn, weight_mode=sim.weight_mode, precision="64",
                             _static_weights=True)


@pytest.mark.parametrize("make,shape,classes", [(mlp, (2, 6), 4), (cnn, (1, 2, 6, 6), 3)])
@pytest.mark.parametrize("method,options", [("pb", {}), ("pb+sc", {"weight_decay": 1e-2}), ("pb+sc+lwp", {}),
                                            ("pb+nesterov", {}), ("pb", {"optimizer": "adam", "momentum": None})])
def test_static_weights_equal_the_reference(make, shape, classes, method, options):
    model = make()
    options = {"momentum": 0.9, **options}
    ref = pipeprop.build_simulator(copy.deepcopy(model), F.cross_entropy, method=method, lr=0.05, precision="64",
                                   **options)
    base = pipeprop.build_simulator(model, F.cross_entropy, method=method, lr=0.05, precision="64", **options)
    sim = static_copy(base)
    gen = torch.Generator().manual_seed(1)
    addresses = None
    for n in range(14):
        x = torch.randn(*shape, dtype=DT, generator=gen)
        y = torch.randint(0, classes, (shape[0],), generator=gen)
        assert sim.step(x, y) == ref.step(x, y)
        if n == 0:
            addresses = [p.data_ptr() for p in sim._all_params]
    assert sim._static_ready and addresses == [p.data_ptr() for p in sim._all_params]  # weights never moved
    assert not sim.optimizer.keep_previous_weights  # updates in place: the storage a graph would read stays
    for a, b in zip([q for st in sim.stages for q in st.parameters()], [q for st in ref.stages for q in st.parameters()]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cuda_graphs_refused_on_cpu_and_for_unsupported_options():
    with pytest.raises(ValueError, match="must be on a CUDA device"):
        pipeprop.build_simulator(mlp(), F.cross_entropy, method="pb", lr=0.1, cuda_graphs=True)
    base = pipeprop.build_simulator(mlp(), F.cross_entropy, method="pb+stash", lr=0.1)
    with pytest.raises(ValueError, match="weight_mode='pb'"):
        PipelineSimulator(base.stages, base.optimizer, F.cross_entropy, weight_mode="stash", _static_weights=True)
