"""Shared test settings: one CPU thread, deterministic seeds, the offline data folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

torch.set_num_threads(1)

#: ../shared/data next to the checkout (CI lays shared/ beside the clone), or $PIPEPROP_SHARED_DATA
SHARED_DATA = Path(os.environ.get("PIPEPROP_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def shared_data() -> Path:
    """The offline data folder; tests that need it skip with a reason when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"offline data folder {SHARED_DATA} not found (set PIPEPROP_SHARED_DATA)")
    return SHARED_DATA


class CountedReads:
    """Counts the reads of tensor values to the host (``item``, ``tolist``, ``float()``, ``int()``, ``bool()``, ...)
    made while counting is on."""

    NAMES = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads = 0
        self.on = True
        for name in self.NAMES:
            monkeypatch.setattr(torch.Tensor, name, self._counted(getattr(torch.Tensor, name)))

    def _counted(self, method: Any) -> Any:
        def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.on:
                self.reads += 1
            return method(tensor, *args, **kwargs)

        return read

    def paused(self, method: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.on = False
            try:
                return method(*args, **kwargs)
            finally:
                self.on = True

        return call


@pytest.fixture
def count_host_reads(monkeypatch: pytest.MonkeyPatch) -> Callable[[], CountedReads]:
    """Start counting the host reads of tensor values (until the test ends): ``counter = count_host_reads()``."""
    return lambda: CountedReads(monkeypatch)
