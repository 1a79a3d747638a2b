"""Batch-independent layers: Online Normalization, Weight Standardization, GroupNorm helpers."""

from .norm import NORMS, GroupNorm, check_norm, make_conv, make_linear, make_norm
from .online_norm import OnlineNorm, layer_scale
from .weight_std import WSConv2d, WSLinear, standardize_weight

__all__ = [
    "NORMS",
    "GroupNorm",
    "OnlineNorm",
    "WSConv2d",
    "WSLinear",
    "check_norm",
    "layer_scale",
    "make_conv",
    "make_linear",
    "make_norm",
    "standardize_weight",
]
