"""No silent fallback: tensors autograd saves that are *derived* from weights see the live weights under PB.

Each case is checked against a hand-written sequential PB reference (every weight version kept; the forward
of micro-batch n at stage s reads version n - D_s, the backward reads version n) or must raise a clear
error. The references compute input gradients with hand-written formulas through the weights they are
given, and weight gradients from the stashed forward activations.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

import pipeprop

DT = torch.float64


def _data(n, batch, features, classes, dtype=DT, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(batch, features, generator=g).to(dtype) for _ in range(n)]
    ys = [torch.randint(0, classes, (batch,), generator=g) for _ in range(n)]
    return xs, ys


# ----------------------------------------------------------------------------- float64: derived weights
def wn(g, v):
    """weight_norm's weight: g * v / ||v|| over all dims but 0."""
    return g * v / v.norm(dim=1, keepdim=True)


def effective(kind, W, key):
    if kind == "wn":
        return wn(W[f"{key}.g"], W[f"{key}.v"])
    return W[f"{key}.weight"]


def pb_reference(layers, weights, xs, ys, lr, stash):
    """Sequential PB over tanh-MLP stages ``layers = [(kind, key), ...]`` (last one without tanh), plain SGD."""
    S = len(layers)
    delays = [2 * (S - 1 - s) for s in range(S)]
    hist = [dict(weights)]
    losses = []
    for n, (x, y) in enumerate(zip(xs, ys)):
        tape, h = [], x
        for s, (kind, key) in enumerate(layers):
            fw = hist[max(0, n - delays[s])]
            z = h @ effective(kind, fw, key).T + fw[f"{key}.bias"]
            out = torch.tanh(z) if s < S - 1 else z
            tape.append((h, out, fw))
            h = out
        p = torch.softmax(h, 1)
        losses.append(float(-torch.log(p[torch.arange(len(y)), y]).mean()))
        d = (p - F.one_hot(y, h.shape[1]).to(DT)) / len(y)
        live = hist[n]
        new = dict(live)
        for s in reversed(range(S)):
            kind, key = layers[s]
            x_in, out, fw = tape[s]
            dz = d * (1 - out * out) if s < S - 1 else d
            bw = fw if stash else live
            dW = dz.T @ x_in
            grads = {f"{key}.bias": dz.sum(0)}
            if kind == "wn":  # backprop dW through the weight-norm map at the backward weights
                g_, v_ = bw[f"{key}.g"].clone().requires_grad_(), bw[f"{key}.v"].clone().requires_grad_()
                dg, dv = torch.autograd.grad(wn(g_, v_), (g_, v_), dW)
                grads.update({f"{key}.g": dg, f"{key}.v": dv})
            else:
                grads[f"{key}.weight"] = dW
            d = dz @ effective(kind, bw, key)
            for k, g in grads.items():
                new[k] = live[k] - lr * g
        hist.append(new)
    return hist[-1], losses


class TransposeCopyLinear(nn.Module):
    """``x @ w.t().contiguous()``: autograd saves a copy of the weight, not a view."""

    def __init__(self, i, o):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i, dtype=DT) / i**0.5)
        self.bias = nn.Parameter(torch.randn(o, dtype=DT) * 0.1)

    def forward(self, x):
        return x @ self.weight.t().contiguous() + self.bias


def _wn_linear(i, o):
    return parametrizations.weight_norm(nn.Linear(i, o).to(DT))


def _weights(model, layers):
    out = {}
    for (kind, key), mod in zip(layers, [model[0], model[2], model[4]]):
        if kind == "wn":
            out[f"{key}.g"] = mod.parametrizations.weight.original0.detach().clone()
            out[f"{key}.v"] = mod.parametrizations.weight.original1.detach().clone()
        else:
            out[f"{key}.weight"] = mod.weight.detach().clone()
        out[f"{key}.bias"] = mod.bias.detach().clone()
    return out


@pytest.mark.parametrize("case", ["weight_norm", "transpose_copy"])
@pytest.mark.parametrize("method", ["pb", "pb+stash"])
def test_derived_weights_equal_reference(case, method):
    torch.manual_seed(2)
    if case == "weight_norm":
        model = nn.Sequential(_wn_linear(4, 5), nn.Tanh(), _wn_linear(5, 5), nn.Tanh(), nn.Linear(5, 3).to(DT))
        layers = [("wn", "a"), ("wn", "b"), ("lin", "c")]
    else:
        model = nn.Sequential(TransposeCopyLinear(4, 5), nn.Tanh(), TransposeCopyLinear(5, 5), nn.Tanh(), nn.Linear(5, 3).to(DT))
        layers = [("lin", "a"), ("lin", "b"), ("lin", "c")]
    xs, ys = _data(10, 2, 4, 3)
    ref, ref_losses = pb_reference(layers, _weights(model, layers), xs, ys, lr=0.3, stash=method == "pb+stash")
    part = pipeprop.partition(model, "layer")
    assert len(part) == 3
    sim = pipeprop.build_simulator(part, F.cross_entropy, method=method, lr=0.3)
    losses = [sim.step(x, y) for x, y in zip(xs, ys)]
    torch.testing.assert_close(torch.tensor(losses, dtype=DT), torch.tensor(ref_losses, dtype=DT), rtol=1e-10, atol=1e-12)
    got = _weights(model, layers)
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=1e-10, atol=1e-12, msg=k)
    if method == "pb":
        assert sim._track[1]  # stage 1's saved derived weight was found and replayed


def test_reference_tells_pb_from_stash_for_derived_weights():
    torch.manual_seed(2)
    model = nn.Sequential(_wn_linear(4, 5), nn.Tanh(), _wn_linear(5, 5), nn.Tanh(), nn.Linear(5, 3).to(DT))
    layers = [("wn", "a"), ("wn", "b"), ("lin", "c")]
    xs, ys = _data(10, 2, 4, 3)
    pb, _ = pb_reference(layers, _weights(model, layers), xs, ys, lr=0.3, stash=False)
    st, _ = pb_reference(layers, _weights(model, layers), xs, ys, lr=0.3, stash=True)
    assert not torch.allclose(pb["a.v"], st["a.v"])


# ----------------------------------------------------------------------------- autograd.Function and ctx
class CtxLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x)
        ctx.w = w  # kept on ctx: the backward would read whatever w holds then
        return x @ w.t()

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return dy @ ctx.w, dy.t() @ x


class SavedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        return dy @ w, dy.t() @ x


class FnLinear(nn.Module):
    def __init__(self, fn, i, o):
        super().__init__()
        self.fn = fn
        self.weight = nn.Parameter(torch.randn(o, i, dtype=DT) / i**0.5)
        self.bias = nn.Parameter(torch.zeros(o, dtype=DT))

    def forward(self, x):
        return self.fn.apply(x, self.weight) + self.bias


@pytest.mark.parametrize("method", ["pb", "pb+stash"])
def test_weight_kept_on_ctx_is_a_clear_error(method):
    model = nn.Sequential(FnLinear(CtxLinearFn, 4, 5), nn.Tanh(), FnLinear(CtxLinearFn, 5, 3))
    sim = pipeprop.build_simulator(model, F.cross_entropy, method=method, lr=0.1)
    xs, ys = _data(1, 2, 4, 3)
    with pytest.raises(RuntimeError, match=r"CtxLinearFn keeps the weight .*ctx\.w.*save_for_backward"):
        sim.step(xs[0], ys[0])


@pytest.mark.parametrize("method", ["pb", "pb+stash"])
def test_function_saving_its_weight_is_exact(method):
    torch.manual_seed(4)
    model = nn.Sequential(FnLinear(SavedLinearFn, 4, 5), nn.Tanh(), FnLinear(SavedLinearFn, 5, 5), nn.Tanh(), nn.Linear(5, 3).to(DT))
    layers = [("lin", "a"), ("lin", "b"), ("lin", "c")]
    xs, ys = _data(10, 2, 4, 3)
    ref, _ = pb_reference(layers, _weights(model, layers), xs, ys, lr=0.3, stash=method == "pb+stash")
    pipeprop.train(model, zip(xs, ys), F.cross_entropy, method=method, lr=0.3)
    for k, v in _weights(model, layers).items():
        torch.testing.assert_close(v, ref[k], rtol=1e-10, atol=1e-12, msg=k)


def test_random_op_on_weights_is_a_clear_error():
    class DropConnect(nn.Linear):
        def forward(self, x):
            return F.linear(x, F.dropout(self.weight, 0.5, training=True), self.bias)

    model = nn.Sequential(DropConnect(4, 5).to(DT), nn.Tanh(), nn.Linear(5, 3).to(DT))
    sim = pipeprop.build_simulator(model, F.cross_entropy, method="pb", lr=0.1)
    xs, ys = _data(1, 2, 4, 3)
    with pytest.raises(RuntimeError, match="random op"):
        sim.step(xs[0], ys[0])


# ----------------------------------------------------------------------------- bf16 autocast
BF = torch.bfloat16


def bf16_reference(weights, xs, ys, lr, stash):
    """Sequential PB of Linear-Tanh-Linear-Tanh-Linear under bf16 autocast, with the aten ops autograd uses:
    the forward casts the stale fp32 weights, the backward the live ones (or the stale ones: ``stash``)."""
    S, keys = 3, ["0", "2", "4"]
    delays = [2 * (S - 1 - s) for s in range(S)]
    hist = [dict(weights)]
    losses = []
    for n, (x, y) in enumerate(zip(xs, ys)):
        tape, h = [], x.to(BF)
        for s, key in enumerate(keys):
            fw = hist[max(0, n - delays[s])]
            z = torch.addmm(fw[f"{key}.bias"].to(BF), h, fw[f"{key}.weight"].to(BF).t())
            out = torch.tanh(z) if s < S - 1 else z
            tape.append((h, out, fw))
            h = out
        logits = h.float().requires_grad_()
        loss = F.cross_entropy(logits, y)
        losses.append(float(loss.detach()))
        (d,) = torch.autograd.grad(loss, logits)
        d = d.to(BF)
        live = hist[n]
        new = dict(live)
        for s in reversed(range(S)):
            key = keys[s]
            x_in, out, fw = tape[s]
            dz = torch.ops.aten.tanh_backward(d, out) if s < S - 1 else d
            bw = fw if stash else live
            dW = dz.t().mm(x_in).float()
            db = dz.sum(0).float()
            d = dz.mm(bw[f"{key}.weight"].to(BF))
            new[f"{key}.weight"] = torch.add(live[f"{key}.weight"], dW, alpha=-lr)
            new[f"{key}.bias"] = torch.add(live[f"{key}.bias"], db, alpha=-lr)
        hist.append(new)
    return hist[-1], losses


def _mlp32():
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def test_bf16_autocast_pb_casts_the_live_weights():
    xs, ys = _data(12, 2, 6, 3, dtype=torch.float32, seed=3)
    results = {}
    for method in ("pb", "pb+stash"):
        model = _mlp32()
        init = {k: v.detach().clone() for k, v in model.state_dict().items()}
        losses = pipeprop.train(model, zip(xs, ys), F.cross_entropy, method=method, lr=0.5, precision="bf16-mixed")
        ref, ref_losses = bf16_reference(init, xs, ys, lr=0.5, stash=method == "pb+stash")
        assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, ref[k], rtol=0, atol=0, msg=f"{method} {k}")
        assert losses == pytest.approx(ref_losses, rel=0, abs=0)
        results[method] = model.state_dict()
    assert not torch.equal(results["pb"]["0.weight"], results["pb+stash"]["0.weight"])
