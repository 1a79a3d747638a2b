"""Online Normalization against an in-test reference from ONLINE_NORM.md; Weight Standardization under PB."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeprop
import pipeprop.data
import pipeprop.models
from pipeprop.nn import GroupNorm, OnlineNorm, WSConv2d, WSLinear, make_norm
from pipeprop.weight_swap import rebound_saved_weights, swapped_weights


# ---------------------------------------------------------------------------------------------- reference
class ReferenceOnlineNorm:
    """Online Normalization written directly from the equations, one sample at a time (float64, loops)."""

    def __init__(self, c, a_f, a_b, eps=1e-5, gamma=None, beta=None, ecm="none", clamp=5.0):
        self.m = [0.0] * c
        self.var = [1.0] * c
        self.u = [0.0] * c
        self.v = [0.0] * c
        self.a_f, self.a_b, self.eps, self.ecm, self.clamp = a_f, a_b, eps, ecm, clamp
        self.gamma = gamma if gamma is not None else torch.ones(c, dtype=torch.float64)
        self.beta = beta if beta is not None else torch.zeros(c, dtype=torch.float64)
        self.saved = []
        self.grad_gamma = torch.zeros(c, dtype=torch.float64)
        self.grad_beta = torch.zeros(c, dtype=torch.float64)

    def forward(self, x):  # x: [C, *spatial]
        c = x.shape[0]
        ys, scales = [], []
        for ch in range(c):
            xc = x[ch].reshape(-1)
            scale = (self.var[ch] + self.eps) ** 0.5
            ys.append((xc - self.m[ch]) / scale)
            scales.append(scale)
            mu = float(xc.mean())
            s2 = float(((xc - mu) ** 2).mean())
            self.var[ch] = self.a_f * self.var[ch] + (1 - self.a_f) * s2 + self.a_f * (1 - self.a_f) * (mu - self.m[ch]) ** 2
            self.m[ch] = self.m[ch] + (1 - self.a_f) * (mu - self.m[ch])
        y = torch.stack(ys).reshape(x.shape)
        z = y * self.gamma.view((-1,) + (1,) * (x.dim() - 1)) + self.beta.view((-1,) + (1,) * (x.dim() - 1))
        if self.ecm == "ls":
            ls_scale = (float((z**2).mean()) + self.eps) ** 0.5
            out = z / ls_scale
        elif self.ecm == "ac":
            ls_scale = None
            out = z.clamp(-self.clamp, self.clamp)
        else:
            ls_scale, out = None, z
        self.saved.append((y, scales, z, out, ls_scale))
        return out

    def backward(self, g_out):  # in the order the samples were forwarded
        y, scales, z, out, ls_scale = self.saved.pop(0)
        if self.ecm == "ls":
            g = (g_out - (g_out * out).mean() * out) / ls_scale
        elif self.ecm == "ac":
            g = g_out * ((z >= -self.clamp) & (z <= self.clamp)).to(g_out.dtype)
        else:
            g = g_out
        self.grad_gamma = self.grad_gamma + (g * y).reshape(g.shape[0], -1).sum(1)
        self.grad_beta = self.grad_beta + g.reshape(g.shape[0], -1).sum(1)
        g = g * self.gamma.view((-1,) + (1,) * (g.dim() - 1))
        dx = torch.empty_like(g)
        for ch in range(g.shape[0]):
            gc = g[ch].reshape(-1) - (1 - self.a_b) * self.v[ch] * y[ch].reshape(-1)
            self.v[ch] += float((gc * y[ch].reshape(-1)).mean())
            gc = gc / scales[ch]
            dxc = gc - (1 - self.a_b) * self.u[ch]
            self.u[ch] += float(dxc.mean())
            dx[ch] = dxc.reshape(g[ch].shape)
        return dx


def _stream(n, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    xs = [3.0 * torch.randn(shape, generator=gen, dtype=torch.float64) + 1.5 for _ in range(n)]
    gs = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(n)]
    return xs, gs


@pytest.mark.parametrize("ecm", ["none", "ls", "ac"])
@pytest.mark.parametrize("shape", [(3, 4, 5), (6,)])
def test_online_norm_matches_reference_over_a_stream(ecm, shape):
    c = shape[0]
    mod = OnlineNorm(c, alpha_fwd=0.9, alpha_bkw=0.8, ecm=ecm, clamp=1.5).double()
    with torch.no_grad():
        mod.weight.copy_(torch.linspace(0.5, 2.0, c, dtype=torch.float64))
        mod.bias.copy_(torch.linspace(-0.3, 0.4, c, dtype=torch.float64))
    ref = ReferenceOnlineNorm(c, 0.9, 0.8, gamma=mod.weight.detach().clone(), beta=mod.bias.detach().clone(),
                              ecm=ecm, clamp=1.5)
    xs, gs = _stream(12, shape, seed=1)
    clipped = 0
    for x, g in zip(xs, gs):  # batch size one: forward then backward, sample after sample
        xx = x.unsqueeze(0).requires_grad_(True)
        out = mod(xx)
        expect = ref.forward(x)
        torch.testing.assert_close(out[0].detach(), expect, rtol=1e-10, atol=1e-10)
        out.backward(g.unsqueeze(0))
        torch.testing.assert_close(xx.grad[0], ref.backward(g), rtol=1e-10, atol=1e-10)
        if ecm == "ac":
            clipped += int((out.detach().abs() >= 1.5).sum())
    torch.testing.assert_close(mod.running_mean, torch.tensor(ref.m, dtype=torch.float64))
    torch.testing.assert_close(mod.running_var, torch.tensor(ref.var, dtype=torch.float64))
    torch.testing.assert_close(mod.u, torch.tensor(ref.u, dtype=torch.float64))
    torch.testing.assert_close(mod.v, torch.tensor(ref.v, dtype=torch.float64))
    torch.testing.assert_close(mod.weight.grad, ref.grad_gamma, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mod.bias.grad, ref.grad_beta, rtol=1e-10, atol=1e-10)
    assert mod.u.abs().sum() > 0 and mod.v.abs().sum() > 0  # the control terms were exercised
    if ecm == "ac":
        assert clipped > 0  # the clamp was exercised


def test_online_norm_batch_is_a_loop_over_samples_with_default_decays():
    mod = OnlineNorm(4).double()
    ref = ReferenceOnlineNorm(4, 0.999, 0.99, ecm="ls")
    xs, gs = _stream(5, (4, 3, 3), seed=2)
    for _ in range(2):  # two batches of five; the state carries over
        x = torch.stack(xs).requires_grad_(True)
        out = mod(x)
        expect = torch.stack([ref.forward(xi) for xi in xs])
        torch.testing.assert_close(out.detach(), expect, rtol=1e-10, atol=1e-10)
        out.backward(torch.stack(gs))
        torch.testing.assert_close(x.grad, torch.stack([ref.backward(gi) for gi in gs]), rtol=1e-10, atol=1e-10)


def test_online_norm_backward_uses_the_live_affine_weight():
    """Under the simulator's weight swap the forward uses the stale gamma, the backward the live one."""
    torch.manual_seed(4)
    mod = OnlineNorm(3, alpha_fwd=0.9, alpha_bkw=0.8, ecm="none").double()
    ref = OnlineNorm(3, alpha_fwd=0.9, alpha_bkw=0.8, ecm="none").double()
    live_w = torch.tensor([0.5, 1.5, -2.0], dtype=torch.float64)
    stale_w = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    bias = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    with torch.no_grad():
        for m in (mod, ref):
            m.weight.copy_(live_w)
            m.bias.copy_(bias)
    for _ in range(3):
        x = torch.randn(1, 3, 2, 2, dtype=torch.float64)
        g = torch.randn(1, 3, 2, 2, dtype=torch.float64)
        xa = x.clone().requires_grad_(True)
        stale = stale_w.clone()
        with rebound_saved_weights({(0, 0): stale}, lambda s, i: mod.weight.data):
            with swapped_weights([mod.weight], [stale]):
                out = mod(xa)
        xb = x.clone().requires_grad_(True)
        out_ref = ref(xb)
        y = (out_ref - bias.view(1, -1, 1, 1)) / live_w.view(1, -1, 1, 1)
        torch.testing.assert_close(out.detach(), y.detach() * stale_w.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1))
        out.backward(g)
        out_ref.backward(g)
        torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(mod.u, ref.u)
    torch.testing.assert_close(mod.weight.grad, ref.weight.grad)


def test_online_norm_state_is_in_state_dict_and_eval_uses_running_stats():
    mod = OnlineNorm(3)
    for _ in range(4):
        out = mod(torch.randn(1, 3, 4, 4) * 2 + 1)
        out.sum().backward()
    sd = mod.state_dict()
    assert {"running_mean", "running_var", "u", "v"} <= set(sd)
    clone = OnlineNorm(3)
    clone.load_state_dict(sd)
    x = torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(clone(x), mod(x))
    mod.eval()
    x = torch.randn(2, 3, 4, 4)
    before = mod.running_mean.clone()
    expect = (x - mod.running_mean.view(1, -1, 1, 1)) / torch.sqrt(mod.running_var.view(1, -1, 1, 1) + mod.eps)
    expect = expect * mod.weight.view(1, -1, 1, 1) + mod.bias.view(1, -1, 1, 1)
    expect = expect / torch.sqrt(expect.pow(2).mean(dim=(1, 2, 3), keepdim=True) + mod.eps)
    torch.testing.assert_close(mod(x), expect)
    assert torch.equal(before, mod.running_mean)


def test_online_norm_bad_input_and_options():
    with pytest.raises(ValueError, match="ecm"):
        OnlineNorm(3, ecm="bogus")
    with pytest.raises(ValueError, match="alpha_fwd"):
        OnlineNorm(3, alpha_fwd=1.0)
    with pytest.raises(ValueError, match=r"\[N, 3"):
        OnlineNorm(3)(torch.randn(1, 4, 2, 2))


@pytest.mark.parametrize("affine", [True, False])
def test_online_norm_state_advances_in_sample_order_in_the_pb_simulator(affine):
    """Record every sample's input (and, without affine/ECM, its incoming error) at the norm during PB
    training; replaying them in order into a fresh OnlineNorm gives the same state: stale-weight forwards
    neither skip nor double-count samples."""
    torch.manual_seed(0)
    ecm = "ls" if affine else "none"
    norm = OnlineNorm(8, alpha_fwd=0.9, alpha_bkw=0.9, affine=affine, ecm=ecm)
    model = nn.Sequential(nn.Linear(6, 8), norm, nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    inputs, errors, grad_inputs = [], [], []
    norm.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()))

    def record_errors(module, grad_input, grad_output):
        errors.append(grad_output[0].detach().clone())
        grad_inputs.append(grad_input[0].detach().clone())

    norm.register_full_backward_hook(record_errors)
    sim = pipeprop.build_simulator(model, nn.functional.cross_entropy, method="pb", lr=0.05, momentum=0.5)
    assert [st.delay for st in sim.stages] == [4, 2, 0]
    gen = torch.Generator().manual_seed(3)
    for _ in range(15):
        sim.step(torch.randn(1, 6, generator=gen), torch.randint(0, 3, (1,), generator=gen))
    assert len(inputs) == len(errors) == 15
    replay = OnlineNorm(8, alpha_fwd=0.9, alpha_bkw=0.9, affine=False, ecm="none")
    for x, g, gin in zip(inputs, errors, grad_inputs):
        xx = x.clone().requires_grad_(True)
        out = replay(xx)
        if not affine:
            out.backward(g)
            torch.testing.assert_close(xx.grad, gin)
    torch.testing.assert_close(replay.running_mean, norm.running_mean)
    torch.testing.assert_close(replay.running_var, norm.running_var)
    if not affine:
        torch.testing.assert_close(replay.u, norm.u)
        torch.testing.assert_close(replay.v, norm.v)
        assert norm.u.abs().sum() > 0


def test_online_norm_trains_in_the_simulator():
    data = pipeprop.data.load_digits()
    model = pipeprop.models.get("mlp", norm="online", in_features=64, hidden=32, depth=3)
    sim = pipeprop.build_simulator(model, F.cross_entropy, method="pb+sc+lwp", lr=0.02, momentum=0.9)
    stream = pipeprop.data.MicroBatchStream(data, batch_size=1, epochs=1, seed=0)
    losses = [sim.step(x, y) for x, y in itertools.islice(stream, 400)]
    assert sum(losses[-100:]) / 100 < 0.8 * sum(losses[:100]) / 100


# ---------------------------------------------------------------------------------------------- WS and GN
def _standardize(w, eps=1e-5):
    flat = w.reshape(w.shape[0], -1)
    mean = flat.mean(1, keepdim=True)
    std = ((flat - mean) ** 2).mean(1, keepdim=True).add(eps).sqrt()
    return ((flat - mean) / std).reshape(w.shape)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_weight_standardization_forward_and_gradients(kind):
    torch.manual_seed(1)
    if kind == "conv":
        layer = WSConv2d(3, 4, 3, stride=2, padding=1, bias=True).double()
        x = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)
        naive = lambda inp, w: F.conv2d(inp, _standardize(w), layer.bias, stride=2, padding=1)  # noqa: E731
    else:
        layer = WSLinear(5, 4, bias=True).double()
        x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
        naive = lambda inp, w: F.linear(inp, _standardize(w), layer.bias)  # noqa: E731
    out = layer(x)
    w_ref = layer.weight.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = naive(x_ref, w_ref)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.weight.grad, w_ref.grad)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_weight_standardization_uses_live_weights_in_the_pb_backward(kind):
    """Forward with stale weights A, backward rebound to live weights B (what the simulator does): the output
    comes from A, and the input and weight gradients are those of the naive layer evaluated at B."""
    torch.manual_seed(2)
    if kind == "conv":
        layer = WSConv2d(3, 4, 3, padding=1, bias=False).double()
        x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
        naive = lambda inp, w: F.conv2d(inp, _standardize(w), padding=1)  # noqa: E731
    else:
        layer = WSLinear(5, 4, bias=False).double()
        x = torch.randn(1, 5, dtype=torch.float64)
        naive = lambda inp, w: F.linear(inp, _standardize(w))  # noqa: E731
    live = layer.weight.detach().clone()
    stale = live + 0.3 * torch.randn_like(live)
    xx = x.clone().requires_grad_(True)
    with rebound_saved_weights({(0, 0): stale}, lambda s, i: layer.weight.data):
        with swapped_weights([layer.weight], [stale]):
            out = layer(xx)
    torch.testing.assert_close(out, naive(x, stale))
    g = torch.randn_like(out)
    out.backward(g)
    x_ref = x.clone().requires_grad_(True)
    w_ref = live.clone().requires_grad_(True)
    naive(x_ref, w_ref).backward(g)
    torch.testing.assert_close(xx.grad, x_ref.grad)
    torch.testing.assert_close(layer.weight.grad, w_ref.grad)
    # and they differ from the gradients at the stale weights (so the check above can fail)
    x_stale = x.clone().requires_grad_(True)
    naive(x_stale, stale).backward(g)
    assert not torch.allclose(xx.grad, x_stale.grad)


def test_ws_gn_model_trains_in_the_simulator():
    data = pipeprop.data.load_digits()
    model = pipeprop.models.get("cnn-small", norm="ws+gn", in_channels=1, width=4)
    assert any(isinstance(m, WSConv2d) for m in model.modules())
    sim = pipeprop.build_simulator(model, F.cross_entropy, method="pb", lr=0.01, momentum=0.9)
    stream = pipeprop.data.MicroBatchStream(data, batch_size=1, epochs=1, seed=0)
    losses = [sim.step(x, y) for x, y in itertools.islice(stream, 400)]
    assert sum(losses[-100:]) / 100 < 0.8 * sum(losses[:100]) / 100


def test_group_norm_helper_and_make_norm():
    gn = GroupNorm(16, groups=32)
    assert gn.num_groups == 16
    assert GroupNorm(64, groups=8).num_groups == 8
    with pytest.raises(ValueError, match="gn_groups"):
        GroupNorm(12, groups=8)
    x = torch.randn(2, 16, 3, 3)
    torch.testing.assert_close(gn(x), F.group_norm(x, 16, gn.weight, gn.bias))
    assert make_norm("none", 4) is None
    assert isinstance(make_norm("online", 4, dims=1), OnlineNorm)
    assert isinstance(make_norm("bn", 4), nn.BatchNorm2d)
    with pytest.raises(ValueError, match="choose one of"):
        make_norm("layernorm", 4)
