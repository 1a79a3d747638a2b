"""Shared test settings: one CPU thread, deterministic seeds, the offline data folder."""

from __future__ import annotations

import os
from pathlib import Path

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
