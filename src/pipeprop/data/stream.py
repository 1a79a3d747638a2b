"""A seeded, resumable stream of micro-batches over an in-memory split."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor

from .dataset import ImageDataset, Split
from .transfer import to_device

__all__ = ["MicroBatchStream"]

Transform = Callable[[Tensor, torch.Generator], Tensor]


class MicroBatchStream:
    """Yields ``(x, y)`` micro-batches of ``batch_size`` for ``epochs`` passes (reshuffled each epoch).

    ``x`` is normalized float (``dataset.normalize``), optionally augmented by ``augment(images_uint8,
    generator)`` first. The position and random state are in :meth:`state_dict`, so a resumed stream
    continues exactly where the saved one stopped.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        split: Optional[Split] = None,
        *,
        batch_size: int = 1,
        epochs: float = 1.0,
        shuffle: bool = True,
        seed: int = 0,
        augment: Optional[Transform] = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.split = split if split is not None else dataset.train
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.dtype = dtype
        self.device = torch.device(device)
        self.steps_per_epoch = len(self.split) // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch_size {batch_size} is larger than the split ({len(self.split)} examples)")
        self.total_steps = int(round(epochs * self.steps_per_epoch))
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0
        self._order: Optional[Tensor] = None
        self._order_epoch = -1

    def __len__(self) -> int:
        return self.total_steps - self.step

    def _epoch_order(self, epoch: int) -> Tensor:
        if self._order_epoch != epoch:
            n = len(self.split)
            self._order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
            self._order_epoch = epoch
        assert self._order is not None
        return self._order

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        while self.step < self.total_steps:
            epoch, pos = divmod(self.step, self.steps_per_epoch)
            idx = self._epoch_order(epoch)[pos * self.batch_size : (pos + 1) * self.batch_size]
            images = self.split.images[idx]
            if self.augment is not None:
                images = self.augment(images, self.generator)
            x = to_device(self.dataset.normalize(images, self.dtype), self.device)
            y = to_device(self.split.labels[idx], self.device)
            self.step += 1
            yield x, y

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "generator": self.generator.get_state(),
            "order": self._order,
            "order_epoch": self._order_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])
        self._order = state["order"]
        self._order_epoch = int(state["order_epoch"])
