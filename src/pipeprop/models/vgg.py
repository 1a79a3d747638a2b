"""VGG-11/13/16 (Simonyan & Zisserman, 2015) for 32x32 inputs.

The convolutional layers are the paper's configurations A, B and D. After five 2x2 poolings a 32x32
image is 1x1x512, so the classifier is 512 -> hidden -> hidden -> classes (three linear layers, hidden
512 by default), which keeps the layer count in the name: VGG-16 = 13 conv + 3 linear = 16 stages. With
``classifier="linear"`` it is a single 512 -> classes layer.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Union

from torch import nn

from ..nn.norm import check_norm, make_conv, make_norm

__all__ = ["vgg", "VGG_CONFIGS"]

VGG_CONFIGS: dict[int, list[Union[int, str]]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def vgg(
    depth: int,
    *,
    norm: str = "gn",
    num_classes: int = 10,
    in_channels: int = 3,
    width_mult: float = 1.0,
    classifier: str = "mlp",
    hidden: int = 512,
    dropout: float = 0.0,
    gn_groups: int = 32,
    online: Optional[dict] = None,
) -> nn.Sequential:
    """VGG-``depth`` (11, 13 or 16). ``width_mult`` scales every conv width (for small test networks).

    Nested as ``block1``..``block5`` (the convs up to each pooling) and ``classifier``.
    """
    norm = check_norm(norm)
    if depth not in VGG_CONFIGS:
        raise ValueError(f"VGG depth must be one of {sorted(VGG_CONFIGS)}, got {depth}")
    if classifier not in ("mlp", "linear"):
        raise ValueError(f"classifier must be 'mlp' or 'linear', got {classifier!r}")
    parts: OrderedDict[str, nn.Module] = OrderedDict()
    block: list[nn.Module] = []
    cin = in_channels
    for item in VGG_CONFIGS[depth]:
        if item == "M":
            block.append(nn.MaxPool2d(2))
            parts[f"block{len(parts) + 1}"] = nn.Sequential(*block)
            block = []
            continue
        cout = max(1, int(round(int(item) * width_mult)))
        block.append(make_conv(norm, cin, cout, 3))
        n = make_norm(norm, cout, gn_groups=gn_groups, **(online or {}))
        if n is not None:
            block.append(n)
        block.append(nn.ReLU())
        cin = cout
    # global pooling makes inputs other than 32x32 work; at 32x32 the map is already 1x1
    head: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if classifier == "mlp":
        for fin in (cin, hidden):
            head += [nn.Linear(fin, hidden), nn.ReLU()]
            if dropout > 0:
                head.append(nn.Dropout(dropout))
        head.append(nn.Linear(hidden, num_classes))
    else:
        head.append(nn.Linear(cin, num_classes))
    parts["classifier"] = nn.Sequential(*head)
    return nn.Sequential(parts)
