"""train_many: K runs as one vmapped simulation equal K separate pipeprop.train calls (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import pipeprop
from pipeprop.simulator import DivergenceError

DT = torch.float64


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)
    ).to(DT)


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.GroupNorm(1, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 4),
    ).to(DT)


SHAPES = {mlp: (2, 6), cnn: (1, 1, 6, 6)}


def runs(make, k: int, steps: int):
    """k models from seeds 0..k-1 and k micro-batch streams with their own data order."""
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(make())
    streams = []
    for seed in range(k):
        g = torch.Generator().manual_seed(100 + seed)
        x_shape = SHAPES[make]
        streams.append([(torch.randn(*x_shape, dtype=DT, generator=g), torch.randint(0, 4, (x_shape[0],), generator=g))
                        for _ in range(steps)])
    return models, streams


@pytest.mark.parametrize(
    "make,method,options",
    [
        (mlp, "sgd", {}),
        (mlp, "pb", {}),
        (mlp, "pb+sc+lwp", {}),
        (mlp, "pb+stash", {}),
        (mlp, "pipemare", {"pipemare_warmup_steps": 6}),
        (mlp, "pb+nesterov", {"decoupled_weight_decay": True}),
        (cnn, "pb+sc+lwp", {}),
        (cnn, "pb+stash", {}),
    ],
)
def test_train_many_equals_separate_runs_with_per_run_lrs(make, method, options):
    models, streams = runs(make, 3, 14)
    refs = [copy.deepcopy(m) for m in models]
    lrs = [0.03, 0.1, 0.3]
    losses = pipeprop.train_many(models, streams, F.cross_entropy, method=method, lr=lrs, momentum=0.9,
                                 weight_decay=1e-3, **options)
    for k in range(3):
        ref_losses = pipeprop.train(refs[k], streams[k], F.cross_entropy, method=method, lr=lrs[k], momentum=0.9,
                                    weight_decay=1e-3, **options)
        torch.testing.assert_close(torch.tensor(losses[k], dtype=DT), torch.tensor(ref_losses, dtype=DT),
                                   rtol=0, atol=1e-9)
        for a, b in zip(models[k].parameters(), refs[k].parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    # the runs really differ (own seeds, data and learning rates) and really trained
    assert not torch.allclose(models[0][0].weight, models[1][0].weight)
    assert losses[2][-1] != losses[0][-1]


def test_equal_per_run_lrs_batch_a_method_without_per_run_lr_support():
    """SpecTrain keeps one lr for all runs; a list of equal rates (what a seed group passes) is accepted and
    equals separate runs, while different rates are refused (test_train_many_rejects_bad_input)."""
    models, streams = runs(mlp, 2, 12)
    refs = [copy.deepcopy(m) for m in models]
    losses = pipeprop.train_many(models, streams, F.cross_entropy, method="spectrain", lr=[0.1, 0.1], momentum=0.9)
    for k in range(2):
        ref_losses = pipeprop.train(refs[k], streams[k], F.cross_entropy, method="spectrain", lr=0.1, momentum=0.9)
        torch.testing.assert_close(torch.tensor(losses[k], dtype=DT), torch.tensor(ref_losses, dtype=DT),
                                   rtol=0, atol=1e-9)
        for a, b in zip(models[k].parameters(), refs[k].parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


def test_train_many_single_lr_and_stale_weights():
    """One shared lr; PB differs from SGD in the stacked simulation as in a single one."""
    models, streams = runs(mlp, 2, 10)
    sgd_models = [copy.deepcopy(m) for m in models]
    pipeprop.train_many(models, streams, F.cross_entropy, method="pb", lr=0.1, momentum=0.9)
    pipeprop.train_many(sgd_models, streams, F.cross_entropy, method="sgd", lr=0.1, momentum=0.9)
    assert not torch.allclose(models[0][0].weight, sgd_models[0][0].weight)


def test_train_many_resume_is_bit_exact():
    models, streams = runs(cnn, 2, 12)
    start = [copy.deepcopy(m.state_dict()) for m in models]
    kwargs = dict(method="pb+sc+lwp", lr=[0.05, 0.2], momentum=0.9)
    full = pipeprop.build_multi_simulator(models, F.cross_entropy, **kwargs)
    full_losses = [full.step([s[n][0] for s in streams], [s[n][1] for s in streams]) for n in range(12)]
    full.write_back()

    def fresh():
        ms = [cnn() for _ in start]
        for m, sd in zip(ms, start):
            m.load_state_dict(sd)
        return ms

    first = pipeprop.build_multi_simulator(fresh(), F.cross_entropy, **kwargs)
    for n in range(5):
        first.step([s[n][0] for s in streams], [s[n][1] for s in streams])
    ckpt = copy.deepcopy(first.state_dict())
    resumed_models = [cnn() for _ in start]  # other initial weights: everything must come from the checkpoint
    resumed = pipeprop.build_multi_simulator(resumed_models, F.cross_entropy, **kwargs)
    resumed.load_state_dict(ckpt)
    for n in range(5, 12):
        loss = resumed.step([s[n][0] for s in streams], [s[n][1] for s in streams])
        torch.testing.assert_close(loss, full_losses[n], rtol=0, atol=0)
    resumed.write_back()
    for a, b in zip(models, resumed_models):
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_train_many_names_the_diverging_run():
    models, streams = runs(mlp, 3, 3)
    bad = list(streams[1])
    bad[1] = (torch.full_like(bad[1][0], float("nan")), bad[1][1])
    with pytest.raises(DivergenceError, match="run 1: loss is nan at step 1") as info:
        pipeprop.train_many(models, [streams[0], bad, streams[2]], F.cross_entropy, method="pb", lr=0.1)
    assert info.value.run == 1


def test_train_many_rejects_bad_input():
    models, streams = runs(mlp, 2, 4)
    with pytest.raises(ValueError, match="one stream per model"):
        pipeprop.train_many(models, streams[:1], F.cross_entropy, method="pb", lr=0.1)
    with pytest.raises(ValueError, match="2 entries for 3 runs"):
        pipeprop.train_many(models + [mlp()], streams + [streams[0]], F.cross_entropy, method="pb", lr=[0.1, 0.2])
    with pytest.raises(ValueError, match="equal length"):
        pipeprop.train_many(models, [streams[0], streams[1][:2]], F.cross_entropy, method="pb", lr=0.1)
    with pytest.raises(ValueError, match="same architecture"):
        wide = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(),
                             nn.Linear(8, 4)).to(DT)
        pipeprop.train_many([models[0], wide], streams, F.cross_entropy, method="pb", lr=0.1)
    with pytest.raises(ValueError, match="same shape"):
        odd = [(x[:1], y[:1]) for x, y in streams[1]]
        pipeprop.train_many(models, [streams[0], odd], F.cross_entropy, method="pb", lr=0.1)
    with pytest.raises(ValueError, match="does not support stacked runs"):
        pipeprop.train_many(models, streams, F.cross_entropy, method="pb+ab", lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="one learning rate per run"):
        pipeprop.train_many(models, streams, F.cross_entropy, method="spectrain", lr=[0.1, 0.2], momentum=0.9)
    with pytest.raises(RuntimeError, match="dropout"):
        drop = [nn.Sequential(nn.Linear(6, 4), nn.Dropout(0.5), nn.Linear(4, 4)).to(DT) for _ in range(2)]
        pipeprop.train_many(drop, streams, F.cross_entropy, method="pb", lr=0.1)


def test_performance_doc_example_runs():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "performance.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "train_many" in b]
    assert blocks, "docs/performance.md has no train_many example"
    namespace: dict = {}
    exec(compile(blocks[0], "performance.md", "exec"), namespace)
    assert len(namespace["losses"]) == 4 and all(len(run) == 256 for run in namespace["losses"])


def test_train_many_batchnorm_buffers_follow_each_run():
    """Running statistics are stacked buffers, updated per run inside the vmapped forward."""
    def bn_mlp() -> nn.Sequential:
        return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)).to(DT)

    models = []
    for seed in range(2):
        torch.manual_seed(seed)
        models.append(bn_mlp())
    refs = [copy.deepcopy(m) for m in models]
    streams = [[(torch.randn(3, 6, dtype=DT), torch.randint(0, 4, (3,))) for _ in range(6)] for _ in range(2)]
    losses = pipeprop.train_many(models, streams, F.cross_entropy, method="pb", lr=[0.1, 0.2], momentum=0.9)
    for k, lr in enumerate([0.1, 0.2]):
        ref_losses = pipeprop.train(refs[k], streams[k], F.cross_entropy, method="pb", lr=lr, momentum=0.9)
        torch.testing.assert_close(torch.tensor(losses[k], dtype=DT), torch.tensor(ref_losses, dtype=DT),
                                   rtol=0, atol=1e-9)
        for a, b in zip(models[k].state_dict().values(), refs[k].state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    assert not torch.allclose(models[0][1].running_mean, models[1][1].running_mean)


@pytest.mark.parametrize("affine,batch", [(True, 1), (True, 3), (False, 2)])
def test_run_stacked_group_norm_equals_vmapped_group_norm(affine, batch):
    """train_many's batched GroupNorm (one call with K x the groups) against vmap's generic rule, and its plain
    (non-vmapped) backward against F.group_norm's."""
    from torch.func import vmap
    from pipeprop.multi_run import _RunStackedGroupNorm

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, batch, 6, 5, 5, dtype=DT, generator=gen, requires_grad=True)
    w = torch.randn(4, 6, dtype=DT, generator=gen, requires_grad=True) if affine else None
    b = torch.randn(4, 6, dtype=DT, generator=gen, requires_grad=True) if affine else None
    g = torch.randn(4, batch, 6, 5, 5, dtype=DT, generator=gen)
    inputs = [t for t in (x, w, b) if t is not None]
    ours = vmap(lambda a, ww, bb: _RunStackedGroupNorm.apply(a, 3, ww, bb, 1e-5), in_dims=(0, 0 if affine else None, 0 if affine else None))(x, w, b)
    ref = vmap(lambda a, ww, bb: F.group_norm(a, 3, ww, bb, 1e-5), in_dims=(0, 0 if affine else None, 0 if affine else None))(x, w, b)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    for a, r in zip(torch.autograd.grad(ours, inputs, g), torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-12)
    plain = _RunStackedGroupNorm.apply(x[0], 3, None if w is None else w[0], None if b is None else b[0], 1e-5)
    expected = F.group_norm(x[0], 3, None if w is None else w[0], None if b is None else b[0], 1e-5)
    firsts = [x] + ([w, b] if affine else [])
    for a, r in zip(torch.autograd.grad(plain, firsts, g[0]), torch.autograd.grad(expected, firsts, g[0])):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-12)


def test_to_device_keeps_tensors_on_their_device_and_recurses():
    from pipeprop.data.transfer import to_device

    x, y = torch.randn(2, 3), torch.tensor([1, 0])
    moved = to_device((x, [y]), "cpu")
    assert moved[0] is x and moved[1][0] is y and isinstance(moved[1], list)
    assert to_device(x.to(DT), torch.device("cpu")).dtype == DT


def residual_cnn() -> nn.Sequential:
    """Conv (strided, grouped, with bias) + GroupNorm + a residual block carried in a tuple, with the
    parameter-free shortcut of ResNet-20 (subsample + zero-pad channels)."""
    from pipeprop.models import Fork, Join, OnBranch, PadShortcut

    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), Fork(),
        OnBranch(nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=True), nn.GroupNorm(3, 6, affine=False)),
        Join(PadShortcut(2, 2)), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    ).to(DT)


@pytest.mark.parametrize("batch", [1, 3])
def test_folded_stages_equal_separate_runs(batch):
    """Stages of convolutions, GroupNorm, linear and per-sample layers run with the runs folded into the batch
    dimension (no vmap): equal to separate runs, for one sample per micro-batch (pure reshapes) and several."""
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(residual_cnn())
    refs = [copy.deepcopy(m) for m in models]
    g = torch.Generator().manual_seed(7)
    streams = [[(torch.randn(batch, 2, 6, 6, dtype=DT, generator=g), torch.randint(0, 4, (batch,), generator=g))
                for _ in range(10)] for _ in range(3)]
    lrs = [0.05, 0.1, 0.2]
    sim = pipeprop.build_multi_simulator(models, F.cross_entropy, method="pb+sc+lwp", lr=lrs, momentum=0.9,
                                         weight_decay=1e-3)
    assert all(st.folded for st in sim.stages)
    losses = torch.stack([sim.step([s[n][0] for s in streams], [s[n][1] for s in streams]) for n in range(10)]).t()
    sim.write_back()
    for k in range(3):
        ref = pipeprop.train(refs[k], streams[k], F.cross_entropy, method="pb+sc+lwp", lr=lrs[k], momentum=0.9,
                             weight_decay=1e-3)
        torch.testing.assert_close(losses[k], torch.tensor(ref, dtype=DT), rtol=0, atol=1e-9)
        for a, b in zip(models[k].parameters(), refs[k].parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    assert not torch.allclose(models[0][0].weight, models[1][0].weight)


def test_min_runs_to_batch_follows_the_form_of_the_stages():
    """Convolutions fold and pay from 2 runs, linear-only stages from 4, stages left to vmap from 8; any GPU: 2."""
    from pipeprop.multi_run import MIN_RUNS_CONV, MIN_RUNS_DENSE, MIN_RUNS_VMAP, min_runs_to_batch

    def stages(make):
        return pipeprop.build_multi_simulator([make(), make()], F.cross_entropy, method="pb", lr=0.1).stages

    bn = lambda: nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)).to(DT)  # noqa: E731
    assert not all(st.folded for st in stages(bn))
    assert min_runs_to_batch(stages(cnn)) == MIN_RUNS_CONV == 2
    assert min_runs_to_batch(stages(mlp)) == MIN_RUNS_DENSE == 4
    assert min_runs_to_batch(stages(bn)) == MIN_RUNS_VMAP == 8
    assert min_runs_to_batch(stages(bn), "cuda") == 2

    def hooked():  # a hook may expect one run's shapes: such a stage keeps vmap
        m = cnn()
        m[0].register_forward_hook(lambda mod, inp, out: None)
        return m

    assert stages(cnn)[0].folded and not stages(hooked)[0].folded
