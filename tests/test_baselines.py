"""The baseline mitigations (PipeMare, SpecTrain, gradient shrinking, Adaptive Braking, Nesterov) and the
SC/LWP variants: closed forms on hand-made numbers, reduction to SGD(M) at D = 0, an independent naive
pipeline for the methods that change the backward weights, simulator runs and checkpoint round trips."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeprop
from pipeprop.optim import PipelineSGD
from pipeprop.optim.baselines import (
    AdaptiveBrakingSGD,
    GradientShrinkSGD,
    PipeMare,
    SpecTrain,
    pipemare_decay,
    pipemare_lr_factor,
    shrink_factor,
)

DT = torch.float64
BASELINE_METHODS = ["pipemare", "spectrain", "pb+shrink", "pb+ab", "pb+sc+ab", "pb+sc+lwp+ab", "pb+nesterov",
                    "sgd+nesterov"]


def _param(values):
    return nn.Parameter(torch.tensor(values, dtype=DT))


def _step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g, dtype=DT)
    opt.step()


def _close(actual, expected):
    torch.testing.assert_close(actual.detach(), torch.tensor(expected, dtype=DT))


# ----------------------------------------------------------------------------- PipeMare
def test_pipemare_coefficients_by_hand():
    assert pipemare_lr_factor(4, 0, 10) == pytest.approx(0.25)  # 4^-1
    assert pipemare_lr_factor(4, 5, 10) == pytest.approx(0.5)  # 4^-(1/2)
    assert pipemare_lr_factor(4, 10, 10) == 1.0 and pipemare_lr_factor(4, 99, 10) == 1.0
    assert pipemare_lr_factor(0, 0, 10) == 1.0 and pipemare_lr_factor(7, 0, 0) == 1.0
    assert pipemare_decay(4) == pytest.approx(0.7071067811865476)  # 4^(-1/4); gamma^D = 1/D
    assert pipemare_decay(4) ** 4 == pytest.approx(0.25)
    assert pipemare_decay(1) == 0.0 and pipemare_decay(0) == 0.0


def test_pipemare_update_and_backward_weights_by_hand():
    p = _param([1.0, 1.0])
    opt = PipeMare([{"params": [p], "delay": 2}], lr=0.1, momentum=0.5, pipemare_warmup_steps=2, pipemare_decay=0.25)
    group = opt.param_groups[0]
    assert opt.backward_weights(group) is None  # nothing applied yet: forward and backward agree
    # step 1: lr factor 2^-1; v = g0; w1 = w0 - 0.05 g0; delta = 0.75 (w1 - w0)
    _step(opt, [p], [[1.0, -2.0]])
    _close(p, [0.95, 1.1])
    _close(opt.state[p]["pipemare_delta"], [-0.0375, 0.075])
    _close(opt.backward_weights(group)[0], [0.9875, 1.025])  # h = min(1, 2) = 1: w1 - delta
    # step 2: lr factor 2^-(1 - 1/2); v = 0.5 g0 + g1 = [2.5, -1]
    eta = 0.1 * 2**-0.5
    w2 = [0.95 - eta * 2.5, 1.1 + eta * 1.0]
    _step(opt, [p], [[2.0, 0.0]])
    _close(p, w2)
    delta2 = [0.25 * -0.0375 + 0.75 * (w2[0] - 0.95), 0.25 * 0.075 + 0.75 * (w2[1] - 1.1)]
    _close(opt.state[p]["pipemare_delta"], delta2)
    _close(opt.backward_weights(group)[0], [w2[0] - 2 * delta2[0], w2[1] - 2 * delta2[1]])  # h = 2
    # step 3: warm-up over, full lr; v = 0.5 [2.5, -1] + [0, 1] = [1.25, 0.5]
    _step(opt, [p], [[0.0, 1.0]])
    _close(p, [w2[0] - 0.1 * 1.25, w2[1] - 0.1 * 0.5])


def test_pipemare_options_switch_techniques_off():
    p = _param([1.0])
    opt = PipeMare([{"params": [p], "delay": 3}], lr=0.1, lr_rescheduling=False, discrepancy_correction=False)
    _step(opt, [p], [[1.0]])
    _close(p, [0.9])  # full lr from the start
    assert opt.backward_weights(opt.param_groups[0]) is None and "pipemare_delta" not in opt.state[p]


def test_pipemare_composes_with_scheduler_and_weight_decay():
    p = _param([2.0])
    opt = PipeMare([{"params": [p], "delay": 4}], lr=0.1, weight_decay=0.5, pipemare_warmup_steps=10)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5)  # halves the base lr; the stage factor 4^-1 multiplies it
    _step(opt, [p], [[1.0]])  # g = 1 + 0.5 * 2 = 2; w = 2 - 0.05 * 0.25 * 2
    _close(p, [2.0 - 0.05 * 0.25 * 2.0])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)  # the group's lr is never rewritten


def test_pipemare_factor_also_scales_weight_prediction():
    p = _param([1.0])
    opt = PipeMare([{"params": [p], "delay": 4}], lr=0.1, pipemare_warmup_steps=10, weight_prediction=True,
                   discrepancy_correction=False)
    _step(opt, [p], [[1.0]])  # k = 0: lr 0.1 / 4; v = 1
    _close(p, [1.0 - 0.025])
    # k = 1: the predicted forward weights move along the stage's current effective lr 0.1 * 4^-0.9
    _close(opt.forward_weights(opt.param_groups[0])[0], [0.975 - 0.1 * 4**-0.9 * 4 * 1.0])


# ----------------------------------------------------------------------------- SpecTrain
def test_spectrain_horizons_and_predictions_by_hand():
    a, b = _param([1.0, 2.0]), _param([-1.0])
    opt = SpecTrain([{"params": [a], "delay": 4}, {"params": [b], "delay": 0}], lr=0.1, momentum=0.5)
    g0, g1 = opt.param_groups
    # D_max = 4: stage 0 (D = 4) completes with its own backward (r = 0); stage 1 (D = 0) has r = 2
    assert (opt._lwp_horizon(g0), opt.backward_horizon(g0)) == (4, 0)
    assert (opt._lwp_horizon(g1), opt.backward_horizon(g1)) == (2, 2)
    assert not opt.forward_uses_live_weights(g1)
    _step(opt, [a, b], [[1.0, -1.0], [2.0]])  # v = g; a = [0.9, 2.1], b = [-1.2]
    _close(opt.forward_weights(g0)[0], [0.9 - 0.1 * 4 * 1.0, 2.1 + 0.1 * 4 * 1.0])
    assert opt.backward_weights(g0) is None
    _close(opt.forward_weights(g1)[0], [-1.2 - 0.1 * 2 * 2.0])
    _close(opt.backward_weights(g1)[0], [-1.2 - 0.1 * 2 * 2.0])
    _step(opt, [a, b], [[0.0, 0.0], [-2.0]])  # v_b = 0.5 * 2 - 2 = -1; b = -1.2 + 0.1 = -1.1
    _close(opt.backward_weights(g1)[0], [-1.1 + 0.1 * 2 * 1.0])
    # momentum-decay extrapolation: m (1 - m^2)/(1 - m) = 0.75 for the backward horizon 2
    g1["lwp_mode"] = "momentum-decay"
    _close(opt.backward_weights(g1)[0], [-1.1 + 0.1 * 0.75 * 1.0])
    # the "update" rule targets the version the stage's own update is applied to
    g1["lwp_mode"], g1["horizon_rule"], g0["horizon_rule"] = "linear", "update", "update"
    assert (opt._lwp_horizon(g0), opt.backward_horizon(g0), opt._lwp_horizon(g1)) == (4, 0, 0)
    assert opt.backward_weights(g1) is None and opt.forward_uses_live_weights(g1)
    g1["forward_horizon"], g1["backward_horizon"] = 3, 1
    _close(opt.backward_weights(g1)[0], [-1.1 + 0.1 * 1 * 1.0])
    assert opt._lwp_horizon(g1) == 3


def test_spectrain_pipeline_max_delay_for_partial_optimizers():
    p = _param([1.0])
    opt = SpecTrain([{"params": [p], "delay": 2}], lr=0.1, pipeline_max_delay=6)
    g = opt.param_groups[0]
    assert (opt._lwp_horizon(g), opt.backward_horizon(g)) == (4, 2)


# ----------------------------------------------------------------------------- gradient shrinking
def test_gradient_shrinking_by_hand():
    assert shrink_factor(4, "power", 0.5) == 0.0625
    assert shrink_factor(4, "inverse") == pytest.approx(0.2)
    assert shrink_factor(0, "power", 0.5) == 1.0 and shrink_factor(0, "inverse") == 1.0
    p = _param([1.0, 2.0])
    opt = GradientShrinkSGD([{"params": [p], "delay": 2}], lr=0.1, momentum=0.9, shrink_beta=0.5)
    _step(opt, [p], [[1.0, 2.0]])  # v = 0.25 g0
    _close(p, [1.0 - 0.1 * 0.25, 2.0 - 0.1 * 0.5])
    _step(opt, [p], [[4.0, 0.0]])  # v = 0.9 * [0.25, 0.5] + 0.25 * [4, 0] = [1.225, 0.45]
    _close(p, [0.975 - 0.1225, 1.95 - 0.045])
    q = _param([1.0])
    opt2 = GradientShrinkSGD([{"params": [q], "delay": 3}], lr=0.1, shrink_rule="inverse")
    _step(opt2, [q], [[1.0]])
    _close(q, [1.0 - 0.1 / 4])


# ----------------------------------------------------------------------------- Adaptive Braking
def test_adaptive_braking_per_tensor_by_hand():
    p = _param([1.0, 1.0])
    opt = AdaptiveBrakingSGD([{"params": [p], "delay": 2}], lr=0.1, momentum=0.5, ab_rho=1.0)
    _step(opt, [p], [[1.0, 0.0]])  # no velocity yet: no braking; v = [1, 0]
    _close(p, [0.9, 1.0])
    # g = [1, 1]: cos(g, v) = 1/sqrt(2); g~ = (1 - 0.70710678) g; v = 0.5 [1, 0] + g~
    f = 1.0 - 1.0 / math.sqrt(2.0)
    _step(opt, [p], [[1.0, 1.0]])
    _close(opt.state[p]["momentum_buffer"], [0.5 + f, f])
    _close(p, [0.9 - 0.1 * (0.5 + f), 1.0 - 0.1 * f])
    # a gradient opposing the velocity is amplified: cos = -1 gives factor 2
    v = [0.5 + f, f]
    g = [-v[0], -v[1]]
    _step(opt, [p], [g])
    _close(opt.state[p]["momentum_buffer"], [0.5 * v[0] + 2 * g[0], 0.5 * v[1] + 2 * g[1]])


def test_adaptive_braking_stage_scope_and_clip_by_hand():
    a, b = _param([0.0]), _param([0.0])
    opt = AdaptiveBrakingSGD([{"params": [a, b], "delay": 1}], lr=1.0, momentum=0.5, ab_rho=2.0, ab_scope="stage")
    _step(opt, [a, b], [[1.0], [0.0]])  # v = ([1], [0])
    # g = ([1], [1]): stage cosine = 1 / (sqrt(2) * 1); factor = 1 - 2/sqrt(2) applied to both tensors
    f = 1.0 - 2.0 / math.sqrt(2.0)
    _step(opt, [a, b], [[1.0], [1.0]])
    _close(opt.state[a]["momentum_buffer"], [0.5 + f])
    _close(opt.state[b]["momentum_buffer"], [f])
    # clip: rho = 2 and an opposing gradient (cos = -1) would give 3; clipped to 1.5
    p = _param([0.0])
    opt2 = AdaptiveBrakingSGD([p], lr=1.0, momentum=0.5, ab_rho=2.0, ab_clip=(0.0, 1.5))
    _step(opt2, [p], [[1.0]])
    _step(opt2, [p], [[-2.0]])
    _close(opt2.state[p]["momentum_buffer"], [0.5 - 1.5 * 2.0])


# ----------------------------------------------------------------------------- SC / LWP variants
def test_spike_compensation_user_coefficients():
    p = _param([1.0])
    opt = PipelineSGD([{"params": [p], "delay": 4}], lr=0.1, momentum=0.5, spike_compensation=True,
                      sc_coefficients=(2.0, 3.0))
    _step(opt, [p], [[1.0]])  # w -= 0.1 (2 v + 3 g) with v = g = 1
    _close(p, [0.5])
    q = _param([1.0])
    opt2 = PipelineSGD([{"params": [q], "delay": 4}], lr=0.1, momentum=0.5, spike_compensation=True, sc_delay=1,
                       sc_coefficients=lambda m, d: (m + d, 10.0 * d))  # called with (m, D_SC) = (0.5, 1)
    _step(opt2, [q], [[1.0]])
    _close(q, [1.0 - 0.1 * (1.5 + 10.0)])
    with pytest.raises(ValueError, match="sc_coefficients"):
        PipelineSGD([p], lr=0.1, sc_coefficients="big")


def test_spike_compensation_with_another_delay_by_hand():
    p = _param([1.0])  # true delay 4, coefficients for D_SC = 2 with m = 0.5: a = 0.25, b = 1.5
    opt = PipelineSGD([{"params": [p], "delay": 4}], lr=0.1, momentum=0.5, spike_compensation=True, sc_delay=2)
    _step(opt, [p], [[1.0]])
    _close(p, [1.0 - 0.1 * (0.25 + 1.5)])


def test_stash_composes_with_sc_and_baselines():
    torch.manual_seed(0)
    data = [(torch.randn(1, 6, dtype=DT), torch.randint(0, 4, (1,))) for _ in range(6)]
    for method, extra in (("pb+stash", {"spike_compensation": True}), ("pb+stash", {"nesterov": True})):
        sim = pipeprop.build_simulator(_mlp(), F.cross_entropy, method=method, lr=0.05, momentum=0.9, **extra)
        assert sim.weight_mode == "stash"
        assert all(math.isfinite(sim.step(x, y)) for x, y in data)


def test_lwp_along_the_sc_update_by_hand():
    p = _param([1.0])
    opt = PipelineSGD([{"params": [p], "delay": 2}], lr=0.1, momentum=0.5, spike_compensation=True,
                      weight_prediction=True, lwp_source="update")
    g = opt.param_groups[0]
    _step(opt, [p], [[1.0]])  # a = 0.25, b = 1.5: step direction 0.25 + 1.5 = 1.75; w = 0.825
    _close(p, [0.825])
    _close(opt.forward_weights(g)[0], [0.825 - 0.1 * 2 * 1.75])  # vs. velocity 1.0 by default
    g["lwp_source"] = "velocity"
    _close(opt.forward_weights(g)[0], [0.825 - 0.1 * 2 * 1.0])
    with pytest.raises(ValueError, match="lwp_source"):
        PipelineSGD([p], lr=0.1, lwp_source="gradient")


# ----------------------------------------------------------------------------- D = 0 reduces to SGD(M)
@pytest.mark.parametrize(
    "make",
    [
        lambda ps: PipeMare([{"params": ps, "delay": 0}], lr=0.05, momentum=0.9, weight_decay=0.01,
                            pipemare_warmup_steps=3),
        lambda ps: SpecTrain([{"params": ps, "delay": 0}], lr=0.05, momentum=0.9, weight_decay=0.01),
        lambda ps: GradientShrinkSGD([{"params": ps, "delay": 0}], lr=0.05, momentum=0.9, weight_decay=0.01),
        lambda ps: GradientShrinkSGD([{"params": ps, "delay": 0}], lr=0.05, momentum=0.9, weight_decay=0.01,
                                     shrink_rule="inverse"),
        lambda ps: AdaptiveBrakingSGD([{"params": ps, "delay": 3}], lr=0.05, momentum=0.9, weight_decay=0.01,
                                      ab_rho=0.0),
    ],
    ids=["pipemare", "spectrain", "shrink-power", "shrink-inverse", "ab-rho0"],
)
def test_zero_delay_reduces_to_torch_sgd_momentum(make):
    torch.manual_seed(0)
    w0 = [torch.randn(3, 2, dtype=DT), torch.randn(2, dtype=DT)]
    ours_p = [nn.Parameter(w.clone()) for w in w0]
    ref_p = [nn.Parameter(w.clone()) for w in w0]
    ours, ref = make(ours_p), torch.optim.SGD(ref_p, lr=0.05, momentum=0.9, weight_decay=0.01)
    for _ in range(6):
        grads = [torch.randn_like(w) for w in w0]
        for p, q, g in zip(ours_p, ref_p, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step(), ref.step()
        group = ours.param_groups[0]
        assert ours.backward_weights(group) is None
        for p, q, f in zip(ours_p, ref_p, ours.forward_weights(group)):
            torch.testing.assert_close(p, q)
            torch.testing.assert_close(f, q.detach())


def test_zero_delay_simulator_matches_plain_pytorch():
    """Through the whole engine: every baseline with all delays 0 trains like torch.optim.SGD."""
    torch.manual_seed(1)
    data = [(torch.randn(1, 4, dtype=DT), torch.randint(0, 3, (1,))) for _ in range(8)]
    init = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    ref = copy.deepcopy(init)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        opt.step()
    options = {"pipemare": {}, "spectrain": {}, "pb+shrink": {}, "pb+ab": {"ab_rho": 0.0}}
    for method, extra in options.items():
        model = copy.deepcopy(init)
        part = pipeprop.partition(model, "layer")
        optim_cls = pipeprop.get_method(method).optimizer
        optimizer = optim_cls(pipeprop.stage_param_groups(part.stages, [0] * len(part)), lr=0.1, momentum=0.9,
                              weight_decay=0.01, **extra)
        sim = pipeprop.PipelineSimulator(part.stages, optimizer, F.cross_entropy)
        for x, y in data:
            sim.step(x, y)
        for a, b in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, msg=method)


# ----------------------------------------------------------------------------- naive pipeline reference
def _naive_linear_pipeline(method, weights, data, lr, m, warmup=2, gamma=0.25):
    """Sequential PB for y = W_{S-1} ... W_0 x (no bias), loss 0.5 ||y - t||^2, delays D_s = 2 (S-1-s).

    Written from the formulas: the forward of micro-batch n uses stage s's forward weights of version
    max(0, n - D_s); the error flows back through every stage's backward weights of version n; then every
    stage updates with SGDM (plus the method's rule).
    """
    S = len(weights)
    delays = [2 * (S - 1 - s) for s in range(S)]
    w = [x.clone() for x in weights]
    v = [None] * S
    delta = [torch.zeros_like(x) for x in weights]
    fwd_hist = [[] for _ in range(S)]  # forward weights per version

    def r(s):  # SpecTrain: steps until the micro-batch completes = (D_max - D_s) / 2 = s
        return (max(delays) - delays[s]) // 2

    def predicted(s, horizon):
        return w[s] if v[s] is None else w[s] - lr * horizon * v[s]

    def record_forward_weights():
        for s in range(S):
            fwd_hist[s].append((predicted(s, delays[s] + r(s)) if method == "spectrain" else w[s]).clone())

    record_forward_weights()
    for n, (x, t) in enumerate(data):
        acts = [x]
        for s in range(S):
            acts.append(fwd_hist[s][max(0, n - delays[s])] @ acts[-1])
        if method == "spectrain":
            w_bwd = [predicted(s, r(s)) for s in range(S)]
        else:  # PipeMare: live weights extrapolated back by min(n, D) EMA deltas
            w_bwd = [w[s] - min(n, delays[s]) * delta[s] for s in range(S)]
        err = acts[-1] - t
        grads = [None] * S
        for s in reversed(range(S)):
            grads[s] = torch.outer(err, acts[s])
            err = w_bwd[s].T @ err
        for s in range(S):
            eta = lr
            if method == "pipemare":
                eta = lr * max(delays[s], 1) ** -max(0.0, 1.0 - n / warmup)
            v[s] = grads[s].clone() if v[s] is None else m * v[s] + grads[s]
            old = w[s].clone()
            w[s] = w[s] - eta * v[s]
            if method == "pipemare":
                g_s = gamma if delays[s] > 1 else 0.0
                delta[s] = g_s * delta[s] + (1 - g_s) * (w[s] - old)
        record_forward_weights()
    return w


@pytest.mark.parametrize("method", ["spectrain", "pipemare"])
def test_backward_weight_methods_match_naive_pipeline(method):
    torch.manual_seed(3)
    shapes = [(3, 2), (3, 3), (2, 3)]
    w0 = [0.7 * torch.randn(*sh, dtype=DT) for sh in shapes]
    data = [(torch.randn(2, dtype=DT), torch.randn(2, dtype=DT)) for _ in range(9)]
    expected = _naive_linear_pipeline(method, w0, data, lr=0.05, m=0.5)
    model = nn.Sequential(*[nn.Linear(sh[1], sh[0], bias=False) for sh in shapes]).to(DT)
    with torch.no_grad():
        for layer, w in zip(model, w0):
            layer.weight.copy_(w)
    opts = {"pipemare_warmup_steps": 2, "pipemare_decay": 0.25} if method == "pipemare" else {}
    sim = pipeprop.build_simulator(model, lambda out, t: 0.5 * ((out - t) ** 2).sum(), method=method, lr=0.05,
                                   momentum=0.5, **opts)
    assert [g["delay"] for g in sim.optimizer.param_groups] == [4, 2, 0]
    for x, t in data:
        sim.step(x.unsqueeze(0), t.unsqueeze(0))
    for layer, w in zip(model, expected):
        torch.testing.assert_close(layer.weight.detach(), w)


def test_pipemare_backward_correction_reaches_earlier_stages():
    """Three linear stages: stage 1 (D = 2) feeds its corrected backward weights to stage 0's gradient."""
    torch.manual_seed(4)
    model = nn.Sequential(*[nn.Linear(2, 2, bias=False) for _ in range(3)]).to(DT)
    plain = copy.deepcopy(model)
    loss = lambda out, t: 0.5 * ((out - t) ** 2).sum()  # noqa: E731
    data = [(torch.randn(1, 2, dtype=DT), torch.randn(1, 2, dtype=DT)) for _ in range(6)]
    on = pipeprop.build_simulator(model, loss, method="pipemare", lr=0.1, momentum=0.5, lr_rescheduling=False)
    off = pipeprop.build_simulator(plain, loss, method="pipemare", lr=0.1, momentum=0.5, lr_rescheduling=False,
                                   discrepancy_correction=False)
    for x, t in data:
        on.step(x, t), off.step(x, t)
    assert not torch.allclose(model[0].weight, plain[0].weight)
    torch.testing.assert_close(model[2].weight, plain[2].weight, rtol=0, atol=0)  # last stage sees no correction


# ----------------------------------------------------------------------------- simulator runs and checkpoints
def _mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)).to(DT)


@pytest.mark.parametrize("method", BASELINE_METHODS)
def test_every_baseline_trains_in_the_simulator(method):
    torch.manual_seed(0)
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(24, 6, dtype=DT)
    y = torch.randint(0, 4, (24,))
    losses = pipeprop.train(model, [(x[i:i + 1], y[i:i + 1]) for i in range(24)], F.cross_entropy, method=method,
                            lr=0.05, momentum=0.9, weight_decay=1e-3)
    assert len(losses) == 24 and all(math.isfinite(v) for v in losses)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("method", ["pipemare", "spectrain", "pb+shrink", "pb+ab", "pb+sc+lwp+ab"])
def test_baseline_checkpoint_resumes_exactly(method):
    torch.manual_seed(0)
    data = [(torch.randn(1, 6, dtype=DT), torch.randint(0, 4, (1,))) for _ in range(12)]
    kwargs = dict(method=method, lr=0.1, momentum=0.9, weight_decay=1e-3)
    if method == "pipemare":
        kwargs["pipemare_warmup_steps"] = 8
    full = _mlp()
    start = copy.deepcopy(full.state_dict())
    sim = pipeprop.build_simulator(full, F.cross_entropy, **kwargs)
    for x, y in data:
        sim.step(x, y)
    half = _mlp()
    half.load_state_dict(start)
    sim_a = pipeprop.build_simulator(half, F.cross_entropy, **kwargs)
    for x, y in data[:5]:
        sim_a.step(x, y)
    ckpt = copy.deepcopy({"model": half.state_dict(), "opt": sim_a.optimizer.state_dict(), "sim": sim_a.state_dict()})
    resumed = _mlp()
    resumed.load_state_dict(ckpt["model"])
    sim_b = pipeprop.build_simulator(resumed, F.cross_entropy, **kwargs)
    sim_b.optimizer.load_state_dict(ckpt["opt"])
    sim_b.load_state_dict(ckpt["sim"])
    for x, y in data[5:]:
        sim_b.step(x, y)
    for a, b in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_methods_are_registered_with_aliases():
    names = pipeprop.available_methods()
    for name in BASELINE_METHODS:
        assert name in names
    assert pipeprop.get_method("PipeMare").optimizer is PipeMare
    assert pipeprop.get_method("adaptive-braking").optimizer is AdaptiveBrakingSGD
    assert pipeprop.get_method("nesterov").options == {"nesterov": True}
    assert not pipeprop.get_method("sgd+nesterov").pipelined


def test_bad_options_name_the_fix():
    p = nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match="pipemare_decay"):
        PipeMare([p], lr=0.1, pipemare_decay=1.5)
    with pytest.raises(ValueError, match="horizon_rule"):
        SpecTrain([p], lr=0.1, horizon_rule="far")
    with pytest.raises(ValueError, match="weight_prediction"):
        SpecTrain([p], lr=0.1, weight_prediction=False)
    with pytest.raises(ValueError, match="shrink_rule"):
        GradientShrinkSGD([p], lr=0.1, shrink_rule="log")
    with pytest.raises(ValueError, match="shrink_beta"):
        GradientShrinkSGD([p], lr=0.1, shrink_beta=0.0)
    with pytest.raises(ValueError, match="ab_scope"):
        AdaptiveBrakingSGD([p], lr=0.1, ab_scope="layer")
    with pytest.raises(ValueError, match="ab_clip"):
        AdaptiveBrakingSGD([p], lr=0.1, ab_clip=(2.0, 1.0))


def test_pipemare_counts_one_update_per_step_for_the_schedule():
    """Regression: PipeMare's step called the (torch-wrapped) parent step, so once any PipelineSGD existed in
    the process every step ran the step hooks twice and the learning-rate schedule advanced twice as fast."""
    from pipeprop.optim import PipelineSGD

    PipelineSGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)  # torch wraps PipelineSGD.step on first use
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = PipeMare([w], lr=0.1, momentum=0.9, pipemare_warmup_steps=4)
    seen = []
    opt.set_lr_schedule(lambda k: seen.append(k) or 1.0)
    for _ in range(5):
        w.grad = torch.ones_like(w)
        opt.step()
    assert opt.param_groups[0]["updates"] == 5
    assert seen[-1] == 4  # the schedule was asked at update counts 0..4, one per step
