"""Random-number-generator state for checkpoints: the CPU generator and, when CUDA is in use, every GPU's."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

__all__ = ["get_rng_state", "set_rng_state"]


def get_rng_state() -> dict[str, Any]:
    """``{"cpu": state, "cuda": [state per device] or None}`` (CUDA only when it has been initialized)."""
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: Any) -> None:
    """Restore a state from :func:`get_rng_state` (or a bare CPU state tensor, as older checkpoints hold)."""
    if isinstance(state, Tensor):
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["cpu"])
    cuda = state.get("cuda")
    if cuda is None:
        return
    if not torch.cuda.is_available():
        warnings.warn("the checkpoint holds CUDA random-number states but CUDA is not available; they are not restored")
        return
    if len(cuda) != torch.cuda.device_count():
        raise ValueError(
            f"the checkpoint holds random-number states for {len(cuda)} GPUs but {torch.cuda.device_count()} are "
            "visible; resume with the same CUDA_VISIBLE_DEVICES"
        )
    torch.cuda.set_rng_state_all(cuda)
