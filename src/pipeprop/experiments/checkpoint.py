"""Atomic files and checksummed checkpoints (the one writer of every file of a run folder).

A checkpoint file is one header line ``PIPEPROP-CHECKPOINT <format> <sha256 of the rest> <config hash>``
followed by the ``torch.save`` bytes of the state. Loading checks the checksum before unpickling and the
config hash before use, so a flipped bit, zeroed bytes, a truncated file or a checkpoint of another
config raise :class:`CheckpointError` naming the file and the fix, instead of loading silently wrong
weights. Files are written to a temporary file in the same folder, fsynced and renamed; they get the
user's umask; :func:`remove_temporary_files` deletes the temporaries a killed process left behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "verify_checkpoint",
    "atomic_write_text",
    "atomic_save",
    "remove_temporary_files",
    "CHECKPOINT_FORMAT",
]

CHECKPOINT_FORMAT = 2
MAGIC = b"PIPEPROP-CHECKPOINT"
_TMP_SUFFIX = ".tmp"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or belongs to a different run."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic(path: Path, write: Callable[[Any], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; a run folder's files follow the umask
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write ``text`` to ``path`` so that readers never see a partial file."""
    _atomic(Path(path), lambda f: f.write(text.encode()))


def atomic_save(obj: Any, path: Path | str) -> None:
    """``torch.save(obj)`` to ``path`` atomically (for files users load themselves, e.g. ``model.pt``)."""
    _atomic(Path(path), lambda f: torch.save(obj, f))


def remove_temporary_files(folder: Path | str) -> list[Path]:
    """Delete the temporary files of interrupted atomic writes under ``folder`` (e.g. after a SIGKILL)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.rglob(f".*{_TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def save_checkpoint(path: Path | str, state: dict[str, Any], *, config_hash: str) -> None:
    """Write ``state`` atomically with a SHA-256 of its bytes and the hash of the run's config."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    header = b" ".join([MAGIC, str(CHECKPOINT_FORMAT).encode(), hashlib.sha256(payload).hexdigest().encode(), config_hash.encode()])

    def write(f: Any) -> None:
        f.write(header + b"\n")
        f.write(payload)

    _atomic(Path(path), write)


_FIX = "delete it and start the run again with --overwrite (or a new --out), or restore an intact copy"


def verify_checkpoint(path: Path | str, config_hash: Optional[str] = None) -> bytes:
    """The checked payload of checkpoint ``path`` (checksum, format and, when given, config hash)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: start the run without --resume")
    raw = path.read_bytes()
    head, sep, payload = raw.partition(b"\n")
    fields = head.split(b" ")
    if not sep or len(fields) != 4 or fields[0] != MAGIC:
        raise CheckpointError(f"checkpoint {path} is damaged or not a pipeprop checkpoint (bad header): {_FIX}")
    if fields[1] != str(CHECKPOINT_FORMAT).encode():
        raise CheckpointError(f"checkpoint {path} has format {fields[1].decode(errors='replace')}, this pipeprop reads "
                              f"{CHECKPOINT_FORMAT}: {_FIX}")
    if hashlib.sha256(payload).hexdigest().encode() != fields[2]:
        raise CheckpointError(f"checkpoint {path} is damaged (its content does not match its SHA-256 checksum): {_FIX}")
    if config_hash is not None and fields[3].decode(errors="replace") != config_hash:
        raise CheckpointError(
            f"checkpoint {path} was written by a different config (config hash differs): resume with the settings "
            f"in config.json of its folder, or {_FIX.replace('delete it and ', '')}"
        )
    return payload


def load_checkpoint(path: Path | str, config_hash: Optional[str] = None, *, required: tuple[str, ...] = (),
                    map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; any problem raises :class:`CheckpointError`."""
    payload = verify_checkpoint(path, config_hash)
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - an intact checksum but unreadable content: still the user's fix
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {str(err)[:200]}): {_FIX}") from err
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a pipeprop run checkpoint (missing {missing}): {_FIX}")
    return state


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"
