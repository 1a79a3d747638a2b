"""The simulator's fast paths equal the readable reference paths bit for bit (float64)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import pipeprop
from pipeprop.optim import PipelineSGD

DT = torch.float64


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)
    ).to(DT)


CASES = [
    ("sgd", {}),
    ("pb", {}),
    ("pb", {"weight_decay": 1e-2}),
    ("pb+sc", {"weight_decay": 1e-2, "decoupled_weight_decay": True}),
    ("pb+lwp", {"lwp_mode": "momentum-decay"}),
    ("pb+sc+lwp", {"weight_decay": 1e-3}),
    ("pb+stash", {}),
    ("pb+nesterov", {"weight_decay": 1e-3}),
    ("pipemare", {"pipemare_warmup_steps": 8}),
    ("pb", {"momentum": 0.0}),
]


@pytest.mark.parametrize("method,options", CASES)
def test_all_stages_update_equals_per_stage_reference(method, options, monkeypatch):
    calls = []
    original = PipelineSGD._step_stages_together
    monkeypatch.setattr(PipelineSGD, "_step_stages_together",
                        lambda self, *a: (calls.append(1), original(self, *a))[1])
    options = {"momentum": 0.9, **options}
    fast, ref = mlp(), None
    ref = copy.deepcopy(fast)
    sims = [pipeprop.build_simulator(m, F.cross_entropy, method=method, lr=0.05, foreach_stages=flag, **options)
            for m, flag in ((fast, True), (ref, False))]
    for sim in sims:  # different learning rates per stage, as a schedule or PipeMare would give
        for s, group in enumerate(sim.optimizer.param_groups):
            group["lr"] = 0.05 * (1 + 0.25 * (s % 2))
    data = [(torch.randn(2, 6, dtype=DT), torch.randint(0, 4, (2,))) for _ in range(12)]
    for x, y in data:
        losses = [sim.step(x, y) for sim in sims]
        assert losses[0] == losses[1]
    assert calls, "the fast path was never taken"
    for a, b in zip(fast.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for p, q in zip(fast.parameters(), ref.parameters()):
        for key, value in sims[0].optimizer.state[p].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, sims[1].optimizer.state[q][key], rtol=0, atol=0)


def test_fast_path_in_place_update_equals_reference():
    """Outside the simulator (no weight ring) the update is in place; same numbers both ways."""
    torch.manual_seed(0)
    ws = [torch.randn(3, 4, dtype=DT), torch.randn(4, dtype=DT), torch.randn(5, dtype=DT)]
    results = []
    for flag in (True, False):
        ps = [nn.Parameter(w.clone()) for w in ws]
        groups = [{"params": ps[:2], "delay": 4}, {"params": ps[2:], "delay": 2, "lr": 0.2}]
        opt = PipelineSGD(groups, lr=0.1, momentum=0.9, weight_decay=0.01, decoupled_weight_decay=True,
                          spike_compensation=True, foreach_stages=flag)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in ps:
                p.grad = torch.randn(p.shape, dtype=DT, generator=gen)
            opt.step()
        results.append([p.detach().clone() for p in ps])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", [{}, {"spike_compensation": True}, {"weight_prediction": True},
                                     {"spike_compensation": True, "weight_decay": 1e-2}])
def test_fused_in_place_update_equals_reference(dtype, options, monkeypatch):
    """In place (no weight ring) the heavy-ball step of tensors of 64k elements runs as torch's fused SGD kernel;
    every tensor, fused or not (sizes 7 and 100 stay with the separate operations), ends bit-equal to the
    per-stage reference, momentum buffers included, with different momenta and learning rates per stage."""
    calls = []
    fused = torch._fused_sgd_
    monkeypatch.setattr(torch, "_fused_sgd_", lambda *a, **k: (calls.append(len(a[0])), fused(*a, **k))[1])
    torch.manual_seed(0)
    shapes = [(8, 16), (7,), (3, 64), (100,), (64, 2)]
    ws = [torch.randn(s, dtype=dtype) for s in shapes]
    results = []
    for flag in (True, False):
        ps = [nn.Parameter(w.clone()) for w in ws]
        groups = [{"params": ps[:2], "delay": 6}, {"params": ps[2:4], "delay": 2, "lr": 0.2, "momentum": 0.8},
                  {"params": ps[4:], "delay": 0}]
        opt = PipelineSGD(groups, lr=0.1, momentum=0.9, foreach_stages=flag, **options)
        gen = torch.Generator().manual_seed(1)
        for _ in range(6):
            for p in ps:
                p.grad = torch.randn(p.shape, dtype=dtype, generator=gen)
            opt.step()
        results.append([p.detach().clone() for p in ps] + [opt.state[p]["momentum_buffer"].clone() for p in ps])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert bool(calls) == ("weight_decay" not in options)  # (coupled weight decay keeps the separate operations)


def test_fused_step_is_not_used_where_it_would_round_differently(monkeypatch):
    """Where the machine's fused kernel does not round as the separate operations (checked once per dtype), every
    tensor keeps the separate operations: a deliberately wrong kernel is never called and changes nothing."""
    from pipeprop.optim import pipeline_sgd

    wrong = torch._fused_sgd_
    monkeypatch.setattr(torch, "_fused_sgd_", lambda ps, *a, **k: (wrong(ps, *a, **k), [p.add_(1e-3) for p in ps]))
    monkeypatch.setattr(pipeline_sgd, "_fused_rounds_as_separate_ops", functools.lru_cache(maxsize=None)(
        pipeline_sgd._fused_rounds_as_separate_ops.__wrapped__))
    ws = [torch.randn(8, 16, dtype=DT), torch.randn(64, dtype=DT)]
    results = []
    for flag in (True, False):
        ps = [nn.Parameter(w.clone()) for w in ws]
        opt = PipelineSGD([{"params": ps[:1], "delay": 4}, {"params": ps[1:], "delay": 0}], lr=0.1, momentum=0.9,
                          spike_compensation=True, foreach_stages=flag)
        for _ in range(4):
            for p in ps:
                p.grad = torch.ones_like(p)
            opt.step()
        results.append([p.detach().clone() for p in ps])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert pipeline_sgd._fused_rounds_as_separate_ops(DT) is False


def test_lazy_loss_needs_no_host_sync():
    model = mlp()
    sim = pipeprop.build_simulator(model, F.cross_entropy, method="pb+sc+lwp", lr=0.05, momentum=0.9)
    x, y = torch.randn(1, 6, dtype=DT), torch.tensor([1])
    ref = copy.deepcopy(model)
    ref_sim = pipeprop.build_simulator(ref, F.cross_entropy, method="pb+sc+lwp", lr=0.05, momentum=0.9)
    lazy = sim.step(x, y, sync=False)
    assert isinstance(lazy, torch.Tensor) and lazy.dim() == 0 and not lazy.requires_grad
    assert float(lazy) == ref_sim.step(x, y)


def test_engine_step_equals_step_and_runs_the_step_hooks():
    """The simulator's optimizer call skips only torch.optim's profiler scope: same update, same hooks."""
    import warnings

    torch.manual_seed(0)
    ws = [torch.randn(3, 4, dtype=DT), torch.randn(4, dtype=DT)]
    results, counts = [], []
    for use_engine_step in (True, False):
        ps = [nn.Parameter(w.clone()) for w in ws]
        opt = PipelineSGD([{"params": ps[:1], "delay": 2}, {"params": ps[1:], "delay": 0}], lr=0.1, momentum=0.9)
        opt.set_lr_schedule(lambda k: 1.0 / (1 + k))  # counts updates in a step post-hook
        pre = []
        handle = opt.register_step_pre_hook(lambda o, a, k: pre.append(1))
        gen = torch.Generator().manual_seed(1)
        for n in range(4):
            if n == 2:
                handle.remove()  # from here on engine_step takes its fast route
            for p in ps:
                p.grad = torch.randn(p.shape, dtype=DT, generator=gen)
            opt.engine_step() if use_engine_step else opt.step()
        results.append([p.detach().clone() for p in ps])
        counts.append(([g["updates"] for g in opt.param_groups], len(pre)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert counts[0] == counts[1] == ([4, 4], 2)
    # a torch lr scheduler wraps the instance's step: engine_step goes through it (no "step order" warning)
    p = nn.Parameter(torch.zeros(2, dtype=DT))
    opt = PipelineSGD([{"params": [p], "delay": 0}], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    p.grad = torch.ones(2, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.engine_step()
        sched.step()
