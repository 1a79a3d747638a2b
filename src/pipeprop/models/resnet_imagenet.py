"""ImageNet ResNet-50 (He et al., 2016) with bottleneck blocks (stride on the 3x3 conv, "v1.5").

25.6 M parameters with 1000 classes. Every convolution (with its norm and ReLU) is one pipeline stage and
the four projection shortcuts are stages of their own: 1 + 48 + 4 + 1 = 54 stages at "layer" granularity.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

from torch import nn

from ..nn.norm import check_norm
from .blocks import Fork, Join, OnBranch, OnSkip, conv_unit

__all__ = ["imagenet_resnet", "RESNET_LAYOUTS"]

RESNET_LAYOUTS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def _bottleneck(
    norm: str, cin: int, mid: int, stride: int, gn_groups: int, online: Optional[dict]
) -> list[nn.Module]:
    kw = dict(gn_groups=gn_groups, online=online)
    cout = 4 * mid
    layers: list[nn.Module] = [
        Fork(),
        OnBranch(*conv_unit(norm, cin, mid, 1, 1, **kw)),
        OnBranch(*conv_unit(norm, mid, mid, 3, stride, **kw)),
        OnBranch(*conv_unit(norm, mid, cout, 1, 1, act=False, **kw)),
    ]
    if stride != 1 or cin != cout:
        layers.append(OnSkip(*conv_unit(norm, cin, cout, 1, stride, act=False, **kw)))
    layers.append(Join())
    return layers


def imagenet_resnet(
    depth: int = 50,
    *,
    norm: str = "gn",
    num_classes: int = 1000,
    in_channels: int = 3,
    width: int = 64,
    gn_groups: int = 32,
    online: Optional[dict] = None,
    layout: Optional[Sequence[int]] = None,
) -> nn.Sequential:
    """Bottleneck ResNet (50/101/152) for 224x224 inputs (any size >= 32 works: global average pooling).

    ``width`` is the stem's channel count (64 in the paper); smaller values give small test networks.
    Nested as ``stem``, ``block{g}_{b}``, ``head`` (``"block"`` partitioning: one stage per bottleneck).
    """
    norm = check_norm(norm)
    if layout is None:
        if depth not in RESNET_LAYOUTS:
            raise ValueError(f"ImageNet ResNet depth must be one of {sorted(RESNET_LAYOUTS)}, got {depth}")
        layout = RESNET_LAYOUTS[depth]
    kw = dict(gn_groups=gn_groups, online=online)
    stem = nn.Sequential(*conv_unit(norm, in_channels, width, 7, 2, **kw), nn.MaxPool2d(3, stride=2, padding=1))
    parts: OrderedDict[str, nn.Module] = OrderedDict(stem=stem)
    cin = width
    for group, blocks in enumerate(layout):
        mid = width * 2**group
        for b in range(blocks):
            stride = 2 if group > 0 and b == 0 else 1
            parts[f"block{group + 1}_{b + 1}"] = nn.Sequential(*_bottleneck(norm, cin, mid, stride, gn_groups, online))
            cin = 4 * mid
    parts["head"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))
    return nn.Sequential(parts)
