"""In-memory image classification data: uint8 images and int64 labels as tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["Split", "ImageDataset"]


@dataclass
class Split:
    """One split: ``images`` uint8 ``[N, C, H, W]``, ``labels`` int64 ``[N]``."""

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dim() != 1 or len(self.labels) != len(self.images):
            raise ValueError(f"labels must be [N] with N={len(self.images)}, got {tuple(self.labels.shape)}")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int) -> "Split":
        """The first ``n`` examples (all if ``n`` is larger)."""
        return Split(self.images[:n], self.labels[:n])


@dataclass
class ImageDataset:
    """A named data set with train/test splits and per-channel normalization constants (in [0, 1] units).

    ``classes`` holds the class names when known, ``source`` where the data were read from.
    """

    name: str
    train: Split
    test: Split
    num_classes: int
    mean: Sequence[float]
    std: Sequence[float]
    classes: Sequence[str] = ()
    source: str = ""

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    def normalize(self, images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """uint8 ``[..., C, H, W]`` -> float, scaled to [0, 1] and standardized per channel."""
        x = images.to(dtype) / 255.0
        mean = torch.tensor(self.mean, dtype=dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=dtype, device=x.device).view(-1, 1, 1)
        return (x - mean) / std
