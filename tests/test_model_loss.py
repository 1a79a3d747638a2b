"""Models that compute their own loss (Hugging Face ``labels=``, nanoGPT ``(logits, loss)``), and precision."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeprop

transformers = pytest.importorskip("transformers")


def _tiny_gpt2():
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16, use_cache=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def _tokens(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 40, (1, 8), generator=g) for _ in range(n)]


def test_hugging_face_causal_lm_trains_unmodified_and_sgd_equals_plain_pytorch():
    model = _tiny_gpt2()
    ref = copy.deepcopy(model)
    seqs = _tokens(6)
    losses = pipeprop.train(model, [(s, s) for s in seqs], None, method="sgd", lr=0.05)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    ref_losses = []
    for s in seqs:
        opt.zero_grad()
        loss = ref(s, labels=s).loss
        loss.backward()
        opt.step()
        ref_losses.append(float(loss))
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    # tied input embedding and LM head stay one parameter
    assert model.lm_head.weight is model.transformer.wte.weight


def test_hugging_face_causal_lm_under_pb_sc_lwp():
    model = _tiny_gpt2()
    seq = _tokens(1)[0]
    part = pipeprop.partition(model, "layer", example_input=seq, example_target=seq)
    assert len(part) >= 8 and any(0 in readers and len(part) - 1 in readers for _, readers in part.shared_parameters())
    sim = pipeprop.build_simulator(part, None, method="pb+sc+lwp", lr=0.005, momentum=0.9)
    losses = [sim.step(seq, seq) for _ in range(40)]
    assert losses[-1] < 0.5 * losses[0]


class NanoStyle(nn.Module):
    """nanoGPT's convention: forward(idx, targets) returns (logits, loss)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, idx, targets=None):
        logits = self.fc(torch.tanh(self.emb(idx)))
        loss = None if targets is None else F.cross_entropy(logits.view(-1, 10), targets.view(-1))
        return logits, loss


def test_target_goes_second_and_loss_is_the_last_element():
    torch.manual_seed(0)
    model = NanoStyle()
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 10, (2, 3), generator=g), torch.randint(0, 10, (2, 3), generator=g)) for _ in range(5)]
    losses = pipeprop.train(model, data, None, method="sgd", lr=0.1)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for (x, y), got in zip(data, losses):
        opt.zero_grad()
        _, loss = ref(x, y)
        loss.backward()
        opt.step()
        assert got == pytest.approx(float(loss), rel=1e-6)
    torch.testing.assert_close(model.fc.weight, ref.fc.weight)


class ResWithLoss(nn.Module):
    """A residual MLP that computes its own loss (an integer input, embedded, as for a language model)."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc1, self.fc2, self.out = nn.Embedding(7, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def logits(self, idx):
        h = torch.tanh(self.emb(idx))
        return self.out(torch.relu(self.fc2(torch.tanh(self.fc1(h)))) + h)

    def forward(self, idx, targets):
        return F.cross_entropy(self.logits(idx), targets)


class ResLogits(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, idx):
        return self.inner.logits(idx)


@pytest.mark.parametrize("method", ["pb", "pb+sc+lwp"])
def test_loss_inside_the_model_equals_loss_fn_outside(method):
    """The target entering with the input changes nothing: same numbers as the same net with loss_fn."""
    torch.manual_seed(0)
    a = ResWithLoss().double()
    b = copy.deepcopy(a)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 7, (3,), generator=g), torch.randint(0, 3, (3,), generator=g)) for _ in range(10)]
    kw = dict(method=method, lr=0.2, momentum=0.8)
    la = pipeprop.train(a, data, None, **kw)
    lb = pipeprop.train(ResLogits(b), data, F.cross_entropy, **kw)
    assert la == lb
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_loss_fn_none_needs_a_model_returning_its_loss():
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    with pytest.raises(Exception, match="target|loss"):
        pipeprop.train(model, [(torch.randn(1, 3), torch.zeros(1, dtype=torch.long))], None, lr=0.1)


# ----------------------------------------------------------------------------- precision
def _mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def _batches(n, dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(1, 6, generator=g).to(dtype), torch.randint(0, 3, (1,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_keeps_fp32_master_weights_that_move_at_small_lr(precision):
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    losses = pipeprop.train(model, _batches(30), F.cross_entropy, method="pb+sc+lwp", lr=1e-3, momentum=0.9, precision=precision)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    changed = sum(int((p != b).sum()) for p, b in zip(model.parameters(), before))
    total = sum(p.numel() for p in model.parameters())
    # a bf16 copy of the weights would lose almost all of these updates (|update| << bf16 spacing)
    assert changed > 0.9 * total
    assert all(map(lambda v: v == v, losses))


def test_fp16_loss_scaling_skips_overflowing_steps():
    model = _mlp()
    sim = pipeprop.build_simulator(model, F.cross_entropy, method="pb", lr=0.01, precision="16-mixed",
                                   example_input=torch.randn(1, 6))
    sim._scaler.scale = 2.0**40  # overflows fp16 gradients
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _batches(1)[0]
    sim.step(x, y)
    assert sim._scaler.skipped == 1 and sim._scaler.scale == 2.0**39
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_precision_64_converts_model_and_inputs():
    model = _mlp()
    pipeprop.train(model, _batches(3), F.cross_entropy, method="pb", lr=0.1, precision="64")
    assert all(p.dtype == torch.float64 for p in model.parameters())
    with pytest.raises(ValueError, match="precision"):
        pipeprop.train(_mlp(), _batches(1), F.cross_entropy, lr=0.1, precision="8")


def test_llama_with_rmsnorm_casts_trains_under_bf16_autocast():
    """Hugging Face Llama casts to float32 inside RMSNorm; the captured graph must run under autocast."""
    cfg = transformers.LlamaConfig(
        num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=40, max_position_embeddings=16, use_cache=False, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    seq = _tokens(1)[0]
    sim = pipeprop.build_simulator(model, None, method="pb", lr=0.005, example_input=seq, example_target=seq,
                                   precision="bf16-mixed")
    losses = [sim.step(seq, seq) for _ in range(4)]
    assert losses[-1] < losses[0]
    assert any(sim._track)  # bf16 casts of weights were saved and are replayed from the live weights
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="dtype"):
        sim.step(seq.float(), seq)
