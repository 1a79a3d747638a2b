"""Character-level text data: Tiny Shakespeare, checked by SHA-256, and seeded sequence streams.

``load_tiny_shakespeare(data_dir=None)`` looks for ``input.txt`` (or ``tinyshakespeare/input.txt``) in
``data_dir``, then ``$PIPEPROP_DATA``, then the cache folder (as the image data sets do), checks its
SHA-256 and splits it like nanoGPT's character-level recipe: the first 90% of the characters for
training, the last 10% for validation. Nothing is downloaded (the file is 1.1 MB; put it in one of those
folders, e.g. from https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt).

A :class:`SequenceStream` yields ``(x, y)`` micro-batches of ``batch_size`` windows of ``context``
characters, ``y`` shifted by one, at seeded random offsets; ``validation_windows`` cuts the validation text
into fixed, non-overlapping windows, so the validation loss is in nats per character.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from .files import CorruptDatasetError, DatasetNotFoundError, cache_dir as default_cache_dir, search_roots
from .transfer import to_device

__all__ = ["TextDataset", "SequenceStream", "load_tiny_shakespeare", "TINY_SHAKESPEARE_SHA256"]

#: SHA-256 of the standard Tiny Shakespeare ``input.txt`` (1,115,394 characters, 65 distinct)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
_CANDIDATES = ("tinyshakespeare/input.txt", "input.txt", "tinyshakespeare.txt")


@dataclass
class TextDataset:
    """A character-level corpus: the vocabulary and the train/validation character ids (int64)."""

    name: str
    chars: str
    train: Tensor
    val: Tensor

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        index = {c: i for i, c in enumerate(self.chars)}
        try:
            return torch.tensor([index[c] for c in text], dtype=torch.int64)
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the {self.name} vocabulary") from None

    def decode(self, ids: Tensor) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def validation_windows(self, context: int, limit: Optional[int] = None) -> tuple[Tensor, Tensor]:
        """Non-overlapping ``(x, y)`` windows of the validation text, shape ``(n, context)`` each."""
        n = (len(self.val) - 1) // context
        if limit is not None:
            n = min(n, limit)
        if n < 1:
            raise ValueError(f"the validation text ({len(self.val)} characters) is shorter than one window of {context}")
        x = self.val[: n * context].view(n, context)
        y = self.val[1 : n * context + 1].view(n, context)
        return x, y


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def load_tiny_shakespeare(
    data_dir: Optional[os.PathLike | str] = None,
    *,
    cache_dir: Optional[os.PathLike | str] = None,
    train_fraction: float = 0.9,
    verify: bool = True,
) -> TextDataset:
    """Tiny Shakespeare as a :class:`TextDataset` (see the module docstring for where it is looked for)."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must lie in (0, 1), got {train_fraction}")
    roots = search_roots(data_dir, default_cache_dir(cache_dir))
    for root, _ in roots:
        for name in _CANDIDATES:
            path = root / name
            if path.is_file():
                return _read(path, train_fraction, verify)
    places = ", ".join(str(r) for r, _ in roots)
    raise DatasetNotFoundError(
        f"Tiny Shakespeare not found: looked for {' or '.join(_CANDIDATES)} in {places}. Pass data_dir= (--data-dir) "
        "pointing at the folder holding input.txt (e.g. ../shared/data), or set $PIPEPROP_DATA."
    )


def _read(path: Path, train_fraction: float, verify: bool) -> TextDataset:
    if verify:
        digest = _sha256(path)
        if digest != TINY_SHAKESPEARE_SHA256:
            raise CorruptDatasetError(
                f"{path} has SHA-256 {digest}, not the standard Tiny Shakespeare's {TINY_SHAKESPEARE_SHA256}; "
                "replace the file or pass verify=False to use it anyway"
            )
    text = path.read_text(encoding="utf-8")
    chars = "".join(sorted(set(text)))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.int64)
    cut = int(len(ids) * train_fraction)
    return TextDataset("tinyshakespeare", chars, ids[:cut], ids[cut:])


class SequenceStream:
    """Seeded micro-batches of ``batch_size`` random training windows of ``context`` characters.

    Iterating yields ``steps`` pairs ``(x, y)`` of shape ``(batch_size, context)`` with ``y`` the next
    characters; :meth:`state_dict` makes a stream resumable.
    """

    def __init__(self, data: TextDataset, *, context: int, batch_size: int = 1, steps: int, seed: int = 0,
                 device: torch.device | str = "cpu") -> None:
        if context < 1 or batch_size < 1 or steps < 0:
            raise ValueError(f"need context >= 1, batch_size >= 1, steps >= 0; got {context}, {batch_size}, {steps}")
        if len(data.train) <= context:
            raise ValueError(f"the training text ({len(data.train)} characters) is shorter than context {context} + 1")
        self.data, self.context, self.batch_size, self.steps = data, context, batch_size, steps
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.position = 0

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        offsets = torch.arange(self.context + 1)
        while self.position < self.steps:
            starts = torch.randint(0, len(self.data.train) - self.context, (self.batch_size,), generator=self.generator)
            window = to_device(self.data.train[starts[:, None] + offsets], self.device)  # one (pinned) copy
            self.position += 1
            yield window[:, :-1], window[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])
        self.generator.set_state(state["generator"])
