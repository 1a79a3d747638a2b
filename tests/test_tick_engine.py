"""The tick engine (PB tick by tick on live weights) equals the simulator, reads the host in blocks, and
refuses what it cannot run."""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeprop
from pipeprop.models.blocks import Fork, Join, OnBranch
from pipeprop.optim import PipelineSGD
from pipeprop.simulator import DivergenceError


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 8),
                         nn.ReLU(), nn.Linear(8, 5))


def cnn() -> nn.Sequential:
    """Convolutions, a residual skip carried between stages as a tuple, GroupNorm, pooling."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), Fork(), OnBranch(nn.Conv2d(4, 4, 3, padding=1)), Join(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.GroupNorm(2, 6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(6, 5),
    )


def batches(make: Callable[[], nn.Module], n: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    shape = (2, 16) if make is mlp else (2, 1, 6, 6)
    return [(torch.randn(*shape, generator=g, dtype=dtype), torch.randint(0, 5, (2,), generator=g)) for _ in range(n)]


def both_engines(make: Callable[[], nn.Module], method: str, dtype: torch.dtype, steps: int = 20,
                 **kw: Any) -> tuple[nn.Module, list[float], nn.Module, list[float]]:
    torch.manual_seed(0)
    model = make().to(dtype)
    ref = copy.deepcopy(model)
    data = batches(make, steps, dtype)
    want = pipeprop.train(ref, data, F.cross_entropy, method=method, **kw)
    got = pipeprop.train(model, data, F.cross_entropy, method=method, engine="tick", **kw)
    return model, got, ref, want


@pytest.mark.parametrize("make", [mlp, cnn])
@pytest.mark.parametrize("method,kw", [
    ("pb", {"momentum": 0.9}),
    ("pb+sc", {"momentum": 0.9, "weight_decay": 1e-3}),
    ("pb+lwp", {"momentum": 0.9}),
    ("pb+sc+lwp", {"momentum": 0.9, "weight_decay": 1e-3}),
    ("pb+nesterov", {"momentum": 0.9, "decoupled_weight_decay": True, "weight_decay": 1e-3}),
    ("pb", {"optimizer": "adamw", "weight_decay": 1e-2}),
    ("pb+sc+lwp", {"optimizer": "adamw", "weight_decay": 1e-2}),
])
def test_tick_engine_equals_the_simulator_bit_for_bit(make, method: str, kw: dict) -> None:
    model, got, ref, want = both_engines(make, method, torch.float64, lr=0.05, **kw)
    assert got == want  # every loss, exactly
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(next(model.parameters()), next(make().parameters()))  # it trained


def test_tick_engine_equals_the_simulator_in_float32_and_with_an_lr_schedule() -> None:
    model, got, ref, want = both_engines(cnn, "pb+sc+lwp", torch.float32, lr=0.05, momentum=0.9)
    assert got == want
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)

    def halving(k: int) -> float:
        return 0.5 ** (k // 3)

    torch.manual_seed(0)
    model = mlp().double()
    ref = copy.deepcopy(model)
    data = batches(mlp, 16, torch.float64)
    sim = pipeprop.build_simulator(ref, F.cross_entropy, method="pb+sc+lwp", lr=0.05, momentum=0.9)
    sim.optimizer.set_lr_schedule(halving)
    want = [sim.step(x, y) for x, y in data]
    pipe = pipeprop.build_tick_pipeline(model, F.cross_entropy, method="pb+sc+lwp", lr=0.05, momentum=0.9)
    pipe.optimizer.set_lr_schedule(halving)
    assert pipe.run(data) == want
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


def test_tick_engine_streams_and_reads_the_host_in_blocks(count_host_reads: Callable[[], Any]) -> None:
    """Micro-batches fed one by one come out S - 1 ticks later; losses are read every read_every ticks."""
    torch.manual_seed(0)
    model = mlp().double()
    data = batches(mlp, 40, torch.float64)
    ref = pipeprop.train(copy.deepcopy(model), data, F.cross_entropy, method="pb+sc+lwp", lr=0.05, momentum=0.9)
    pipe = pipeprop.build_tick_pipeline(model, F.cross_entropy, method="pb+sc+lwp", lr=0.05, momentum=0.9,
                                        read_every=8)
    S = len(pipe.stages)
    counter = count_host_reads()
    for x, y in data[:20]:
        pipe.feed(x, y)
    # last read after tick 16: the losses of micro-batches 0 .. 15 - (S - 1), which reached stage S - 1 by then
    assert S == 4 and pipe.ticks == 20 and len(pipe.losses) == 16 - (S - 1)
    for x, y in data[20:]:
        pipe.feed(x, y)
    losses = pipe.drain()
    counter.on = False
    assert losses == ref
    assert 1 <= counter.reads <= math.ceil((40 + 2 * (S - 1)) / 8) + 1, counter.reads


def test_tick_engine_reports_a_divergence_at_its_micro_batch() -> None:
    torch.manual_seed(0)
    model = mlp().double()
    data = batches(mlp, 30, torch.float64)
    ref = pipeprop.train(copy.deepcopy(model), data[:17], F.cross_entropy, method="pb", lr=0.05, momentum=0.9)
    data[17] = (torch.full_like(data[17][0], float("nan")), data[17][1])
    pipe = pipeprop.build_tick_pipeline(model, F.cross_entropy, method="pb", lr=0.05, momentum=0.9, read_every=5)
    with pytest.raises(DivergenceError) as err:
        pipe.run(data)
    assert err.value.step == 17 and math.isnan(err.value.loss)
    assert pipe.losses == ref
    assert pipe.ticks == 5 * math.ceil((17 + len(pipe.stages)) / 5)  # found at the first read after it


class _Standardized(nn.Conv2d):
    """A weight standardisation: saves a tensor derived from the weight (stale in a tick engine's backward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.weight - self.weight.mean()) / (self.weight.std() + 1e-5)
        return F.conv2d(x, w, self.bias, padding=1)


def test_tick_engine_refuses_what_it_cannot_run_and_names_why() -> None:
    data = batches(mlp, 4, torch.float32)
    cases = [
        (mlp(), {"method": "pb+stash"}, "weight mode 'stash'"),
        (mlp(), {"method": "sgd"}, "synchronous"),
        (mlp(), {"method": "spectrain"}, "backward weights"),
        (mlp(), {"method": "pb", "precision": "64"}, "precision"),
        (mlp(), {"method": "pb", "delay_offset": 1}, "delay_offset"),
        (nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Linear(8, 5)), {"method": "pb"}, "buffers"),
        (nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.LayerNorm(8), nn.Linear(8, 5)), {"method": "pb"},
         "LayerNorm"),
    ]
    for model, kw, message in cases:
        with pytest.raises(ValueError, match=message):
            pipeprop.train(model, data, F.cross_entropy, lr=0.1, momentum=0.9, engine="tick", **kw)
    conv_data = batches(cnn, 2, torch.float32)
    with pytest.raises(ValueError, match="_Standardized"):
        pipeprop.train(nn.Sequential(_Standardized(1, 2, 3), nn.Flatten(), nn.Linear(72, 5)), conv_data,
                       F.cross_entropy, method="pb", lr=0.1, engine="tick")
    shared = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="tied"):
        pipeprop.build_tick_pipeline(nn.Sequential(nn.Linear(16, 8), shared, nn.ReLU(), shared), F.cross_entropy,
                                     method="pb", lr=0.1)
    with pytest.raises(ValueError, match="unknown engine"):
        pipeprop.train(mlp(), data, F.cross_entropy, method="pb", lr=0.1, engine="fast")
    with pytest.raises(ValueError, match="one number per micro-batch"):  # (a per-sample loss is not summed silently)
        pipeprop.train(mlp(), data, lambda out, y: F.cross_entropy(out, y, reduction="none"), method="pb", lr=0.1,
                       engine="tick")
    stages = pipeprop.build_tick_pipeline(mlp(), F.cross_entropy, method="pb", lr=0.1).stages
    def shared() -> list[dict]:  # one group per stage over the .data aliases of its parameters
        return [{"params": [p.data for p in st.parameters()], "delay": 2 * (len(stages) - 1 - s)}
                for s, st in enumerate(stages)]

    with pytest.raises(ValueError, match="weight_prediction=True, but the optimizer has weight_prediction=False"):
        pipeprop.TickPipeline(stages, PipelineSGD(shared(), lr=0.1, momentum=0.9), F.cross_entropy, method="pb+lwp")
    with pytest.raises(ValueError, match="a copy of them"):  # a predicting stage's optimizer on the live storage
        pipeprop.TickPipeline(stages, PipelineSGD(shared(), lr=0.1, momentum=0.9, weight_prediction=True),
                              F.cross_entropy, method="pb+lwp")


def test_between_feeds_a_predicting_stage_is_one_update_behind_and_sync_weights_makes_it_live() -> None:
    """Under LWP the forward weights are the stages' parameters and the live weights the optimizer's copy;
    sync_weights() (and drain()) puts the live weights into the parameters without changing the training: the
    losses and final weights equal the simulator's."""
    torch.manual_seed(0)
    data = batches(mlp, 12, torch.float32)
    ref = mlp()
    model = copy.deepcopy(ref)
    tick = pipeprop.build_tick_pipeline(model, F.cross_entropy, method="pb+lwp", lr=0.1, momentum=0.9)
    for x, y in data[:6]:
        tick.feed(x, y)
    live = [a for g in tick.optimizer.param_groups for a in g["params"]]
    params = [p for st in tick.stages for p in st.parameters()]
    assert not all(torch.equal(p, a) for p, a in zip(params, live))
    tick.sync_weights()  # mid-stream: the parameters now hold the live weights, and training goes on unchanged
    assert all(torch.equal(p, a) for p, a in zip(params, live))
    for x, y in data[6:]:
        tick.feed(x, y)
    got = tick.drain()
    assert all(torch.equal(p, a) for p, a in zip(params, live))
    assert got == pipeprop.train(ref, data, F.cross_entropy, method="pb+lwp", lr=0.1, momentum=0.9)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


def test_performance_doc_tick_example_runs_and_equals_the_simulator() -> None:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "performance.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if 'engine="tick"' in b]
    assert blocks, "docs/performance.md has no tick-engine example"
    namespace: dict = {}
    exec(compile(blocks[0], "performance.md", "exec"), namespace)
    assert len(namespace["losses"]) == 500
    exec(compile(blocks[0].replace('engine="tick"', 'engine="simulator"'), "performance.md", "exec"), simulated := {})
    assert namespace["losses"] == simulated["losses"]
