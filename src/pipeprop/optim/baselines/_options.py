"""Shared helper: per-stage options stored in the parameter groups (so per-group overrides and
``state_dict`` round trips work like torch's own hyperparameters)."""

from __future__ import annotations

from typing import Any

import torch


def add_group_defaults(optimizer: torch.optim.Optimizer, options: dict[str, Any]) -> None:
    """Give every parameter group (present and future) ``options`` unless the group sets them itself."""
    optimizer.defaults.update(options)
    for group in optimizer.param_groups:
        for key, value in options.items():
            group.setdefault(key, value)


def scratch_like(cache: dict[int, list[torch.Tensor]], group: dict[str, Any], params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Reusable output buffers shaped like ``params`` for one group (not part of the optimizer state)."""
    out = cache.get(id(group))
    if out is None or len(out) != len(params) or any(o.shape != p.shape for o, p in zip(out, params)):
        out = cache[id(group)] = [torch.empty_like(p) for p in params]
    return out
