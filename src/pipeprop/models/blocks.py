"""Sequential building blocks: layers with norm and activation, and residual blocks as a flat sequence.

A residual block ``y = act(f(x) + shortcut(x))`` is written as a sequence that carries the skip tensor
in a tuple, so that pipeprop's partitioner can put each of its convolutions in its own stage:

``Fork``: ``x -> (x, x)``; ``OnBranch(conv, norm, act)``: ``(h, s) -> (layer(h), s)`` (one stage per
convolution); ``OnSkip(conv1x1, norm)``: ``(h, s) -> (h, proj(s))`` (a projection shortcut is its own
stage); ``Join(shortcut, act)``: ``(h, s) -> act(h + shortcut(s))`` with a parameter-free shortcut.
Parameter-free modules join the stage before them.
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.norm import make_conv, make_norm

__all__ = ["Fork", "OnBranch", "OnSkip", "Join", "PadShortcut", "conv_unit", "describe"]


class Fork(nn.Module):
    """``x -> (x, x)``: start a residual block; the second element is the skip."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, x


class OnBranch(nn.Module):
    """Apply ``layers`` to the residual branch of ``(h, skip)``."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, hs: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        h, skip = hs
        return self.body(h), skip


class OnSkip(nn.Module):
    """Apply ``layers`` (a projection shortcut) to the skip of ``(h, skip)``."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, hs: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        h, skip = hs
        return h, self.body(skip)


class PadShortcut(nn.Module):
    """He et al.'s parameter-free shortcut (option A): subsample by ``stride``, zero-pad the channels."""

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, extra_channels

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            lo = self.extra // 2
            x = F.pad(x, (0, 0, 0, 0, lo, self.extra - lo))
        return x

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_channels={self.extra}"


class Join(nn.Module):
    """``(h, skip) -> act(h + shortcut(skip))``; the shortcut must be parameter-free (use OnSkip otherwise)."""

    def __init__(self, shortcut: Optional[nn.Module] = None, act: bool = True) -> None:
        super().__init__()
        if shortcut is not None and any(True for _ in shortcut.parameters()):
            raise ValueError("Join's shortcut must be parameter-free; put a projection in OnSkip before the Join")
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, hs: tuple[Tensor, Tensor]) -> Tensor:
        h, skip = hs
        return self.act(h + self.shortcut(skip))


def conv_unit(
    norm: str,
    cin: int,
    cout: int,
    kernel: int = 3,
    stride: int = 1,
    *,
    act: bool = True,
    gn_groups: int = 8,
    online: Optional[dict] = None,
) -> list[nn.Module]:
    """``[conv, norm?, relu?]`` for one layer."""
    layers: list[nn.Module] = [make_conv(norm, cin, cout, kernel, stride)]
    n = make_norm(norm, cout, gn_groups=gn_groups, **(online or {}))
    if n is not None:
        layers.append(n)
    if act:
        layers.append(nn.ReLU(inplace=False))
    return layers


def _short(m: nn.Module) -> str:
    if isinstance(m, nn.Conv2d):
        k = "x".join(str(v) for v in m.kernel_size)
        s = f"/{m.stride[0]}" if m.stride[0] > 1 else ""
        ws = "ws-" if type(m).__name__.startswith("WS") else ""
        return f"{ws}conv{k}{s}({m.in_channels}->{m.out_channels})"
    if isinstance(m, nn.Linear):
        ws = "ws-" if type(m).__name__.startswith("WS") else ""
        return f"{ws}linear({m.in_features}->{m.out_features})"
    names = {
        "GroupNorm": "gn", "OnlineNorm": "online", "BatchNorm2d": "bn", "BatchNorm1d": "bn", "ReLU": "relu",
        "MaxPool2d": "maxpool", "AdaptiveAvgPool2d": "avgpool", "Flatten": "flatten", "Fork": "fork",
        "Identity": "id", "Dropout": "dropout",
    }
    return names.get(type(m).__name__, type(m).__name__)


def describe(module: nn.Module) -> str:
    """A short human-readable description, e.g. ``branch[conv3x3(16->16)+gn+relu]``."""
    if isinstance(module, OnBranch):
        return "branch[" + "+".join(_short(m) for m in module.body) + "]"
    if isinstance(module, OnSkip):
        return "shortcut[" + "+".join(_short(m) for m in module.body) + "]"
    if isinstance(module, Join):
        sc = "" if isinstance(module.shortcut, nn.Identity) else "pad-"
        return f"join({sc}add" + ("+relu)" if isinstance(module.act, nn.ReLU) else ")")
    return _short(module)
