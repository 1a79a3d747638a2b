"""Adam, AdamW and NAdam under PB: torch equivalence, closed forms, a tick-by-tick pipeline, checkpoints.

The tick-by-tick reference reuses the explicit pipeline of ``test_pipeline_reference`` (hand-written
layers, per-stage queues) with its stage update replaced by AdamW written here from the formulas.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeprop
from pipeprop.optim import PipelineAdam

import test_pipeline_reference as ref

DT = torch.float64


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


def _batches(n: int, b: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 5, generator=g, dtype=DT), torch.randint(0, 3, (b,), generator=g)) for _ in range(n)]


# ----------------------------------------------------------------------------- no delay: equal to torch.optim
TORCH_EQUIVALENTS = {
    "adamw": lambda params, wd: torch.optim.AdamW(params, lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd),
    "adam": lambda params, wd: torch.optim.Adam(params, lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd),
    "nadam": lambda params, wd: torch.optim.NAdam(params, lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd),
}


@pytest.fixture
def float64_scalars():
    """torch keeps NAdam's step and μ-product in the default dtype: float64 makes its reference exact."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("name", list(TORCH_EQUIVALENTS))
def test_no_delay_equals_torch_optimizer_step_by_step(name, foreach, float64_scalars):
    torch.manual_seed(0)
    model = _mlp()
    twin = copy.deepcopy(model)
    wd = 0.05
    sim = pipeprop.build_simulator(model, F.cross_entropy, method="sgd", optimizer=name, lr=0.01, betas=(0.8, 0.95),
                                   eps=1e-6, weight_decay=wd, foreach=foreach)
    assert isinstance(sim.optimizer, PipelineAdam)
    opt = TORCH_EQUIVALENTS[name](twin.parameters(), wd)
    for x, y in _batches(12):
        loss = sim.step(x, y)
        opt.zero_grad()
        want = F.cross_entropy(twin(x), y)
        want.backward()
        opt.step()
        assert loss == pytest.approx(float(want.detach()), rel=1e-12)
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_foreach_and_single_tensor_paths_agree_with_sc_and_lwp():
    torch.manual_seed(0)
    model = _mlp()
    twin = copy.deepcopy(model)
    kw = dict(method="pb+sc+lwp", optimizer="nadam", lr=0.01, weight_decay=0.01)
    a = pipeprop.build_simulator(model, F.cross_entropy, foreach=True, **kw)
    b = pipeprop.build_simulator(twin, F.cross_entropy, foreach=False, **kw)
    for x, y in _batches(10):
        assert a.step(x, y) == pytest.approx(b.step(x, y), rel=1e-12)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- closed forms on hand-made numbers
def _scalar_opt(**kw):
    w = nn.Parameter(torch.tensor([1.0], dtype=DT))
    opt = PipelineAdam([{"params": [w], "delay": 2}], lr=0.1, betas=(0.5, 0.75), eps=0.0, **kw)
    return w, opt


def _step(w, opt, g):
    w.grad = torch.tensor([g], dtype=DT)
    opt.step()


def test_sc_adam_closed_form():
    """β1 = 0.5, β2 = 0.75, D = 2 (a = β1^D = 0.25), η = 0.1, ε = 0, gradients 2 then −1."""
    w, opt = _scalar_opt(spike_compensation=True)
    _step(w, opt, 2.0)
    # m = 0.5·2 = 1, v = 0.25·4 = 1; m̃ = 0.25·1 + 0.75·2 = 1.75; /(1 − 0.5) = 3.5; √(1/(1 − 0.75)) = 2
    assert w.item() == pytest.approx(1.0 - 0.1 * 3.5 / 2.0, rel=1e-14)
    _step(w, opt, -1.0)
    # m = 0.5·1 + 0.5·(−1) = 0, v = 0.75·1 + 0.25·1 = 1; m̃ = 0.25·0 + 0.75·(−1) = −0.75; /(1 − 0.25) = −1
    # √(1/(1 − 0.5625)) = 1/√0.4375
    assert w.item() == pytest.approx(0.825 + 0.1 * math.sqrt(0.4375), rel=1e-14)


def test_sc_adam_delay_zero_is_adam_and_gradient_weight_sums_to_one():
    a, opt_a = _scalar_opt(spike_compensation=True, sc_delay=0)
    b, opt_b = _scalar_opt()
    for g in (2.0, -1.0, 0.5, 3.0):
        _step(a, opt_a, g)
        _step(b, opt_b, g)
        assert a.item() == b.item()
    # the first moment as the update sees it under SC: a gradient's weights over all later steps sum to 1
    beta1, D = 0.5, 3
    a_sc = beta1**D
    weights = [1 - a_sc + a_sc * (1 - beta1)] + [a_sc * (1 - beta1) * beta1**j for j in range(1, 200)]
    assert sum(weights) == pytest.approx(1.0, rel=1e-12)
    from pipeprop.optim import adam_sc_coefficient

    assert adam_sc_coefficient(beta1, D) == a_sc


def test_lwp_adam_closed_form():
    """After one AdamW step, the forward weights are w − η T m̂/(√v̂ + ε), optionally with the decay term."""
    w, opt = _scalar_opt(weight_prediction=True, lwp_horizon=3)
    (pred,) = opt.forward_weights(opt.param_groups[0], out=[torch.empty(1, dtype=DT)])
    assert float(pred) == 1.0  # no state yet: the live weights
    _step(w, opt, 2.0)
    # m̂ = 2, v̂ = 4 -> direction 1; w = 1 − 0.1 = 0.9; ŵ = 0.9 − 0.1·3·1
    assert w.item() == pytest.approx(0.9, rel=1e-14)
    (pred,) = opt.forward_weights(opt.param_groups[0])
    assert float(pred) == pytest.approx(0.6, rel=1e-14)
    assert w.item() == pytest.approx(0.9, rel=1e-14)  # the prediction leaves the live weights alone

    w, opt = _scalar_opt(weight_prediction=True, lwp_horizon=3, weight_decay=0.5, decoupled_weight_decay=True,
                         lwp_weight_decay=True)
    _step(w, opt, 2.0)
    # w = 1·(1 − 0.05) − 0.1·1 = 0.85; ŵ = 0.85 − 0.1·3·(1 + 0.5·0.85)
    assert w.item() == pytest.approx(0.85, rel=1e-14)
    (pred,) = opt.forward_weights(opt.param_groups[0])
    assert float(pred) == pytest.approx(0.85 - 0.3 * (1 + 0.425), rel=1e-14)


def test_lwp_with_delay_zero_uses_live_weights():
    w = nn.Parameter(torch.tensor([1.0], dtype=DT))
    opt = PipelineAdam([{"params": [w], "delay": 0}], lr=0.1, weight_prediction=True)
    _step(w, opt, 1.0)
    assert opt.forward_uses_live_weights(opt.param_groups[0])
    assert opt.forward_weights(opt.param_groups[0])[0] is w


# ----------------------------------------------------------------------------- tick-by-tick pipeline with AdamW
class AdamWRefStage(ref.RefStage):
    """The reference stage with AdamW written from the formulas (SC on the first moment, LWP along m̂/(√v̂+ε))."""

    def __init__(self, program, weights, delay, cfg):
        super().__init__(program, weights, delay, cfg)
        zeros = lambda: {k: {n: torch.zeros_like(t) for n, t in d.items()} for k, d in weights.items()}  # noqa: E731
        self.m, self.s, self.t = zeros(), zeros(), 0

    def _direction(self, k, n):
        c = self.cfg
        b1, b2 = c["betas"]
        return (self.m[k][n] / (1 - b1**self.t)) / (torch.sqrt(self.s[k][n] / (1 - b2**self.t)) + c["eps"])

    def forward_weights(self):
        c = self.cfg
        if not c["lwp"] or self.t == 0:
            return {k: {n: t.clone() for n, t in d.items()} for k, d in self.w.items()}
        T = self.delay
        return {k: {n: t - c["lr"] * T * self._direction(k, n) for n, t in d.items()} for k, d in self.w.items()}

    def update(self, grads):
        c = self.cfg
        b1, b2 = c["betas"]
        lr, wd, D = c["lr"], c["wd"], self.delay
        self.t += 1
        for k, d in grads.items():
            for name, g in d.items():
                w = self.w[k][name] * (1 - lr * wd)
                m = b1 * self.m[k][name] + (1 - b1) * g
                s = b2 * self.s[k][name] + (1 - b2) * g * g
                self.m[k][name], self.s[k][name] = m, s
                first = b1**D * m + (1 - b1**D) * g if c["sc"] else m
                step = (first / (1 - b1**self.t)) / (torch.sqrt(s / (1 - b2**self.t)) + c["eps"])
                self.w[k][name] = w - lr * step


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("method", list(ref.METHODS))
def test_adamw_simulator_equals_tick_by_tick_pipeline(method, batch, monkeypatch):
    torch.manual_seed(1)
    model = ref.make_mlp()
    N = 14
    xs = [torch.randn(batch, 5, dtype=DT) for _ in range(N)]
    ys = [torch.randint(0, 3, (batch,)) for _ in range(N)]
    cfg = dict(lr=0.02, betas=(0.8, 0.95), eps=1e-6, wd=0.05, **ref.METHODS[method])
    monkeypatch.setattr(ref, "RefStage", AdamWRefStage)
    ref_stages, ref_losses = ref.reference_pipeline(ref.MLP_STAGES, ref.split_weights(model, "mlp"), xs, ys, cfg)

    sim = pipeprop.build_simulator(pipeprop.partition(model, "layer"), F.cross_entropy, method=method, optimizer="adamw",
                                   lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05)
    losses = [sim.step(x, y) for x, y in zip(xs, ys)]
    torch.testing.assert_close(torch.tensor(losses, dtype=DT), torch.tensor(ref_losses, dtype=DT), rtol=1e-10, atol=1e-12)
    for s, (got, want) in enumerate(zip(ref.split_weights(model, "mlp"), [st.w for st in ref_stages])):
        for key in want:
            for name in ("w", "b"):
                torch.testing.assert_close(got[key][name], want[key][name], rtol=1e-10, atol=1e-12, msg=f"stage {s} {key}.{name}")


def test_adamw_reference_tells_the_mitigations_apart(monkeypatch):
    """Guard: SC and LWP change the AdamW trajectory, so the test above can fail."""
    torch.manual_seed(1)
    model = ref.make_mlp()
    xs = [torch.randn(1, 5, dtype=DT) for _ in range(10)]
    ys = [torch.randint(0, 3, (1,)) for _ in range(10)]
    monkeypatch.setattr(ref, "RefStage", AdamWRefStage)
    finals = []
    for method in ("pb", "pb+sc", "pb+lwp", "pb+stash"):
        cfg = dict(lr=0.02, betas=(0.8, 0.95), eps=1e-6, wd=0.0, **ref.METHODS[method])
        stages, _ = ref.reference_pipeline(ref.MLP_STAGES, ref.split_weights(copy.deepcopy(model), "mlp"), xs, ys, cfg)
        finals.append(stages[0].w["l0"]["w"])
    for i in range(len(finals)):
        for j in range(i):
            assert not torch.allclose(finals[i], finals[j])


# ----------------------------------------------------------------------------- API, methods, errors
def test_optimizer_choice_is_orthogonal_to_the_method():
    model = _mlp()
    for method in ("sgd", "pb", "pb+sc", "pb+lwp", "pb+sc+lwp", "pb+stash"):
        for opt in pipeprop.available_optimizers():
            losses = pipeprop.train(copy.deepcopy(model), _batches(6), F.cross_entropy, method=method, optimizer=opt,
                                    lr=1e-3, **({"momentum": 0.9} if opt == "sgd" else {}))
            assert len(losses) == 6 and all(math.isfinite(v) for v in losses)


def test_clear_errors_for_mismatched_options():
    model = _mlp()
    with pytest.raises(ValueError, match="momentum=0.9 is an SGD option"):
        pipeprop.build_simulator(model, F.cross_entropy, method="pb", optimizer="adamw", lr=1e-3, momentum=0.9)
    with pytest.raises(ValueError, match="betas is an Adam option"):
        pipeprop.build_simulator(model, F.cross_entropy, method="pb", optimizer="sgd", lr=1e-3, betas=(0.9, 0.99))
    with pytest.raises(ValueError, match="defined for optimizer"):
        pipeprop.build_simulator(model, F.cross_entropy, method="pipemare", optimizer="adamw", lr=1e-3)
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        pipeprop.build_simulator(model, F.cross_entropy, method="pb", optimizer="lamb", lr=1e-3)
    with pytest.raises(ValueError, match="is an optimizer"):
        pipeprop.get_method("adamw")
    with pytest.raises(ValueError, match="betas must lie"):
        PipelineAdam(model.parameters(), lr=1e-3, betas=(0.9, 1.0))


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_resume_is_bit_exact_with_adam_state():
    torch.manual_seed(0)
    model = _mlp()
    batches = _batches(20, b=1)
    kw = dict(method="pb+sc+lwp", optimizer="nadam", lr=0.01, weight_decay=0.01)
    straight = copy.deepcopy(model)
    sim = pipeprop.build_simulator(straight, F.cross_entropy, **kw)
    want = [sim.step(x, y) for x, y in batches]

    first = copy.deepcopy(model)
    sim = pipeprop.build_simulator(first, F.cross_entropy, **kw)
    got = [sim.step(x, y) for x, y in batches[:9]]
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": sim.optimizer.state_dict(), "sim": sim.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf)

    resumed = copy.deepcopy(model)  # fresh weights, overwritten by the checkpoint
    sim = pipeprop.build_simulator(resumed, F.cross_entropy, **kw)
    resumed.load_state_dict(state["model"])
    sim.optimizer.load_state_dict(state["optimizer"])
    sim.load_state_dict(state["sim"])
    got += [sim.step(x, y) for x, y in batches[9:]]
    assert got == want
    for p, q in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------- AsyncPP (NAdam, β1 0.99, stashing)
def test_decoupled_nadam_equals_torch(float64_scalars):
    torch.manual_seed(0)
    model = _mlp()
    twin = copy.deepcopy(model)
    sim = pipeprop.build_simulator(model, F.cross_entropy, method="sgd", optimizer="nadam", lr=0.01, betas=(0.99, 0.999),
                                   weight_decay=0.1, decoupled_weight_decay=True)
    opt = torch.optim.NAdam(twin.parameters(), lr=0.01, betas=(0.99, 0.999), weight_decay=0.1, decoupled_weight_decay=True)
    for x, y in _batches(8):
        sim.step(x, y)
        opt.zero_grad()
        F.cross_entropy(twin(x), y).backward()
        opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_asyncpp_method_is_stashed_nadamw_with_high_beta1():
    sim = pipeprop.build_simulator(_mlp(), F.cross_entropy, method="asyncpp", lr=1e-3, weight_decay=0.01)
    opt = sim.optimizer
    assert sim.weight_mode == "stash" and isinstance(opt, PipelineAdam)
    g = opt.param_groups[0]
    assert g["variant"] == "nadam" and g["decoupled_weight_decay"] and g["betas"] == (0.99, 0.999)
    with pytest.raises(ValueError, match="defined for optimizer"):
        pipeprop.build_simulator(_mlp(), F.cross_entropy, method="asyncpp", optimizer="sgd", lr=1e-3)
    # adaptive momentum: β1 + D/(D_max + 2)·(target − β1); delays 4, 2, 0 -> D_max + 2 = 6
    sim = pipeprop.build_simulator(_mlp(), F.cross_entropy, method="asyncpp", lr=1e-3, betas=(0.9, 0.999),
                                   beta1_target=0.99)
    got = [sim.optimizer.stage_betas(g)[0] for g in sim.optimizer.param_groups]
    assert [g["delay"] for g in sim.optimizer.param_groups] == [4, 2, 0]
    assert got == pytest.approx([0.9 + 4 / 6 * 0.09, 0.9 + 2 / 6 * 0.09, 0.9])


# ----------------------------------------------------------------------------- runner and CLI
def test_runner_with_adamw_scales_by_the_square_root_rule_and_resumes_bit_exactly(tmp_path):
    from pipeprop.experiments import ExperimentConfig, Runner, run_experiment

    cfg = ExperimentConfig(name="tiny-adam", model="mlp", model_options={"hidden": 16}, dataset="digits",
                           method="pb+sc+lwp", optimizer="adamw", batch_size=16, lr=4e-3, betas=[0.9, 0.99],
                           weight_decay=0.01, samples=200, eval_every=50, checkpoint_every=50, test_subset=100,
                           progress=False, schedule="cosine")
    runner = Runner(cfg, tmp_path / "probe").setup()
    group = runner.sim.optimizer.param_groups[0]
    assert isinstance(runner.sim.optimizer, PipelineAdam) and group["decoupled_weight_decay"]
    assert runner.recipe.lr == pytest.approx(1e-3) and group["betas"] == pytest.approx((1 - 0.1 / 16, 1 - 0.01 / 16))
    full = run_experiment(cfg, tmp_path / "full")
    assert full["status"] == "completed"
    assert run_experiment(cfg, tmp_path / "split", stop_after_steps=70)["status"] == "stopped"
    Runner(cfg, tmp_path / "split").setup().run(resume=True)
    from pipeprop.experiments.checkpoint import load_checkpoint

    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt", cfg.config_hash())
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt", cfg.config_hash())
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k, st in a["optimizer"]["state"].items():
        assert torch.equal(st["exp_avg_sq"], b["optimizer"]["state"][k]["exp_avg_sq"]) and st["step"] == 200


def test_cli_lists_the_optimizer_choice():
    from click.testing import CliRunner

    from pipeprop.cli import main

    out = CliRunner().invoke(main, ["methods"])
    assert out.exit_code == 0 and "sgd, adam, adamw, nadam" in out.output and "asyncpp" in out.output
    assert "--optimizer [sgd|adam|adamw|nadam]" in CliRunner().invoke(main, ["train", "--help"]).output


def test_runner_asyncpp_keeps_its_beta1_and_needs_nadam(tmp_path):
    from pipeprop.experiments import ExperimentConfig, Runner

    kw = dict(name="tiny-asyncpp", model="mlp", model_options={"hidden": 16}, dataset="digits", method="asyncpp",
              batch_size=1, lr=1e-3, samples=20, test_subset=50, progress=False)
    runner = Runner(ExperimentConfig(optimizer="nadam", **kw), tmp_path / "a").setup()
    assert runner.sim.weight_mode == "stash" and runner.sim.optimizer.param_groups[0]["betas"] == (0.99, 0.999)
    runner = Runner(ExperimentConfig(optimizer="nadam", betas="0.95,0.999", **kw), tmp_path / "b").setup()
    assert runner.sim.optimizer.param_groups[0]["betas"] == (0.95, 0.999)
    with pytest.raises(ValueError, match="nadam only"):
        Runner(ExperimentConfig(**kw), tmp_path / "c").setup()
