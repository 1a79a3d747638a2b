"""Experiment tracking next to ``metrics.jsonl``, through each tool's own client (``logger = "tensorboard"``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from .config import ConfigError

__all__ = ["MetricsLogger", "open_logger"]


class MetricsLogger:
    """Writes every numeric field of a metrics record as a scalar at step ``record["samples"]``."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def log(self, record: dict[str, Any]) -> None:
        step = int(record["samples"])
        for key, value in record.items():
            if key != "samples" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_logger(kind: str, run_dir: Path, *, resume_at: Optional[int] = None) -> Optional[MetricsLogger]:
    """The logger of ``kind`` writing into ``run_dir/<kind>`` (``None`` for ``"none"``); a resumed run drops
    the events after its checkpoint (``resume_at`` samples) so curves are not duplicated."""
    if kind == "none":
        return None
    if kind == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # tensorboard is in the "track" extra
            raise ConfigError("logger = 'tensorboard' needs the tensorboard package: pip install tensorboard") from err
        return MetricsLogger(SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resume_at))
    raise ConfigError(f"logger = {kind!r}: allowed: 'none' or 'tensorboard'")
