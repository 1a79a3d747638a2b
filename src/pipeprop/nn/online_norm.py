"""Online Normalization (Chiley et al., NeurIPS 2019) in plain PyTorch.

Each sample is normalized with running statistics from the samples before it, and its backward pass
applies running error-correction terms ``u`` and ``v`` from the errors that came back before it. A batch
of ``N`` is processed as ``N`` samples in order. The state (``running_mean``, ``running_var``, ``u``,
``v``) lives in buffers, outside autograd's saved tensors, and is advanced explicitly: the forward
statistics by every training forward, the control terms by every backward, so the layer is correct at
batch size one and in a pipeline where forwards and backwards of different samples interleave. The
buffers are part of ``state_dict()``, so checkpoints carry the state.

``OnlineNorm(x) = ECM(norm(x) * weight + bias)`` where the error-compensation mechanism ``ECM`` is layer
scaling (``"ls"``), activation clamping (``"ac"``) or nothing (``"none"``). See docs/models.md.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

__all__ = ["OnlineNorm", "OnlineNormFunction", "layer_scale", "ECM_CHOICES"]

ECM_CHOICES = ("ls", "ac", "none")


class OnlineNormFunction(torch.autograd.Function):
    """The training-mode layer: normalization with the state in ``module``, affine, and the ECM, fused.

    The affine ``weight`` is saved as an input (not a derived tensor), so a pipeline engine that rebinds
    saved weights (pipeprop's simulator) makes the backward pass use the weights it chooses.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], module: "OnlineNorm") -> Tensor:  # type: ignore[override]
        y, scales = module._normalize_and_update(x)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        z = torch.addcmul(bias.view(shape), y, weight.view(shape)) if weight is not None else y
        ecm_saved: Optional[Tensor] = None
        ls_scale: Optional[Tensor] = None
        if module.ecm == "ls":
            dims = tuple(range(1, x.dim()))
            ls_scale = torch.sqrt(z.pow(2).mean(dim=dims, keepdim=True) + module.eps)
            out = z / ls_scale
            ecm_saved = out
        elif module.ecm == "ac":
            ecm_saved = z.abs() <= module.clamp
            out = torch.clamp(z, -module.clamp, module.clamp)
        else:
            out = z if z is not y else y.clone()
        ctx.module = module
        ctx.save_for_backward(y, scales, weight, ecm_saved, ls_scale)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor):  # type: ignore[override]
        y, scales, weight, ecm_saved, ls_scale = ctx.saved_tensors
        module: OnlineNorm = ctx.module
        if module.ecm == "ls":
            dims = tuple(range(1, grad_out.dim()))
            proj = (grad_out * ecm_saved).mean(dim=dims, keepdim=True)
            grad_z = (grad_out - proj * ecm_saved) / ls_scale
        elif module.ecm == "ac":
            grad_z = grad_out * ecm_saved
        else:
            grad_z = grad_out
        grad_w = grad_b = None
        if weight is not None:
            reduce = (0,) + tuple(range(2, grad_z.dim()))
            if ctx.needs_input_grad[1]:
                grad_w = (grad_z * y).sum(dim=reduce)
            if ctx.needs_input_grad[2]:
                grad_b = grad_z.sum(dim=reduce)
            grad_z = grad_z * weight.view((1, -1) + (1,) * (grad_z.dim() - 2))
        return module._correct_gradient(grad_z, y, scales), grad_w, grad_b, None


def layer_scale(x: Tensor, eps: float) -> Tensor:
    """Divide each sample by ``sqrt(mean(x^2) + eps)`` over all non-batch axes.

    Its autograd gradient is exactly ``(g - mean(g*y) * y) / scale`` (the ECM's backward).
    """
    dims = tuple(range(1, x.dim()))
    return x / torch.sqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)


class OnlineNorm(nn.Module):
    """Online Normalization for ``[N, C, *spatial]`` inputs (``[N, C]`` is the 1-d variant).

    Args:
        num_features: channels ``C``.
        alpha_fwd: forward decay of the running mean and variance.
        alpha_bkw: backward decay of the control terms ``u``, ``v``.
        eps: added to the variance.
        affine: learn a per-channel ``weight`` and ``bias``.
        ecm: ``"ls"`` (layer scaling, default), ``"ac"`` (activation clamping) or ``"none"``.
        clamp: the clamping bound for ``ecm="ac"``.
    """

    #: pipeprop's partitioner keeps a normalization layer in the stage of the layer before it
    pipeprop_is_norm = True

    def __init__(
        self,
        num_features: int,
        alpha_fwd: float = 0.999,
        alpha_bkw: float = 0.99,
        eps: float = 1e-5,
        affine: bool = True,
        ecm: str = "ls",
        clamp: float = 5.0,
    ) -> None:
        super().__init__()
        if ecm not in ECM_CHOICES:
            raise ValueError(f"unknown ecm {ecm!r}; choose one of {ECM_CHOICES}")
        for name, a in (("alpha_fwd", alpha_fwd), ("alpha_bkw", alpha_bkw)):
            if not 0.0 <= a < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {a}")
        self.num_features = num_features
        self.alpha_fwd = alpha_fwd
        self.alpha_bkw = alpha_bkw
        self.eps = eps
        self.ecm = ecm
        self.clamp = clamp
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("u", torch.zeros(num_features))
        self.register_buffer("v", torch.zeros(num_features))

    def reset_state(self) -> None:
        """Reset the running statistics and control terms to their initial values."""
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.u.zero_()
        self.v.zero_()

    # ------------------------------------------------------------------ core (one sample at a time)
    @torch.no_grad()
    def _normalize_and_update(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Normalize every sample of ``x`` in order with the statistics before it; advance the statistics."""
        a = self.alpha_fwd
        dims = tuple(range(1, x.dim() - 1))  # spatial axes of one sample [C, *spatial]
        shape = (-1,) + (1,) * len(dims)
        m, var = self.running_mean, self.running_var
        y = torch.empty_like(x)
        scales = torch.empty(x.shape[0], self.num_features, dtype=var.dtype, device=x.device)
        for t in range(x.shape[0]):
            xt = x[t]
            scale = torch.sqrt(var + self.eps, out=scales[t])
            torch.div(xt - m.view(shape).to(x.dtype), scale.view(shape).to(x.dtype), out=y[t])
            if dims:
                s2, mu = torch.var_mean(xt, dim=dims, unbiased=False)
            else:
                mu, s2 = xt, torch.zeros_like(xt)
            diff = mu.to(m.dtype) - m
            var.mul_(a).add_(s2.to(var.dtype), alpha=1 - a).addcmul_(diff, diff, value=a * (1 - a))
            m.add_(diff, alpha=1 - a)
        return y, scales

    @torch.no_grad()
    def _correct_gradient(self, grad_y: Tensor, y: Tensor, scales: Tensor) -> Tensor:
        """Input gradient of every sample in order, applying and advancing the control terms."""
        b = self.alpha_bkw
        dims = tuple(range(1, grad_y.dim() - 1))
        shape = (-1,) + (1,) * len(dims)
        u, v = self.u, self.v
        grad_x = torch.empty_like(grad_y)
        for t in range(grad_y.shape[0]):
            yt = y[t]
            g = torch.addcmul(grad_y[t], v.view(shape).to(yt.dtype), yt, value=-(1 - b))
            gy = g * yt
            v.add_((gy.mean(dim=dims) if dims else gy).to(v.dtype))
            gx = torch.div(g, scales[t].view(shape).to(g.dtype), out=grad_x[t])
            gx.sub_(u.view(shape).to(g.dtype), alpha=1 - b)
            u.add_((gx.mean(dim=dims) if dims else gx).to(u.dtype))
        return grad_x

    # ------------------------------------------------------------------ module
    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"OnlineNorm({self.num_features}) needs input [N, {self.num_features}, ...], got {tuple(x.shape)}"
            )
        if self.training:
            return OnlineNormFunction.apply(x, self.weight, self.bias, self)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = (x - self.running_mean.to(x.dtype).view(shape)) / torch.sqrt(self.running_var.to(x.dtype).view(shape) + self.eps)
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.ecm == "ls":
            y = layer_scale(y, self.eps)
        elif self.ecm == "ac":
            y = torch.clamp(y, -self.clamp, self.clamp)
        return y

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, alpha_fwd={self.alpha_fwd}, alpha_bkw={self.alpha_bkw}, eps={self.eps}, "
            f"affine={self.weight is not None}, ecm={self.ecm!r}"
        )
