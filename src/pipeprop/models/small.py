"""Small models for budget runs: an MLP builder and a three-layer CNN."""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

from torch import nn

from ..nn.norm import check_norm, make_linear, make_norm
from .blocks import conv_unit

__all__ = ["mlp", "cnn_small"]


def mlp(
    *,
    in_features: int = 64,
    hidden: int = 128,
    depth: int = 3,
    num_classes: int = 10,
    norm: str = "none",
    gn_groups: int = 8,
    online: Optional[dict] = None,
    init: str = "default",
) -> nn.Sequential:
    """``depth`` linear layers (``depth - 1`` hidden layers of ``hidden`` units with norm and ReLU).

    Inputs are flattened, so images ``[N, C, H, W]`` with ``C*H*W == in_features`` work directly.
    ``init="he"`` re-initialises every linear weight He-normal (fan-in, ReLU gain) and zeroes the biases;
    deep ReLU MLPs without a norm barely train at batch size 1 from PyTorch's default init.
    """
    norm = check_norm(norm)
    if init not in ("default", "he"):
        raise ValueError(f"unknown mlp init {init!r}; choose 'default' or 'he'")
    if depth < 1:
        raise ValueError(f"mlp depth (number of linear layers) must be >= 1, got {depth}")
    parts: OrderedDict[str, nn.Module] = OrderedDict()
    fin = in_features
    for i in range(depth - 1):
        layer: list[nn.Module] = [nn.Flatten()] if i == 0 else []
        layer.append(make_linear(norm, fin, hidden))
        n = make_norm(norm, hidden, dims=1, gn_groups=gn_groups, **(online or {}))
        if n is not None:
            layer.append(n)
        layer.append(nn.ReLU())
        parts[f"layer{i + 1}"] = nn.Sequential(*layer)
        fin = hidden
    parts["out"] = nn.Sequential(*([nn.Flatten()] if depth == 1 else []), nn.Linear(fin, num_classes))
    model = nn.Sequential(parts)
    if init == "he":
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    return model


def cnn_small(
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    width: int = 16,
    norm: str = "gn",
    gn_groups: int = 4,
    online: Optional[dict] = None,
) -> nn.Sequential:
    """Three 3x3 convs (width, 2w, 4w; the last two with stride 2), global pooling, a linear classifier.

    Four stages at "layer" granularity; fast on CPU at 8x8 (digits) and 32x32 (CIFAR) inputs.
    """
    norm = check_norm(norm)
    kw = dict(gn_groups=gn_groups, online=online)
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Sequential(*conv_unit(norm, in_channels, width, 3, 1, **kw)),
            conv2=nn.Sequential(*conv_unit(norm, width, 2 * width, 3, 2, **kw)),
            conv3=nn.Sequential(*conv_unit(norm, 2 * width, 4 * width, 3, 2, **kw)),
            head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes)),
        )
    )
