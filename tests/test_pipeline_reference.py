"""The simulator against an independent, explicit tick-by-tick pipeline written here.

The reference below shares no code with pipeprop: layers are plain tensors with hand-written forward and
backward passes, every stage is an object with its own forward/backward queues and stashed activations,
and the pipeline advances one step at a time. Within a step every stage runs the forward of the
micro-batch entering it, then the backward of the error arriving, then updates (pipeprop's convention).
The backward's input gradient uses the weights current at backward time (PB) or the stashed forward
weights (weight stashing); weight gradients always come from the stashed activations.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import pipeprop

DT = torch.float64


# ----------------------------------------------------------------------------- models under test
class Fork(nn.Module):
    def forward(self, x):
        return (x, x)


class ConvReLUOnMain(nn.Module):
    """(h, skip) -> (relu(conv(h)), skip)"""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, hs):
        h, s = hs
        return (F.relu(self.conv(h)), s)


class AddSkip(nn.Module):
    def forward(self, hs):
        h, s = hs
        return h + s


def make_mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)
    ).to(DT)


def make_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(),
        Fork(), ConvReLUOnMain(2, 2), AddSkip(),
        nn.Flatten(), nn.Linear(2 * 4 * 4, 3),
    ).to(DT)


# ----------------------------------------------------------------------------- hand-written layers
# Each op: forward(x, W) -> (y, cache); backward(cache, dy, W_bwd) -> (dx, dW). W is a dict or None.
def lin_fwd(x, W):
    return x @ W["w"].T + W["b"], x


def lin_bwd(x, dy, W):
    return dy @ W["w"], {"w": dy.T @ x, "b": dy.sum(0)}


def tanh_fwd(x, W):
    y = torch.tanh(x)
    return y, y


def tanh_bwd(y, dy, W):
    return dy * (1 - y * y), {}


def relu_fwd(x, W):
    return x.clamp_min(0), x


def relu_bwd(x, dy, W):
    return dy * (x > 0).to(dy.dtype), {}


def conv_fwd(x, W):
    return F.conv2d(x, W["w"], W["b"], padding=1), x


def conv_bwd(x, dy, W):
    dx = torch.nn.grad.conv2d_input(x.shape, W["w"], dy, padding=1)
    dw = torch.nn.grad.conv2d_weight(x, W["w"].shape, dy, padding=1)
    return dx, {"w": dw, "b": dy.sum((0, 2, 3))}


def flat_fwd(x, W):
    return x.reshape(x.shape[0], -1), x.shape


def flat_bwd(shape, dy, W):
    return dy.reshape(shape), {}


# Stage programs: list of (op name, param key or None). Ops act on a tuple state for the skip net.
MLP_STAGES = [
    [("lin", "l0"), ("tanh", None)],
    [("lin", "l1"), ("tanh", None)],
    [("lin", "l2"), ("tanh", None)],
    [("lin", "l3")],
]
CNN_STAGES = [
    [("conv", "c0"), ("relu", None), ("fork", None)],
    [("convmain", "c1"), ("relumain", None), ("add", None), ("flat", None)],
    [("lin", "l0")],
]
OPS = {
    "lin": (lin_fwd, lin_bwd), "tanh": (tanh_fwd, tanh_bwd), "relu": (relu_fwd, relu_bwd),
    "conv": (conv_fwd, conv_bwd), "flat": (flat_fwd, flat_bwd),
}


def run_ops(program, x, weights):
    """Forward through a stage program; returns output and the tape for the backward."""
    tape = []
    for op, key in program:
        W = weights.get(key)
        if op == "fork":
            x = (x, x)
            tape.append((op, key, None))
        elif op == "add":
            x = x[0] + x[1]
            tape.append((op, key, None))
        elif op.endswith("main"):
            f, _ = OPS[op[: -len("main")]]
            h, cache = f(x[0], W)
            x = (h, x[1])
            tape.append((op, key, cache))
        else:
            f, _ = OPS[op]
            x, cache = f(x, W)
            tape.append((op, key, cache))
    return x, tape


def back_ops(tape, dy, weights):
    grads = {}
    for op, key, cache in reversed(tape):
        W = weights.get(key)
        if op == "fork":
            dy = dy[0] + dy[1]
        elif op == "add":
            dy = (dy, dy)
        elif op.endswith("main"):
            _, b = OPS[op[: -len("main")]]
            dh, g = b(cache, dy[0], W)
            dy = (dh, dy[1])
            if g:
                grads[key] = g
        else:
            _, b = OPS[op]
            dy, g = b(cache, dy, W)
            if g:
                grads[key] = g
    return dy, grads


# ----------------------------------------------------------------------------- the tick-by-tick pipeline
class RefStage:
    def __init__(self, program, weights, delay, cfg):
        self.program, self.delay, self.cfg = program, delay, cfg
        self.w = weights  # {key: {"w": t, "b": t}}
        self.v = {k: {n: torch.zeros_like(t) for n, t in d.items()} for k, d in weights.items()}
        self.inflight = {}  # micro-batch -> (tape, forward weights)

    def forward_weights(self):
        c = self.cfg
        if not c["lwp"]:
            return {k: {n: t.clone() for n, t in d.items()} for k, d in self.w.items()}
        T = self.delay
        return {k: {n: t - c["lr"] * T * self.v[k][n] for n, t in d.items()} for k, d in self.w.items()}

    def forward(self, n, x):
        fw = self.forward_weights()
        y, tape = run_ops(self.program, x, fw)
        self.inflight[n] = (tape, fw)
        return y

    def backward(self, n, dy):
        tape, fw = self.inflight.pop(n)
        bw = fw if self.cfg["stash"] else self.w
        dx, grads = back_ops(tape, dy, bw)
        self.update(grads)
        return dx

    def update(self, grads):
        c = self.cfg
        m, lr, wd, D = c["momentum"], c["lr"], c["wd"], self.delay
        for k, d in grads.items():
            for name, g in d.items():
                w = self.w[k][name]
                g = g + wd * w
                v = m * self.v[k][name] + g
                self.v[k][name] = v
                if c["sc"]:
                    a, b = m**D, sum(m**j for j in range(D))
                    step = a * v + b * g
                else:
                    step = v
                self.w[k][name] = w - lr * step


def reference_pipeline(programs, weights_per_stage, xs, ys, cfg):
    S = len(programs)
    delays = [2 * (S - 1 - s) for s in range(S)]
    stages = [RefStage(p, w, d, cfg) for p, w, d in zip(programs, weights_per_stage, delays)]
    N = len(xs)
    act = {}  # (stage receiving, n) -> (value, step produced)
    err = {}  # (stage receiving, n) -> (value, step produced)
    losses = [None] * N
    for t in range(N + 2 * (S - 1)):
        for s, st in enumerate(stages):
            n = t - s  # forward of micro-batch n enters stage s now
            if 0 <= n < N:
                if s == 0:
                    x = xs[n]
                else:
                    x, made = act.pop((s, n))
                    assert made < t
                y = st.forward(n, x)
                if s < S - 1:
                    act[(s + 1, n)] = (y, t)
                else:  # loss right after the last stage's forward; its error is available this step
                    p = torch.softmax(y, 1)
                    losses[n] = float(-torch.log(p[torch.arange(len(ys[n])), ys[n]]).mean())
                    dy = (p - F.one_hot(ys[n], y.shape[1]).to(DT)) / len(ys[n])
                    err[(s, n)] = (dy, t)
            nb = t - 2 * (S - 1) + s  # backward of micro-batch nb at stage s now
            if 0 <= nb < N:
                dy, made = err.pop((s, nb))
                assert made <= t and (made < t or s == S - 1)
                dx = st.backward(nb, dy)
                if s > 0:
                    err[(s - 1, nb)] = (dx, t)
    assert not act and not err
    return stages, losses


def split_weights(model: nn.Sequential, kind: str):
    """The model's parameters in the reference's per-stage dict layout."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if kind == "mlp":
        keys = ["0", "2", "4", "6"]
        return [{f"l{i}": {"w": sd[f"{k}.weight"], "b": sd[f"{k}.bias"]}} for i, k in enumerate(keys)]
    return [
        {"c0": {"w": sd["0.weight"], "b": sd["0.bias"]}},
        {"c1": {"w": sd["3.conv.weight"], "b": sd["3.conv.bias"]}},
        {"l0": {"w": sd["6.weight"], "b": sd["6.bias"]}},
    ]


def model_stage_weights(model: nn.Sequential, kind: str):
    return split_weights(model, kind)


METHODS = {
    "pb": dict(sc=False, lwp=False, stash=False),
    "pb+sc": dict(sc=True, lwp=False, stash=False),
    "pb+lwp": dict(sc=False, lwp=True, stash=False),
    "pb+sc+lwp": dict(sc=True, lwp=True, stash=False),
    "pb+stash": dict(sc=False, lwp=False, stash=True),
}


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("method", list(METHODS))
def test_simulator_equals_tick_by_tick_pipeline(kind, batch, method):
    torch.manual_seed(1)
    model = make_mlp() if kind == "mlp" else make_cnn()
    programs = MLP_STAGES if kind == "mlp" else CNN_STAGES
    N = 14
    shape = (batch, 5) if kind == "mlp" else (batch, 1, 4, 4)
    xs = [torch.randn(*shape, dtype=DT) for _ in range(N)]
    ys = [torch.randint(0, 3, (batch,)) for _ in range(N)]
    cfg = dict(lr=0.2, momentum=0.8, wd=0.01, **METHODS[method])

    ref_stages, ref_losses = reference_pipeline(programs, split_weights(model, kind), xs, ys, cfg)

    part = pipeprop.partition(model, "layer")
    assert len(part) == len(programs)
    sim = pipeprop.build_simulator(part, F.cross_entropy, method=method, lr=0.2, momentum=0.8, weight_decay=0.01)
    losses = [sim.step(x, y) for x, y in zip(xs, ys)]

    torch.testing.assert_close(torch.tensor(losses, dtype=DT), torch.tensor(ref_losses, dtype=DT), rtol=1e-10, atol=1e-12)
    got = model_stage_weights(model, kind)
    for s, (g, r) in enumerate(zip(got, [st.w for st in ref_stages])):
        for key in r:
            for name in ("w", "b"):
                torch.testing.assert_close(g[key][name], r[key][name], rtol=1e-10, atol=1e-12, msg=f"stage {s} {key}.{name}")


def test_reference_detects_weight_inconsistency():
    """Guard: PB and weight stashing give different weights, so the test above can tell them apart."""
    torch.manual_seed(1)
    model = make_mlp()
    xs = [torch.randn(1, 5, dtype=DT) for _ in range(10)]
    ys = [torch.randint(0, 3, (1,)) for _ in range(10)]
    base = dict(lr=0.2, momentum=0.8, wd=0.0)
    pb, _ = reference_pipeline(MLP_STAGES, split_weights(model, "mlp"), xs, ys, dict(base, **METHODS["pb"]))
    st, _ = reference_pipeline(MLP_STAGES, split_weights(copy.deepcopy(model), "mlp"), xs, ys, dict(base, **METHODS["pb+stash"]))
    assert not torch.allclose(pb[0].w["l0"]["w"], st[0].w["l0"]["w"])
