"""The model zoo: every model is an ``nn.Sequential`` that :func:`pipeprop.partition` splits per layer.

``get("resnet20", norm="gn", num_classes=10)`` builds a model by name; :func:`list_models` lists names.
Residual blocks carry the skip in a tuple (see :mod:`pipeprop.models.blocks`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from torch import nn

from .blocks import Fork, Join, OnBranch, OnSkip, PadShortcut, describe
from .gpt import char_gpt, lm_loss
from .resnet_cifar import cifar_resnet
from .resnet_imagenet import imagenet_resnet
from .small import cnn_small, mlp
from .vgg import vgg

__all__ = [
    "get",
    "list_models",
    "ModelSpec",
    "cifar_resnet",
    "imagenet_resnet",
    "vgg",
    "mlp",
    "cnn_small",
    "char_gpt",
    "lm_loss",
    "Fork",
    "OnBranch",
    "OnSkip",
    "Join",
    "PadShortcut",
    "describe",
]


@dataclass(frozen=True)
class ModelSpec:
    """A zoo entry: its builder, its default norm and a one-line summary."""

    build: Callable[..., nn.Sequential]
    default_norm: str
    summary: str


_ZOO: dict[str, ModelSpec] = {
    "mlp": ModelSpec(mlp, "none", "MLP (kw: in_features=64, hidden=128, depth=3 linear layers)"),
    "cnn-small": ModelSpec(cnn_small, "gn", "3 conv + linear, for budget runs at 8x8 or 32x32 (kw: width=16)"),
    **{
        f"resnet{d}": ModelSpec(partial(cifar_resnet, d), "gn", f"CIFAR ResNet-{d} (He et al. 2016; kw: width, shortcut)")
        for d in (20, 32, 44, 56, 110)
    },
    **{f"vgg{d}": ModelSpec(partial(vgg, d), "gn", f"VGG-{d} for 32x32 (kw: width_mult, classifier)") for d in (11, 13, 16)},
    "resnet50": ModelSpec(partial(imagenet_resnet, 50), "gn", "ImageNet ResNet-50, bottleneck (kw: width=64)"),
    "char-gpt": ModelSpec(char_gpt, "ln", "character-level GPT, 4 stages per block, untied embeddings "
                          "(kw: vocab_size=65, context=64, d_model=64, n_layers=4, n_heads=4)"),
}


def list_models() -> list[str]:
    """Names accepted by :func:`get`."""
    return list(_ZOO)


def _canonical(name: str) -> str:
    """"ResNet-20", "resnet_20", "VGG16" -> "resnet20", "vgg16"; "cnn" -> "cnn-small"."""
    key = str(name).strip().lower().replace("_", "-")
    if key.startswith(("resnet", "vgg")):
        key = key.replace("-", "")
    return {"cnn": "cnn-small", "cnnsmall": "cnn-small"}.get(key, key)


def get(name: str, *, norm: str | None = None, num_classes: int = 10, **kw: Any) -> nn.Sequential:
    """Build zoo model ``name`` with normalization ``norm`` ("gn", "online", "ws+gn", "bn", "none").

    ``norm=None`` takes the model's default ("gn" for the conv nets, "none" for the MLP). Extra keywords go
    to the builder, e.g. ``in_channels=1``, ``gn_groups=4``, ``width=8``, ``online={"ecm": "ac"}``.
    """
    key = _canonical(name)
    if key not in _ZOO:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(_ZOO)}")
    spec = _ZOO[key]
    try:
        return spec.build(norm=spec.default_norm if norm is None else norm, num_classes=num_classes, **kw)
    except TypeError as err:
        builder = getattr(spec.build, "func", spec.build).__name__
        raise TypeError(f"model {key!r}: {err}. See pipeprop.models.{builder} for its options.") from err
