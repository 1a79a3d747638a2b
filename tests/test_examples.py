"""The examples' unmodified torchvision-style ResNet and nanoGPT-style GPT, at toy sizes.

With all delays 0 (method "sgd") pipeprop must equal plain PyTorch SGD on the same model (float64), which
checks the graph capture and cut end to end; under pb+sc+lwp they must train.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pipeprop

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DT = torch.float64


def _load(name):
    spec = importlib.util.spec_from_file_location(f"pipeprop_example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[f"pipeprop_example_{name}"] = mod
    spec.loader.exec_module(mod)
    return mod


def _plain_sgd(model, batches, lr, loss_of):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    out = []
    for x, y in batches:
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        opt.step()
        out.append(float(loss))
    return out


def test_resnet_example_sgd_equals_plain_pytorch_and_trains_under_pb():
    ex = _load("resnet_torchvision_style")
    torch.manual_seed(0)
    model = ex.resnet18(num_classes=3, width=4).to(DT)
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(1, 3, 16, 16, generator=g, dtype=DT), torch.randint(0, 3, (1,), generator=g)) for _ in range(4)]
    part = pipeprop.partition(model, "layer", example_input=batches[0][0])
    assert len(part) == 21  # 17 convs + 3 downsample convs + fc
    assert len(pipeprop.partition(model, "block", example_input=batches[0][0])) == 10  # stem + 8 blocks + fc
    losses = pipeprop.train(model, batches, F.cross_entropy, method="sgd", lr=0.01)
    ref_losses = _plain_sgd(ref, batches, 0.01, lambda m, x, y: F.cross_entropy(m(x), y))
    assert losses == pytest.approx(ref_losses, rel=1e-10)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    losses = pipeprop.train(model, batches * 5, F.cross_entropy, method="pb+sc+lwp", lr=0.002, momentum=0.9)
    assert all(map(lambda v: v == v, losses))


def test_nanogpt_example_sgd_equals_plain_pytorch_and_tied_weight_trains_under_pb():
    ex = _load("nanogpt")
    torch.manual_seed(0)
    model = ex.GPT(ex.GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=8)).to(DT)
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 11, (1, 9), generator=g) for _ in range(4)]
    batches = [(s[:, :-1], s[:, 1:]) for s in seqs]
    losses = pipeprop.train(model, batches, None, method="sgd", lr=0.05)
    ref_losses = _plain_sgd(ref, batches, 0.05, lambda m, x, y: m(x, y)[1])
    assert losses == pytest.approx(ref_losses, rel=1e-10)
    for (k, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=k)
    part = pipeprop.partition(model, "layer", example_input=batches[0][0], example_target=batches[0][1])
    assert [r for p, r in part.shared_parameters() if p is model.lm_head.weight] == [[0, len(part) - 1]]
    losses = pipeprop.train(model, batches * 10, None, method="pb+sc+lwp", lr=0.01, momentum=0.9)
    assert sum(losses[-4:]) < sum(losses[:4])
    assert model.transformer.wte.weight is model.lm_head.weight
