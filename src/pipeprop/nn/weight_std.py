"""Weight Standardization (Qiao et al., 2019) for convolutions and linear layers.

The layer uses ``w_hat = (w - mean(w)) / sqrt(var(w) + eps)`` per output channel. In a PB pipeline the
forward runs with stale weights and the backward must use the *live* ones. pipeprop's simulator rebinds
the weights that autograd saves, but a derived weight ``w_hat`` would not be rebound. So the layer is a
custom autograd function that saves the raw weight and recomputes ``w_hat`` in the backward pass from
whatever weight the engine puts there (the live weight for PB, the forward weight for weight stashing).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

__all__ = ["standardize_weight", "WSConv2d", "WSLinear"]


def _standardize(weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(w_hat, std)``: the standardized weight and the per-output-channel ``sqrt(var + eps)`` [O, 1]."""
    flat = weight.reshape(weight.shape[0], -1)
    var, mean = torch.var_mean(flat, dim=1, unbiased=False, keepdim=True)
    std = torch.sqrt(var + eps)
    return ((flat - mean) / std).reshape(weight.shape), std


def _standardize_backward(grad_w_hat: Tensor, w_hat: Tensor, std: Tensor) -> Tensor:
    """Gradient through the standardization: ``(g - mean(g) - w_hat * mean(g * w_hat)) / std`` per channel."""
    g = grad_w_hat.reshape(grad_w_hat.shape[0], -1)
    wh = w_hat.reshape(w_hat.shape[0], -1)
    out = (g - g.mean(dim=1, keepdim=True) - wh * (g * wh).mean(dim=1, keepdim=True)) / std
    return out.reshape(grad_w_hat.shape)


def standardize_weight(weight: Tensor, eps: float = 1e-5) -> Tensor:
    """Zero mean, unit (biased) variance per output channel (dimension 0)."""
    return _standardize(weight, eps)[0]


class _WSConv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Optional[Tensor], conv: dict, eps: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.conv, ctx.eps, ctx.has_bias = conv, eps, bias is not None
        return F.conv2d(x, standardize_weight(weight, eps), bias, **conv)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        w_hat, std = _standardize(weight.detach(), ctx.eps)
        conv = ctx.conv
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        grad_x, grad_w_hat, grad_b = torch.ops.aten.convolution_backward(
            grad_out, x, w_hat, [w_hat.shape[0]] if need_b else None,
            _pair(conv["stride"]), _pair(conv["padding"]), _pair(conv["dilation"]), False, [0, 0], conv["groups"],
            [need_x, need_w, need_b],
        )
        grad_w = _standardize_backward(grad_w_hat, w_hat, std) if need_w else None
        return grad_x, grad_w, grad_b, None, None


class _WSLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.eps, ctx.has_bias = eps, bias is not None
        return F.linear(x, standardize_weight(weight, eps), bias)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        w_hat, std = _standardize(weight.detach(), ctx.eps)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ w_hat
        if ctx.needs_input_grad[1]:
            grad_w_hat = grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
            grad_w = _standardize_backward(grad_w_hat, w_hat, std)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(dim=0)
        return grad_x, grad_w, grad_b, None


class WSConv2d(nn.Conv2d):
    """``nn.Conv2d`` with a standardized weight (string padding modes other than zeros are not supported)."""

    def __init__(self, *args: Any, ws_eps: float = 1e-5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError("WSConv2d supports numeric zero padding only (padding_mode='zeros', padding=int/tuple)")
        self.ws_eps = ws_eps

    def forward(self, x: Tensor) -> Tensor:
        conv = dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)
        return _WSConv2dFunction.apply(x, self.weight, self.bias, conv, self.ws_eps)


class WSLinear(nn.Linear):
    """``nn.Linear`` with a standardized weight (each output unit's incoming weights)."""

    def __init__(self, *args: Any, ws_eps: float = 1e-5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ws_eps = ws_eps

    def forward(self, x: Tensor) -> Tensor:
        return _WSLinearFunction.apply(x, self.weight, self.bias, self.ws_eps)
