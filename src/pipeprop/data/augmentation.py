"""Standard CIFAR augmentation in torch: random crop after zero padding, and random horizontal flip.

``augment(images, generator)`` takes uint8 ``[B, C, H, W]`` and a ``torch.Generator`` and returns uint8
of the same shape, so it plugs into ``MicroBatchStream(augment=...)``; per-channel normalization is the
stream's ``dataset.normalize``. Random numbers come only from ``generator`` (reproducible, resumable).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["RandomCropFlip", "augment"]


@dataclass(frozen=True)
class RandomCropFlip:
    """Pad by ``padding`` zeros, crop back to the original size at a random offset, flip with prob. 1/2."""

    padding: int = 4
    flip: bool = True

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        if images.dim() != 4:
            raise ValueError(f"augment needs images [B, C, H, W], got {tuple(images.shape)}")
        b, _, h, w = images.shape
        p = self.padding
        # draw in a fixed order: offsets (y, x) for all samples, then the flips
        offsets = torch.randint(0, 2 * p + 1, (b, 2), generator=generator) if p > 0 else torch.zeros(b, 2, dtype=torch.long)
        flips = torch.rand(b, generator=generator) < 0.5 if self.flip else torch.zeros(b, dtype=torch.bool)
        padded = F.pad(images, (p, p, p, p)) if p > 0 else images
        if b == 1:  # batch size one: plain slicing is fastest
            dy, dx = int(offsets[0, 0]), int(offsets[0, 1])
            out = padded[:, :, dy : dy + h, dx : dx + w]
            return out.flip(-1) if bool(flips[0]) else out.contiguous()
        rows = offsets[:, :1] + torch.arange(h)  # [B, H]
        cols = offsets[:, 1:] + torch.arange(w)  # [B, W]
        cols = torch.where(flips[:, None], cols.flip(-1), cols)
        idx_b = torch.arange(b)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[idx_b, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
        return out.permute(0, 3, 1, 2).contiguous()


#: the standard CIFAR augmentation: 4-pixel zero padding, random 32x32 crop, horizontal flip
augment = RandomCropFlip(padding=4, flip=True)
