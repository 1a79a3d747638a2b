"""CIFAR ResNets (He et al., 2016, §4.2): 6n+2 layers, three groups of n basic blocks, 16/32/64 channels.

ResNet-20/32/44/56/110 are n = 3/5/7/9/18. Shortcuts are parameter-free (option A: subsample and
zero-pad channels, as in the paper; ResNet-20 has 0.27 M parameters) or 1x1 projections (option B).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

from torch import nn

from ..nn.norm import check_norm
from .blocks import Fork, Join, OnBranch, OnSkip, PadShortcut, conv_unit

__all__ = ["cifar_resnet", "CIFAR_DEPTHS"]

CIFAR_DEPTHS = (20, 32, 44, 56, 110)


def _basic_block(
    norm: str, cin: int, cout: int, stride: int, shortcut: str, gn_groups: int, online: Optional[dict]
) -> list[nn.Module]:
    kw = dict(gn_groups=gn_groups, online=online)
    layers: list[nn.Module] = [
        Fork(),
        OnBranch(*conv_unit(norm, cin, cout, 3, stride, **kw)),
        OnBranch(*conv_unit(norm, cout, cout, 3, 1, act=False, **kw)),
    ]
    if stride == 1 and cin == cout:
        layers.append(Join())
    elif shortcut == "projection":
        layers.append(OnSkip(*conv_unit(norm, cin, cout, 1, stride, act=False, **kw)))
        layers.append(Join())
    else:
        layers.append(Join(PadShortcut(stride, cout - cin)))
    return layers


def cifar_resnet(
    depth: int,
    *,
    norm: str = "gn",
    num_classes: int = 10,
    in_channels: int = 3,
    width: int = 16,
    shortcut: str = "pad",
    gn_groups: int = 8,
    online: Optional[dict] = None,
) -> nn.Sequential:
    """ResNet-``depth`` for 32x32 inputs (any size >= 4 works: global average pooling).

    The result nests ``stem``, ``block{g}_{b}`` and ``head`` Sequentials: ``"layer"`` partitioning
    flattens them (one stage per conv), ``"block"`` gives one stage per residual block.

    Args:
        depth: 6n+2 (20, 32, 44, 56, 110, ...).
        norm: "gn", "online", "ws+gn", "bn" or "none".
        width: channels of the first group (16 in the paper; the groups have width, 2*width, 4*width).
        shortcut: "pad" (parameter-free option A, default) or "projection" (1x1 conv + norm, option B).
        gn_groups: GroupNorm groups (capped at the channel count).
        online: keyword arguments for :class:`~pipeprop.nn.OnlineNorm` (``alpha_fwd``, ``ecm``, ...).
    """
    norm = check_norm(norm)
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110), got {depth}")
    if shortcut not in ("pad", "projection"):
        raise ValueError(f"shortcut must be 'pad' or 'projection', got {shortcut!r}")
    n = (depth - 2) // 6
    kw = dict(gn_groups=gn_groups, online=online)
    parts: OrderedDict[str, nn.Module] = OrderedDict(stem=nn.Sequential(*conv_unit(norm, in_channels, width, 3, 1, **kw)))
    cin = width
    for group, cout in enumerate((width, 2 * width, 4 * width)):
        for b in range(n):
            stride = 2 if group > 0 and b == 0 else 1
            parts[f"block{group + 1}_{b + 1}"] = nn.Sequential(
                *_basic_block(norm, cin, cout, stride, shortcut, gn_groups, online)
            )
            cin = cout
    parts["head"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))
    return nn.Sequential(parts)
