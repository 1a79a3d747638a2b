"""Normalization layers chosen by name: ``"gn"``, ``"online"``, ``"ws+gn"``, ``"bn"``, ``"none"``."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from .online_norm import OnlineNorm
from .weight_std import WSConv2d, WSLinear

__all__ = ["NORMS", "GroupNorm", "check_norm", "make_norm", "make_conv", "make_linear"]

NORMS = ("gn", "online", "ws+gn", "bn", "none")


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` built from a group count that is capped at the channel count.

    ``GroupNorm(channels, groups=8)`` uses ``min(groups, channels)`` groups, which must divide ``channels``.
    """

    def __init__(self, num_channels: int, groups: int = 8, eps: float = 1e-5, affine: bool = True) -> None:
        g = min(groups, num_channels)
        if g < 1 or num_channels % g:
            raise ValueError(
                f"GroupNorm: {num_channels} channels cannot be split into {g} groups; pass gn_groups= a divisor "
                f"of {num_channels}"
            )
        super().__init__(g, num_channels, eps=eps, affine=affine)


def check_norm(norm: str) -> str:
    key = str(norm).strip().lower()
    if key not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    return key


def make_norm(norm: str, channels: int, *, dims: int = 2, gn_groups: int = 8, **online: Any) -> Optional[nn.Module]:
    """The normalization layer for ``channels`` features (``dims=2`` images, ``dims=1`` vectors); None for "none".

    ``online`` keyword arguments (``alpha_fwd``, ``alpha_bkw``, ``ecm``, ...) go to :class:`OnlineNorm`.
    """
    key = check_norm(norm)
    if key in ("gn", "ws+gn"):
        return GroupNorm(channels, gn_groups)
    if key == "online":
        return OnlineNorm(channels, **online)
    if key == "bn":
        return nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm1d(channels)
    return None


def make_conv(norm: str, cin: int, cout: int, kernel: int, stride: int = 1, padding: Optional[int] = None) -> nn.Conv2d:
    """A convolution for ``norm``: weight-standardized for "ws+gn", with a bias only when there is no norm."""
    key = check_norm(norm)
    cls = WSConv2d if key == "ws+gn" else nn.Conv2d
    pad = kernel // 2 if padding is None else padding
    return cls(cin, cout, kernel, stride=stride, padding=pad, bias=key == "none")


def make_linear(norm: str, fin: int, fout: int, *, bias: Optional[bool] = None) -> nn.Linear:
    """A linear layer for ``norm`` (weight-standardized for "ws+gn"); bias by default only without a norm."""
    key = check_norm(norm)
    cls = WSLinear if key == "ws+gn" else nn.Linear
    return cls(fin, fout, bias=(key == "none") if bias is None else bias)
