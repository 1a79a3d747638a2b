"""Core behaviour: delays, partition, optimizer closed forms, SGD equivalence, errors."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import pipeprop
from pipeprop import schedule
from pipeprop.optim import PipelineSGD, lwp_coefficient, spike_coefficients

DT = torch.float64


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)
    ).to(DT)


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.GroupNorm(1, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 4),
    ).to(DT)


# ----------------------------------------------------------------------------- delays
def test_delays_formula_and_offset():
    assert schedule.stage_delays(4) == [6, 4, 2, 0]
    assert schedule.stage_delays(3, offset=1) == [5, 3, 1]
    assert schedule.stage_delays(1) == [0]
    with pytest.raises(ValueError):
        schedule.stage_delay(3, 3)


@pytest.mark.parametrize("S", [1, 2, 3, 5])
def test_delay_equals_updates_between_forward_and_backward_in_explicit_schedule(S):
    """Walk an explicit pipeline, step by step: forward, then backward, then update, at every stage."""
    N = 20
    updates_done = [0] * S
    seen_at_forward: dict[tuple[int, int], int] = {}
    for t in range(N + 2 * (S - 1)):
        for s in range(S):
            n = t - s
            if 0 <= n < N:
                seen_at_forward[(n, s)] = updates_done[s]
                assert schedule.forward_step(n, s, S) == t
            nb = t - 2 * (S - 1) + s
            if 0 <= nb < N:
                assert schedule.backward_step(nb, s, S) == t
                # the backward of nb sees version nb at every stage (live weights)
                assert updates_done[s] == nb
                updates_done[s] += 1
    for (n, s), version in seen_at_forward.items():
        assert version == schedule.forward_version(n, schedule.stage_delay(s, S))
    assert schedule.num_steps(N, S) == N + 2 * (S - 1)


# ----------------------------------------------------------------------------- partition
def test_layer_partition_groups_followers_and_norms():
    model = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.ReLU()), nn.Linear(4, 2))
    part = pipeprop.partition(model, "layer")
    assert [[type(m).__name__ for m in st] for st in part] == [["Flatten", "Linear", "LayerNorm", "ReLU"], ["Linear"]]
    assert part.delays == [2, 0]
    text = part.summary()
    assert "Flatten > Linear > LayerNorm > ReLU" in text and "2 stages" in text


def test_block_partition():
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)), nn.Linear(4, 2))
    part = pipeprop.partition(model, "block")
    assert len(part) == 2 and part.delays == [2, 0]
    assert part[0].num_parameters() == 40


def test_balanced_partition_minimises_largest_stage():
    sizes = [3, 9, 2, 7, 7, 1, 5]
    model = nn.Sequential(*[nn.Linear(1, s, bias=False) for s in sizes])
    for S in range(1, len(sizes) + 1):
        part = pipeprop.partition(model, S)
        got = max(st.num_parameters() for st in part)
        best = min(
            max(sum(sizes[a:b]) for a, b in zip((0,) + cuts, cuts + (len(sizes),)))
            for cuts in itertools.combinations(range(1, len(sizes)), S - 1)
        )
        assert len(part) == S and got == best
        assert [p for st in part for p in st.parameters()] == list(model.parameters())


def test_partition_errors_name_the_fix():
    with pytest.raises(ValueError, match="between 1 and 4"):
        pipeprop.partition(mlp(), 9)
    with pytest.raises(ValueError, match="between 1 and 4"):
        pipeprop.partition(mlp(), 0)
    with pytest.raises(TypeError, match="nn.Sequential"):
        pipeprop.partition(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="granularity"):
        pipeprop.partition(mlp(), "neuron")


# ----------------------------------------------------------------------------- optimizer closed forms
def _one_param(values, **kw):
    p = nn.Parameter(torch.tensor(values, dtype=DT))
    return p, PipelineSGD([{"params": [p], "delay": kw.pop("delay", 0)}], **kw)


def _step(p, opt, grad):
    p.grad = torch.tensor(grad, dtype=DT)
    opt.step()


def test_spike_compensation_closed_form_by_hand():
    # m = 0.5, D = 2: a = 0.25, b = 1.5
    assert spike_coefficients(0.5, 2) == (0.25, 1.5)
    p, opt = _one_param([1.0, -2.0], lr=0.1, momentum=0.5, delay=2, spike_compensation=True)
    _step(p, opt, [0.2, 0.4])  # v = [0.2, 0.4]; w -= 0.1 * (0.25 v + 1.5 g)
    torch.testing.assert_close(p.detach(), torch.tensor([0.965, -2.07], dtype=DT))
    _step(p, opt, [-0.1, 0.3])  # v = [0.0, 0.5]; update = 0.1 * ([0, .125] + [-.15, .45])
    torch.testing.assert_close(p.detach(), torch.tensor([0.98, -2.1275], dtype=DT))


def test_linear_weight_prediction_closed_form_by_hand():
    p, opt = _one_param([1.0, -2.0], lr=0.1, momentum=0.5, delay=2, weight_prediction=True)
    g = opt.param_groups[0]
    torch.testing.assert_close(opt.forward_weights(g)[0], p.detach())  # no velocity yet
    _step(p, opt, [0.2, 0.4])  # v = [0.2, 0.4], w = [0.98, -2.04]
    _step(p, opt, [-0.1, 0.3])  # v = [0.0, 0.5], w = [0.98, -2.09]
    torch.testing.assert_close(p.detach(), torch.tensor([0.98, -2.09], dtype=DT))
    # w_hat = w - lr * D * v = [0.98, -2.09 - 0.1*2*0.5]
    torch.testing.assert_close(opt.forward_weights(g)[0], torch.tensor([0.98, -2.19], dtype=DT))
    assert not opt.forward_uses_live_weights(g)
    # momentum-decay horizon: m (1 - m^T)/(1 - m) = 0.5 * 0.75 / 0.5 = 0.75
    assert lwp_coefficient(0.5, 2, "momentum-decay") == pytest.approx(0.75)
    g["lwp_mode"] = "momentum-decay"
    torch.testing.assert_close(opt.forward_weights(g)[0], torch.tensor([0.98, -2.09 - 0.1 * 0.75 * 0.5], dtype=DT))
    g["lwp_mode"], g["lwp_horizon"] = "linear", 5
    torch.testing.assert_close(opt.forward_weights(g)[0], torch.tensor([0.98, -2.09 - 0.1 * 5 * 0.5], dtype=DT))


@pytest.mark.parametrize("options", [{}, {"spike_compensation": True}, {"weight_prediction": True},
                                     {"spike_compensation": True, "weight_prediction": True}])
def test_zero_delay_reduces_to_torch_sgd(options):
    torch.manual_seed(0)
    w0 = torch.randn(5, dtype=DT)
    p1, p2 = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    ours = PipelineSGD([{"params": [p1], "delay": 0}], lr=0.05, momentum=0.9, weight_decay=0.01, **options)
    ref = torch.optim.SGD([p2], lr=0.05, momentum=0.9, weight_decay=0.01)
    for _ in range(6):
        g = torch.randn(5, dtype=DT)
        p1.grad, p2.grad = g.clone(), g.clone()
        ours.step(), ref.step()
        torch.testing.assert_close(p1, p2)
        torch.testing.assert_close(ours.forward_weights(ours.param_groups[0])[0], p2.detach())


def test_nesterov_and_decoupled_decay_match_references():
    torch.manual_seed(0)
    w0 = torch.randn(4, dtype=DT)
    p1, p2 = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    ours = PipelineSGD([p1], lr=0.1, momentum=0.9, weight_decay=0.02, nesterov=True)
    ref = torch.optim.SGD([p2], lr=0.1, momentum=0.9, weight_decay=0.02, nesterov=True)
    for _ in range(5):
        g = torch.randn(4, dtype=DT)
        p1.grad, p2.grad = g.clone(), g.clone()
        ours.step(), ref.step()
    torch.testing.assert_close(p1, p2)
    # decoupled: w <- w (1 - lr wd) - lr v, v from the raw gradient
    p = nn.Parameter(torch.tensor([2.0], dtype=DT))
    opt = PipelineSGD([p], lr=0.1, momentum=0.5, weight_decay=0.1, decoupled_weight_decay=True)
    p.grad = torch.tensor([1.0], dtype=DT)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([2.0 * 0.99 - 0.1], dtype=DT))


def test_optimizer_state_dict_round_trip_and_scheduler():
    p = nn.Parameter(torch.ones(3, dtype=DT))
    opt = PipelineSGD([{"params": [p], "delay": 4}], lr=0.1, momentum=0.9, spike_compensation=True)
    p.grad = torch.ones(3, dtype=DT)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    q = nn.Parameter(p.detach().clone())
    opt2 = PipelineSGD([{"params": [q], "delay": 0}], lr=0.5, momentum=0.0)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["delay"] == 4 and opt2.param_groups[0]["spike_compensation"]
    torch.testing.assert_close(opt2.state[q]["momentum_buffer"], torch.ones(3, dtype=DT))
    sched = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    q.grad = torch.zeros(3, dtype=DT)
    opt2.step(), sched.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.05)


def test_optimizer_rejects_bad_arguments():
    p = nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match="momentum"):
        PipelineSGD([p], lr=0.1, momentum=1.5)
    with pytest.raises(ValueError, match="heavy-ball"):
        PipelineSGD([p], lr=0.1, momentum=0.9, nesterov=True, spike_compensation=True)
    with pytest.raises(ValueError, match="lwp_mode"):
        PipelineSGD([p], lr=0.1, lwp_mode="quadratic")


# ----------------------------------------------------------------------------- simulator
@pytest.mark.parametrize("make", [mlp, small_cnn])
@pytest.mark.parametrize("batch", [1, 3])
def test_sgd_method_equals_torch_sgd_step_by_step(make, batch):
    torch.manual_seed(0)
    model = make()
    ref = copy.deepcopy(model)
    sim = pipeprop.build_simulator(model, F.cross_entropy, method="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    shape = (batch, 6) if make is mlp else (batch, 1, 6, 6)
    for _ in range(8):
        x, y = torch.randn(*shape, dtype=DT), torch.randint(0, 4, (batch,))
        loss = sim.step(x, y)
        opt.zero_grad()
        ref_loss = F.cross_entropy(ref(x), y)
        ref_loss.backward()
        opt.step()
        assert loss == pytest.approx(ref_loss.item(), rel=1e-12)
        for a, b in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_pb_differs_from_sgd_and_uses_stale_weights():
    torch.manual_seed(0)
    m1 = mlp()
    m2 = copy.deepcopy(m1)
    data = [(torch.randn(1, 6, dtype=DT), torch.randint(0, 4, (1,))) for _ in range(12)]
    pipeprop.train(m1, data, F.cross_entropy, method="sgd", lr=0.1, momentum=0.9)
    pipeprop.train(m2, data, F.cross_entropy, method="pb", lr=0.1, momentum=0.9)
    assert not torch.allclose(m1[0].weight, m2[0].weight)
    # the last stage has delay 0, but its inputs come from stale stages: weights also differ there
    assert not torch.allclose(m1[6].weight, m2[6].weight)


def test_weight_version_memory_matches_delays():
    model = mlp()
    part = pipeprop.partition(model)
    sizes = [st.num_parameters() * 8 for st in part]
    data = [(torch.randn(1, 6, dtype=DT), torch.tensor([1]))] * (max(part.delays) + 2)
    sim = pipeprop.build_simulator(part, F.cross_entropy, method="pb", lr=0.1)
    for x, y in data:
        sim.step(x, y)
    # plain PB: D_s stale versions besides the live weights, no copies of the live ones
    assert sim.weight_version_bytes() == part.weight_version_bytes() == sum(d * n for d, n in zip(part.delays, sizes))
    lwp = pipeprop.build_simulator(pipeprop.partition(mlp()), F.cross_entropy, method="pb+lwp", lr=0.1, momentum=0.9)
    for x, y in data:
        lwp.step(x, y)
    # LWP: D_s + 1 predicted versions per stage with D_s > 0
    assert lwp.weight_version_bytes() == sum((d + 1) * n for d, n in zip(part.delays, sizes) if d > 0)


def test_simulator_keeps_float64_and_float32():
    for dtype in (torch.float32, torch.float64):
        model = mlp().to(dtype)
        losses = pipeprop.train(
            model, [(torch.randn(2, 6, dtype=dtype), torch.tensor([0, 1]))] * 3, F.cross_entropy,
            method="pb+sc+lwp", lr=0.01, momentum=0.9,
        )
        assert len(losses) == 3 and all(p.dtype == dtype for p in model.parameters())


def test_simulator_state_dict_resumes_exactly():
    torch.manual_seed(0)
    data = [(torch.randn(1, 6, dtype=DT), torch.randint(0, 4, (1,))) for _ in range(16)]
    full = mlp()
    start = copy.deepcopy(full.state_dict())
    sim = pipeprop.build_simulator(full, F.cross_entropy, method="pb+sc+lwp", lr=0.1, momentum=0.9)
    for x, y in data:
        sim.step(x, y)

    half = mlp()
    half.load_state_dict(start)
    sim_a = pipeprop.build_simulator(half, F.cross_entropy, method="pb+sc+lwp", lr=0.1, momentum=0.9)
    for x, y in data[:7]:
        sim_a.step(x, y)
    ckpt = copy.deepcopy({"model": half.state_dict(), "opt": sim_a.optimizer.state_dict(), "sim": sim_a.state_dict()})
    resumed = mlp()
    resumed.load_state_dict(ckpt["model"])
    sim_b = pipeprop.build_simulator(resumed, F.cross_entropy, method="pb+sc+lwp", lr=0.1, momentum=0.9)
    sim_b.optimizer.load_state_dict(ckpt["opt"])
    sim_b.load_state_dict(ckpt["sim"])
    for x, y in data[7:]:
        sim_b.step(x, y)
    for a, b in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------- errors
def test_unknown_method_lists_choices():
    with pytest.raises(ValueError, match=r"unknown method 'pb\+magic'.*pb\+sc\+lwp"):
        pipeprop.train(mlp(), [], F.cross_entropy, method="pb+magic", lr=0.1)


def test_aliases_resolve():
    assert pipeprop.get_method("SC+LWP").name == "pb+sc+lwp"
    assert pipeprop.get_method("pipedream").weight_mode == "stash"
    assert pipeprop.get_method("none").name == "pb"


def test_nan_loss_stops_with_step_number():
    data = [(torch.randn(1, 6, dtype=DT), torch.tensor([1]))] * 3 + [(torch.full((1, 6), math.nan, dtype=DT), torch.tensor([1]))]
    with pytest.raises(pipeprop.DivergenceError, match="at step 3"):
        pipeprop.train(mlp(), data, F.cross_entropy, method="pb", lr=0.01)


def test_shape_mismatch_names_stage_and_shape():
    with pytest.raises(RuntimeError, match=r"stage 0 \(Linear > ReLU\) failed on input tensor of shape \(1, 5\)"):
        pipeprop.train(mlp(), [(torch.randn(1, 5, dtype=DT), torch.tensor([0]))], F.cross_entropy, method="pb", lr=0.1)


def test_simulator_rejects_mismatched_optimizer():
    part = pipeprop.partition(mlp())
    opt = PipelineSGD(pipeprop.stage_param_groups(part.stages[:2]), lr=0.1)
    with pytest.raises(ValueError, match="stage_param_groups"):
        pipeprop.PipelineSimulator(part.stages, opt, F.cross_entropy)


def test_core_imports_and_trains_without_the_cli_extras(tmp_path):
    """``import pipeprop`` (and its library subpackages) needs torch and numpy only."""
    import subprocess
    import sys
    import textwrap

    for name in ("matplotlib", "click", "tqdm", "sklearn"):  # packages that fail to import, as if absent
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed')\n")
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import torch
        from torch import nn
        import pipeprop, pipeprop.models, pipeprop.nn, pipeprop.data, pipeprop.scaling, pipeprop.analysis
        import pipeprop.distributed
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        data = [(torch.randn(1, 3), torch.tensor([1]))] * 5
        losses = pipeprop.train(model, data, nn.functional.cross_entropy, method="pb+sc+lwp", lr=0.1, momentum=0.9)
        assert len(losses) == 5
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
