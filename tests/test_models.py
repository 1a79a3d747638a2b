"""Model zoo: parameter counts (closed forms and literature), shapes, fine-grained stages, PB training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import pipeprop
from pipeprop import models
from pipeprop.models import Join, OnBranch, OnSkip
from pipeprop.nn import OnlineNorm, WSConv2d
from pipeprop.partition import flatten_sequential


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------------------------------ closed forms
def cifar_resnet_params(depth: int, classes: int = 10, w: int = 16) -> int:
    """He et al. CIFAR ResNet, option-A shortcuts, bias-free convs, 2C affine per norm."""
    n = (depth - 2) // 6
    total = 9 * 3 * w + 2 * w  # stem conv + norm
    cin = w
    for cout in (w, 2 * w, 4 * w):
        for _ in range(n):
            total += 9 * cin * cout + 2 * cout + 9 * cout * cout + 2 * cout
            cin = cout
    return total + cin * classes + classes


def resnet50_params(classes: int = 1000) -> int:
    total = 49 * 3 * 64 + 2 * 64
    cin = 64
    for mid, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for b in range(blocks):
            total += cin * mid + 2 * mid + 9 * mid * mid + 2 * mid + mid * 4 * mid + 8 * mid
            if b == 0:
                total += cin * 4 * mid + 8 * mid
            cin = 4 * mid
    return total + cin * classes + classes


VGG_CONVS = {11: [64, 128, 256, 256, 512, 512, 512, 512],
             13: [64, 64, 128, 128, 256, 256, 512, 512, 512, 512],
             16: [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]}


def vgg_params(depth: int, classes: int = 10) -> int:
    total, cin = 0, 3
    for c in VGG_CONVS[depth]:
        total += 9 * cin * c + 2 * c
        cin = c
    return total + (512 * 512 + 512) * 2 + 512 * classes + classes


@pytest.mark.parametrize("depth,literature", [(20, 0.27e6), (32, 0.46e6), (44, 0.66e6), (56, 0.85e6), (110, 1.7e6)])
def test_cifar_resnet_parameter_counts(depth, literature):
    m = models.get(f"resnet{depth}")
    assert n_params(m) == cifar_resnet_params(depth)
    assert abs(n_params(m) - literature) / literature < 0.02  # He et al. 2016, Table 6


def test_resnet50_parameter_count():
    m = models.get("resnet50", num_classes=1000)
    assert n_params(m) == resnet50_params() == 25_557_032  # "25.6M" in the literature


@pytest.mark.parametrize("depth", [11, 13, 16])
def test_vgg_parameter_counts(depth):
    m = models.get(f"vgg{depth}")
    assert n_params(m) == vgg_params(depth)
    # conv part with biases (norm "none"): Simonyan & Zisserman configurations A/B/D; VGG-16's 14,714,688 is
    # the well-known size of its convolutional base (e.g. Keras VGG16 without the top)
    plain = models.get(f"vgg{depth}", norm="none")
    conv = sum(p.numel() for mod in plain.modules() if isinstance(mod, nn.Conv2d) for p in mod.parameters())
    assert conv == {11: 9_220_480, 13: 9_404_992, 16: 14_714_688}[depth]


def test_norm_choices_change_layers_not_counts_except_none():
    base = n_params(models.get("resnet20", norm="gn"))
    assert n_params(models.get("resnet20", norm="online")) == base
    assert n_params(models.get("resnet20", norm="ws+gn")) == base
    assert n_params(models.get("resnet20", norm="bn")) == base
    m = models.get("resnet20", norm="online")
    assert sum(isinstance(x, OnlineNorm) for x in m.modules()) == 19
    assert sum(isinstance(x, WSConv2d) for x in models.get("resnet20", norm="ws+gn").modules()) == 19
    none = models.get("resnet20", norm="none")
    assert not any(isinstance(x, (nn.GroupNorm, OnlineNorm)) for x in none.modules())
    with pytest.raises(ValueError, match="choose one of"):
        models.get("resnet20", norm="layer")


# ------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize(
    "name,kw,shape",
    [
        ("mlp", dict(in_features=64), (2, 1, 8, 8)),
        ("cnn-small", dict(in_channels=1), (2, 1, 8, 8)),
        ("cnn-small", {}, (2, 3, 32, 32)),
        ("resnet20", {}, (2, 3, 32, 32)),
        ("resnet56", dict(width=4, gn_groups=2), (2, 3, 32, 32)),
        ("vgg11", {}, (2, 3, 32, 32)),
        ("vgg16", dict(width_mult=0.125, hidden=16), (2, 3, 32, 32)),
        ("resnet50", dict(width=8, gn_groups=4), (2, 3, 64, 64)),
    ],
)
def test_output_shapes(name, kw, shape):
    m = models.get(name, num_classes=7, **kw)
    assert isinstance(m, nn.Sequential)
    assert m(torch.randn(shape)).shape == (shape[0], 7)


def test_list_and_unknown_model():
    names = models.list_models()
    for n in ["mlp", "cnn-small", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "vgg11", "vgg13",
              "vgg16", "resnet50"]:
        assert n in names
    with pytest.raises(ValueError, match="unknown model"):
        models.get("resnet18")
    with pytest.raises(ValueError, match="6n\\+2"):
        models.cifar_resnet(21)


def test_bad_builder_option_names_the_keyword():
    with pytest.raises(TypeError, match="'in_channels'"):
        models.get("mlp", in_channels=3)
    assert len(models.get("ResNet-20")) == len(models.get("resnet20"))


def test_sequential_resnet_equals_a_plain_residual_forward():
    """The tuple-carrying sequence computes relu(F(x) + shortcut(x)) block by block, with option-A shortcuts
    written here independently (subsample by 2, zero-pad channels equally on both sides)."""
    torch.manual_seed(0)
    m = models.get("resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    mods = flatten_sequential(m)
    h = mods[2](mods[1](mods[0](x)))  # stem conv, norm, relu
    branches = [b for b in mods if isinstance(b, OnBranch)]
    assert len(branches) == 18
    for i in range(0, 18, 2):
        f = branches[i + 1].body(branches[i].body(h))
        if f.shape != h.shape:
            s = h[:, :, ::2, ::2]
            pad = (f.shape[1] - h.shape[1]) // 2
            s = torch.cat([torch.zeros_like(s[:, :pad]), s, torch.zeros_like(s[:, :pad])], dim=1)
        else:
            s = h
        h = torch.relu(f + s)
    ref = mods[-1](h.mean(dim=(2, 3)))
    torch.testing.assert_close(m(x), ref)


# ------------------------------------------------------------------------------------------ stages
def _compute_layers(stage: nn.Module) -> int:
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in stage.modules())


@pytest.mark.parametrize(
    "name,kw,stages",
    [
        ("resnet20", {}, 20),
        ("resnet32", {}, 32),
        ("resnet110", {}, 110),
        ("resnet20", dict(shortcut="projection"), 22),
        ("vgg11", {}, 11),
        ("vgg16", {}, 16),
        ("vgg16", dict(classifier="linear"), 14),
        ("resnet50", {}, 54),
        ("cnn-small", {}, 4),
        ("mlp", dict(depth=5), 5),
    ],
)
def test_layer_partition_has_one_compute_layer_per_stage(name, kw, stages):
    part = pipeprop.partition(models.get(name, **kw), "layer")
    assert len(part) == stages
    assert all(_compute_layers(st) == 1 for st in part)
    assert part.delays == [2 * (stages - 1 - s) for s in range(stages)]
    assert sum(st.num_parameters() for st in part) == n_params(models.get(name, **kw))


@pytest.mark.parametrize(
    "name,blocks", [("resnet20", 11), ("resnet110", 56), ("resnet50", 18), ("vgg16", 6), ("cnn-small", 4), ("mlp", 3)]
)
def test_block_partition_is_one_stage_per_residual_block(name, blocks):
    """``"block"``: stem, one stage per residual block (VGG: per pooling block), head."""
    part = pipeprop.partition(models.get(name), "block")
    assert len(part) == blocks
    assert all(st.num_parameters() > 0 for st in part)
    if name.startswith("resnet"):
        assert all(sum(isinstance(m, Join) for m in st.modules()) == 1 for st in part.stages[1:-1])


def test_resnet_stage_contents():
    part = pipeprop.partition(models.get("resnet20", norm="gn"), "layer")
    first = [type(m) for m in part[0]]
    assert first[0] is nn.Conv2d and nn.GroupNorm in [t.__mro__[1] for t in first] + first
    # each residual block: a (conv+norm+relu) stage, then a (conv+norm) stage ending with the join
    for s in range(1, 19, 2):
        assert isinstance(part[s][0], OnBranch) and len(part[s]) == 1
        assert isinstance(part[s + 1][0], OnBranch) and any(isinstance(m, Join) for m in part[s + 1])
    assert isinstance(part[19][0], nn.Linear)
    proj = pipeprop.partition(models.get("resnet20", shortcut="projection"), "layer")
    skips = [st for st in proj if isinstance(st[0], OnSkip)]
    assert len(skips) == 2 and all(isinstance(st[1], Join) for st in skips)


def test_online_norm_joins_the_conv_stage():
    part = pipeprop.partition(models.get("cnn-small", norm="online"), "layer")
    assert len(part) == 4
    assert any(isinstance(m, OnlineNorm) for m in part[0])


# ------------------------------------------------------------------------------------------ PB training
def _pb_steps(model: nn.Module, shape, steps: int, classes: int = 10, method: str = "pb") -> list[float]:
    sim = pipeprop.build_simulator(model, F.cross_entropy, method=method, lr=0.01, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(0)
    losses = [sim.step(torch.randn(shape, generator=gen), torch.randint(0, classes, (1,), generator=gen))
              for _ in range(steps)]
    assert all(torch.isfinite(torch.tensor(losses)))
    changed = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert changed == len(before)  # every parameter received updates
    return losses


@pytest.mark.parametrize(
    "name,kw,shape",
    [
        ("mlp", dict(in_features=64, hidden=16), (1, 64)),
        ("cnn-small", dict(width=4), (1, 3, 8, 8)),
        ("resnet20", dict(width=4, gn_groups=2), (1, 3, 8, 8)),
        ("resnet32", dict(width=4, gn_groups=2), (1, 3, 8, 8)),
        ("resnet44", dict(width=4, gn_groups=2), (1, 3, 8, 8)),
        ("resnet56", dict(width=4, gn_groups=2), (1, 3, 8, 8)),
        ("resnet110", dict(width=4, gn_groups=2), (1, 3, 8, 8)),
        ("vgg11", dict(width_mult=1 / 16, hidden=8, gn_groups=2), (1, 3, 32, 32)),
        ("vgg13", dict(width_mult=1 / 16, hidden=8, gn_groups=2), (1, 3, 32, 32)),
        ("vgg16", dict(width_mult=1 / 16, hidden=8, gn_groups=2), (1, 3, 32, 32)),
    ],
)
def test_every_model_takes_pb_steps_at_batch_size_one(name, kw, shape):
    _pb_steps(models.get(name, **kw), shape, steps=3)


def test_resnet50_takes_a_pb_step():
    _pb_steps(models.get("resnet50", width=4, gn_groups=2), (1, 3, 32, 32), steps=1)


@pytest.mark.parametrize("norm", ["online", "ws+gn", "bn", "none"])
def test_resnet_with_each_norm_takes_pb_steps(norm):
    _pb_steps(models.get("resnet20", norm=norm, width=4, gn_groups=2), (1, 3, 8, 8), steps=3, method="pb+sc+lwp")


def test_projection_shortcut_resnet_trains_by_pb():
    _pb_steps(models.get("resnet20", shortcut="projection", width=4, gn_groups=2), (1, 3, 8, 8), steps=3)


# ------------------------------------------------------------------------------------------ CLI
def test_partition_cli():
    from pipeprop.cli import main

    runner = CliRunner()
    res = runner.invoke(main, ["partition", "resnet20"])
    assert res.exit_code == 0, res.output
    assert "20 stages" in res.output and "269,722 parameters" in res.output
    part = pipeprop.partition(models.get("resnet20"))
    assert f"{part.weight_version_elements():,}" in res.output
    res = runner.invoke(main, ["partition", "vgg11", "--norm", "online", "-g", "4", "-o", "width_mult=0.5"])
    assert res.exit_code == 0, res.output
    assert "4 stages" in res.output
    res = runner.invoke(main, ["partition", "resnet20", "-g", "block"])
    assert res.exit_code == 0 and "11 stages" in res.output and "join(add+relu)" in res.output
    res = runner.invoke(main, ["partition", "--list"])
    assert res.exit_code == 0 and "resnet110" in res.output
    res = runner.invoke(main, ["partition", "nosuchnet"])
    assert res.exit_code != 0 and "unknown model" in res.output


def test_mlp_he_init_matches_he_normal_statistics():
    import pipeprop.models as zoo

    torch.manual_seed(0)
    model = zoo.get("mlp", in_features=256, hidden=256, depth=4, init="he")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for lin in linears:
        expected = (2.0 / lin.in_features) ** 0.5  # He normal, fan-in, ReLU gain
        assert abs(lin.weight.std().item() / expected - 1) < 0.05
        assert torch.count_nonzero(lin.bias) == 0
    with pytest.raises(ValueError, match="init"):
        zoo.get("mlp", init="xavier")
