"""Moving micro-batches to the training device without blocking the host."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["to_device"]


def to_device(batch: Any, device: torch.device | str) -> Any:
    """``batch`` (a tensor, or a tuple/list of them) on ``device``.

    From the CPU to CUDA the tensors go through pinned memory with ``non_blocking=True``, so the copy
    overlaps the work already queued on the device instead of waiting for it (untested on a GPU so far:
    none was available). Tensors already on ``device`` are returned as they are.
    """
    device = torch.device(device)
    if isinstance(batch, Tensor):
        if batch.device == device:
            return batch
        if device.type == "cuda" and batch.device.type == "cpu":
            return batch.pin_memory().to(device, non_blocking=True)
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    return batch
