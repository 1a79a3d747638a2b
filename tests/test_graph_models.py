"""Graph-captured stages from ordinary nn.Modules, against references written here.

The references share no code with pipeprop: layers are hand-written forward/backward ops on named
registers (so skip connections are just registers that stay alive), run by an explicit tick-by-tick
pipeline (every stage, every step, stashed activations) or, for tied weights, by a sequential process that
keeps every weight version.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeprop

DT = torch.float64


# ----------------------------------------------------------------------------- models under test
class ResMLP(nn.Module):
    """An ordinary module with a skip connection crossing a stage, in-place add and inplace ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 6)
        self.act = nn.ReLU(inplace=True)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        assert x.shape[-1] == 5, "expects 5 features"
        h = torch.tanh(self.inp(x))
        identity = h
        h = torch.tanh(self.fc1(h))
        h = self.fc2(h)
        h += identity
        h = self.act(h)
        return self.out(h)


RES_PROGRAM = [
    [("lin", "x", "z0", "inp"), ("tanh", "z0", "h0")],
    [("lin", "h0", "z1", "fc1"), ("tanh", "z1", "h1")],
    [("lin", "h1", "z2", "fc2"), ("add", ("z2", "h0"), "s2"), ("relu", "s2", "h2")],
    [("lin", "h2", "out", "out")],
]


class TiedMLP(nn.Module):
    """Input embedding tied to the output layer (as a GPT's token embedding and LM head)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(4, 6, bias=False)  # weight (6, 4)
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        h = torch.tanh(self.emb(x))
        h = torch.tanh(self.fc(h))
        return h @ self.emb.weight  # logits over 4 classes, through the same parameter


class TiedMiddle(nn.Module):
    """A weight read by stage 0 and again by stage 2 (delay 2): that stage keeps its own versions."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(4, 6, bias=False)
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(4, 4)

    def forward(self, x):
        h = torch.tanh(self.fc(torch.tanh(self.emb(x))))
        return self.out(torch.tanh(h @ self.emb.weight))


TIED_PROGRAM = [
    [("lin", "x", "z0", "emb"), ("tanh", "z0", "h0")],
    [("lin", "h0", "z1", "fc"), ("tanh", "z1", "h1")],
    [("tied", "h1", "out", "emb")],
]


# ----------------------------------------------------------------------------- hand-written ops on registers
def run_program(program, regs, W):
    """Forward a stage program over a dict of registers; returns the new registers and the tape."""
    regs = dict(regs)
    tape = []
    for op in program:
        kind, src, dst = op[0], op[1], op[2]
        if kind == "lin":
            key = op[3]
            x = regs[src]
            y = x @ W[f"{key}.weight"].T
            if f"{key}.bias" in W:
                y = y + W[f"{key}.bias"]
            tape.append((kind, src, dst, key, x))
        elif kind == "tied":
            key = op[3]
            x = regs[src]
            y = x @ W[f"{key}.weight"]
            tape.append((kind, src, dst, key, x))
        elif kind == "tanh":
            y = torch.tanh(regs[src])
            tape.append((kind, src, dst, None, y))
        elif kind == "relu":
            y = regs[src].clamp_min(0)
            tape.append((kind, src, dst, None, regs[src] > 0))
        elif kind == "add":
            y = regs[src[0]] + regs[src[1]]
            tape.append((kind, src, dst, None, None))
        regs[dst] = y
    return regs, tape


def back_program(tape, dregs, W):
    """Backward through a tape with weights ``W``; returns register gradients and weight gradients."""
    g = dict(dregs)
    grads = {}

    def acc(d, k, v):
        d[k] = d[k] + v if k in d else v

    for kind, src, dst, key, cache in reversed(tape):
        if dst not in g:
            continue
        dy = g.pop(dst)
        if kind == "lin":
            acc(g, src, dy @ W[f"{key}.weight"])
            acc(grads, f"{key}.weight", dy.T @ cache)
            if f"{key}.bias" in W:
                acc(grads, f"{key}.bias", dy.sum(0))
        elif kind == "tied":
            acc(g, src, dy @ W[f"{key}.weight"].T)
            acc(grads, f"{key}.weight", cache.T @ dy)
        elif kind == "tanh":
            acc(g, src, dy * (1 - cache * cache))
        elif kind == "relu":
            acc(g, src, dy * cache.to(dy.dtype))
        elif kind == "add":
            acc(g, src[0], dy)
            acc(g, src[1], dy)
    return g, grads


def xent(out, y):
    p = torch.softmax(out, 1)
    loss = float(-torch.log(p[torch.arange(len(y)), y]).mean())
    return loss, (p - F.one_hot(y, out.shape[1]).to(DT)) / len(y)


def sgd_update(w, v, g, cfg, delay):
    g = g + cfg["wd"] * w
    v = cfg["momentum"] * v + g
    if cfg["sc"]:
        m = cfg["momentum"]
        step = m**delay * v + sum(m**j for j in range(delay)) * g
    else:
        step = v
    return w - cfg["lr"] * step, v


# ----------------------------------------------------------------------------- tick-by-tick pipeline
class RefStage:
    def __init__(self, program, weights, delay, cfg):
        self.program, self.delay, self.cfg = program, delay, cfg
        self.w = weights
        self.v = {k: torch.zeros_like(t) for k, t in weights.items()}
        self.inflight = {}

    def forward(self, n, regs):
        c = self.cfg
        fw = {k: (t - c["lr"] * self.delay * self.v[k]) if c["lwp"] else t.clone() for k, t in self.w.items()}
        out, tape = run_program(self.program, regs, fw)
        self.inflight[n] = (tape, fw)
        return out

    def backward(self, n, dregs):
        tape, fw = self.inflight.pop(n)
        dx, grads = back_program(tape, dregs, fw if self.cfg["stash"] else self.w)
        for k, g in grads.items():
            self.w[k], self.v[k] = sgd_update(self.w[k], self.v[k], g, self.cfg, self.delay)
        return dx


def tick_pipeline(programs, weights, xs, ys, cfg):
    S = len(programs)
    stages = [RefStage(p, w, 2 * (S - 1 - s), cfg) for s, (p, w) in enumerate(zip(programs, weights))]
    act, err, losses = {}, {}, [None] * len(xs)
    for t in range(len(xs) + 2 * (S - 1)):
        for s, st in enumerate(stages):
            n = t - s
            if 0 <= n < len(xs):
                regs = {"x": xs[n]} if s == 0 else act.pop((s, n))
                out = st.forward(n, regs)
                if s < S - 1:
                    act[(s + 1, n)] = out
                else:
                    losses[n], dy = xent(out["out"], ys[n])
                    err[(s, n)] = {"out": dy}
            nb = t - 2 * (S - 1) + s
            if 0 <= nb < len(xs):
                dregs = st.backward(nb, err.pop((s, nb)))
                if s > 0:
                    err[(s - 1, nb)] = dregs
    assert not act and not err
    return [st.w for st in stages], losses


METHODS = {
    "pb": dict(sc=False, lwp=False, stash=False),
    "pb+sc+lwp": dict(sc=True, lwp=True, stash=False),
    "pb+stash": dict(sc=False, lwp=False, stash=True),
}


def _data(n, batch, features, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(batch, features, generator=g, dtype=DT) for _ in range(n)]
    ys = [torch.randint(0, classes, (batch,), generator=g) for _ in range(n)]
    return xs, ys


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", list(METHODS))
def test_residual_module_equals_tick_by_tick_pipeline(method):
    torch.manual_seed(3)
    model = ResMLP().to(DT)
    sd = _state(model)
    stage_keys = [["inp"], ["fc1"], ["fc2"], ["out"]]
    weights = [{f"{k}.{n}": sd[f"{k}.{n}"] for k in keys for n in ("weight", "bias")} for keys in stage_keys]
    xs, ys = _data(12, 2, 5, 3)
    cfg = dict(lr=0.2, momentum=0.8, wd=0.01, **METHODS[method])
    ref_w, ref_losses = tick_pipeline(RES_PROGRAM, weights, xs, ys, cfg)

    losses = pipeprop.train(model, zip(xs, ys), F.cross_entropy, method=method, lr=0.2, momentum=0.8, weight_decay=0.01)

    torch.testing.assert_close(torch.tensor(losses, dtype=DT), torch.tensor(ref_losses, dtype=DT), rtol=1e-10, atol=1e-12)
    got = _state(model)
    for w in ref_w:
        for k, v in w.items():
            torch.testing.assert_close(got[k], v, rtol=1e-10, atol=1e-12, msg=k)


def test_residual_module_stages_and_carried_skip():
    model = ResMLP().to(DT)
    part = pipeprop.partition(model, "layer", example_input=torch.randn(2, 5, dtype=DT))
    assert len(part) == 4
    assert part.delays == [6, 4, 2, 0]
    assert [st.names[0] for st in part] == ["inp", "fc1", "fc2", "out"]
    # the stages hold the user's own parameters
    assert {id(p) for p in part.parameters()} == {id(p) for p in model.parameters()}
    # stage 1 passes the skip (stage 0's output) on to stage 2 along with its own output
    h = part[0](torch.randn(2, 5, dtype=DT))
    assert len(h) == 1 and len(part[1](h)) == 2
    text = part.summary()
    assert "nodes:" in text and "linear" in text and "fc2" in text
    assert len(pipeprop.partition(model, 2, example_input=torch.randn(2, 5, dtype=DT))) == 2
    sp = pipeprop.partition(model, split_points=["fc2"], example_input=torch.randn(2, 5, dtype=DT))
    assert len(sp) == 2 and sp[1].names[0] == "fc2"
    with pytest.raises(ValueError, match="shape"):
        part[0](torch.randn(3, 5, dtype=DT))


def test_wrong_micro_batch_shape_names_the_fix():
    model = ResMLP().to(DT)
    sim = pipeprop.build_simulator(model, F.cross_entropy, method="pb", lr=0.1, example_input=torch.randn(2, 5, dtype=DT))
    with pytest.raises(ValueError, match="example input's shape"):
        sim.step(torch.randn(3, 5, dtype=DT), torch.zeros(3, dtype=torch.long))


class MLPModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(5, 7), nn.Linear(7, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def test_custom_module_and_sequential_give_identical_weights():
    torch.manual_seed(0)
    custom = MLPModule().to(DT)
    seq = nn.Sequential(copy.deepcopy(custom.l1), nn.Tanh(), copy.deepcopy(custom.l2), nn.Tanh(), copy.deepcopy(custom.l3))
    xs, ys = _data(15, 1, 5, 3, seed=1)
    kw = dict(method="pb+sc+lwp", lr=0.1, momentum=0.9, weight_decay=1e-3)
    la = pipeprop.train(custom, zip(xs, ys), F.cross_entropy, **kw)
    lb = pipeprop.train(seq, zip(xs, ys), F.cross_entropy, **kw)
    assert la == lb
    for a, b in zip([custom.l1, custom.l2, custom.l3], [seq[0], seq[2], seq[4]]):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_sequential_wrapping_a_module_is_split_not_one_stage():
    model = nn.Sequential(ResMLP().to(DT))
    x = torch.randn(2, 5, dtype=DT)
    assert len(pipeprop.partition(model, "layer", example_input=x)) == 4
    with pytest.raises(TypeError, match="example_input"):
        pipeprop.partition(model, "layer")
    sim = pipeprop.build_simulator(model, F.cross_entropy, method="pb", lr=0.1, example_input=x)
    assert len(sim.stages) == 4


# ----------------------------------------------------------------------------- tied weights
TIED_MIDDLE_PROGRAM = [
    [("lin", "x", "z0", "emb"), ("tanh", "z0", "h0")],
    [("lin", "h0", "z1", "fc"), ("tanh", "z1", "h1")],
    [("tied", "h1", "z2", "emb"), ("tanh", "z2", "h2")],
    [("lin", "h2", "out", "out")],
]


def tied_reference(program, owner_stage, weights, xs, ys, cfg):
    """Sequential PB with every weight version kept: the forward of stage s reads version n - D_s of each
    parameter (predicted with horizon D_s under LWP), the backward reads version n, the gradients of all
    uses are summed, and each parameter is updated once per step with its owner's (first reader's) delay."""
    TIED_PROGRAM = program
    S = len(TIED_PROGRAM)
    delays = [2 * (S - 1 - s) for s in range(S)]
    owner_delay = {k: delays[owner_stage[k.split(".")[0]]] for k in weights}
    hist_w = [dict(weights)]
    hist_v = [{k: torch.zeros_like(t) for k, t in weights.items()}]
    losses = []
    for n, (x, y) in enumerate(zip(xs, ys)):
        regs, tapes, used = {"x": x}, [], []
        for s, program in enumerate(TIED_PROGRAM):
            v = max(0, n - delays[s])
            fw = {k: (hist_w[v][k] - cfg["lr"] * delays[s] * hist_v[v][k]) if cfg["lwp"] else hist_w[v][k] for k in weights}
            regs, tape = run_program(program, regs, fw)
            tapes.append((tape, fw))
        loss, dy = xent(regs["out"], y)
        losses.append(loss)
        dregs, total = {"out": dy}, {}
        for s in reversed(range(S)):
            tape, fw = tapes[s]
            dregs, grads = back_program(tape, dregs, fw if cfg["stash"] else hist_w[n])
            for k, g in grads.items():
                total[k] = total[k] + g if k in total else g
        new_w, new_v = {}, {}
        for k in weights:
            new_w[k], new_v[k] = sgd_update(hist_w[n][k], hist_v[n][k], total[k], cfg, owner_delay[k])
        hist_w.append(new_w)
        hist_v.append(new_v)
    return hist_w[-1], losses


@pytest.mark.parametrize("kind", ["end", "middle"])
@pytest.mark.parametrize("method", list(METHODS))
def test_tied_weights_equal_reference_and_stay_tied(method, kind):
    torch.manual_seed(5)
    model = (TiedMLP() if kind == "end" else TiedMiddle()).to(DT)
    program = TIED_PROGRAM if kind == "end" else TIED_MIDDLE_PROGRAM
    xs, ys = _data(12, 2, 4, 4, seed=2)
    part = pipeprop.partition(model, "layer", example_input=xs[0])
    assert len(part) == len(program)
    shared = part.shared_parameters()
    assert len(shared) == 1 and shared[0][0] is model.emb.weight and shared[0][1] == [0, 2]
    cfg = dict(lr=0.1, momentum=0.7, wd=0.0, **METHODS[method])
    ref_w, ref_losses = tied_reference(program, {"emb": 0, "fc": 1, "out": 3}, _state(model), xs, ys, cfg)

    sim = pipeprop.build_simulator(part, F.cross_entropy, method=method, lr=0.1, momentum=0.7)
    losses = [sim.step(x, y) for x, y in zip(xs, ys)]

    torch.testing.assert_close(torch.tensor(losses, dtype=DT), torch.tensor(ref_losses, dtype=DT), rtol=1e-10, atol=1e-12)
    got = _state(model)
    for k, v in ref_w.items():
        torch.testing.assert_close(got[k], v, rtol=1e-10, atol=1e-12, msg=k)
    assert part[0][0].graph_module.p_emb_weight is part[2][0].graph_module.p_emb_weight is model.emb.weight


def test_tied_weights_resume_bit_exactly_from_a_state_dict():
    """The versions a later stage keeps of a shared weight are part of the simulator's state."""
    torch.manual_seed(5)
    xs, ys = _data(12, 2, 4, 4, seed=2)
    a = TiedMiddle().to(DT)
    b = copy.deepcopy(a)
    kw = dict(method="pb+sc+lwp", lr=0.1, momentum=0.7, example_input=xs[0])
    sim_a = pipeprop.build_simulator(a, F.cross_entropy, **kw)
    for x, y in zip(xs, ys):
        sim_a.step(x, y)
    sim_b = pipeprop.build_simulator(b, F.cross_entropy, **kw)
    for x, y in zip(xs[:5], ys[:5]):
        sim_b.step(x, y)
    state = copy.deepcopy((b.state_dict(), sim_b.optimizer.state_dict(), sim_b.state_dict()))
    assert len(sim_b.stages) == 4 and "reader_rings" in state[2]
    c = TiedMiddle().to(DT)
    sim_c = pipeprop.build_simulator(c, F.cross_entropy, **kw)
    c.load_state_dict(state[0])
    sim_c.optimizer.load_state_dict(state[1])
    sim_c.load_state_dict(state[2])
    for x, y in zip(xs[5:], ys[5:]):
        sim_c.step(x, y)
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q)
