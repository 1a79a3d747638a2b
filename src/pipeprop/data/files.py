"""Where data files are found, downloaded and extracted.

Lookup order for every data set: an explicit ``data_dir``, then ``$PIPEPROP_DATA``, then the cache
directory (``cache_dir``, else ``$PIPEPROP_CACHE``, else ``~/.cache/pipeprop``); if none holds the files,
they are downloaded into the cache from the official source and checked against the published MD5.
Archives are extracted once into ``<cache>/extracted/`` (never into the folder they were found in, which
may be read-only).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tarfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

__all__ = [
    "DatasetNotFoundError",
    "CorruptDatasetError",
    "RemoteFile",
    "cache_dir",
    "search_roots",
    "md5sum",
    "download",
    "extract_archive",
    "missing",
]


class DatasetNotFoundError(FileNotFoundError):
    """The data set's files are in none of the searched places and could not be downloaded."""


class CorruptDatasetError(ValueError):
    """A data file exists but is unreadable or has the wrong structure."""


@dataclass(frozen=True)
class RemoteFile:
    """An official download: file name, mirror URLs (tried in order) and the published MD5."""

    name: str
    urls: tuple[str, ...]
    md5: str


def cache_dir(explicit: Optional[os.PathLike | str] = None) -> Path:
    """``explicit``, else ``$PIPEPROP_CACHE``, else ``~/.cache/pipeprop``."""
    if explicit is not None:
        return Path(explicit).expanduser()
    env = os.environ.get("PIPEPROP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pipeprop"


def search_roots(data_dir: Optional[os.PathLike | str], cache: Path) -> list[tuple[Path, bool]]:
    """The folders to look in, in order, each with whether it was given explicitly."""
    roots: list[tuple[Path, bool]] = []
    if data_dir is not None:
        roots.append((Path(data_dir).expanduser(), True))
    env = os.environ.get("PIPEPROP_DATA")
    if env:
        roots.append((Path(env).expanduser(), False))
    roots.append((cache, False))
    return roots


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _progress(total: Optional[int], desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the cli extra
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)


def download(remote: RemoteFile, dest_dir: Path, *, timeout: float = 60.0) -> Path:
    """Download ``remote`` into ``dest_dir`` (progress bar, MD5 check); returns the file's path.

    Tries each mirror in turn; a file with the wrong checksum is deleted and counts as a failure.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / remote.name
    errors: list[str] = []
    for url in remote.urls:
        part = dest.with_name(dest.name + ".part")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
                total = response.headers.get("Content-Length")
                bar = _progress(int(total) if total else None, remote.name)
                while block := response.read(1 << 16):
                    out.write(block)
                    if bar is not None:
                        bar.update(len(block))
                if bar is not None:
                    bar.close()
        except OSError as err:  # URLError and socket errors are OSErrors
            part.unlink(missing_ok=True)
            errors.append(f"{url}: {err}")
            continue
        got = md5sum(part)
        if got != remote.md5:
            part.unlink(missing_ok=True)
            errors.append(f"{url}: checksum mismatch (md5 {got}, expected {remote.md5})")
            continue
        part.replace(dest)
        return dest
    raise DatasetNotFoundError(f"could not download {remote.name}: " + "; ".join(errors))


def _check_gzip(path: Path, chunk: int = 1 << 22) -> None:
    """Read a gzip stream to its end, so that its CRC and length are verified (corrupt bytes raise)."""
    with gzip.open(path, "rb") as f:
        while f.read(chunk):
            pass


def extract_archive(archive: Path, cache: Path) -> Path:
    """Extract a ``.tar.gz`` once into ``<cache>/extracted/<archive>-<key>/``; returns that folder.

    The key depends on the archive's absolute path, size and modification time, so a replaced archive
    is extracted again. Extraction goes to a temporary folder that is renamed when complete.
    """
    st = archive.stat()
    key = hashlib.sha1(f"{archive.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:10]
    stem = archive.name.split(".")[0]
    target = cache / "extracted" / f"{stem}-{key}"
    if target.is_dir():
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if archive.name.endswith(("gz", ".tgz")):
            _check_gzip(archive)
        with tarfile.open(archive, "r:*") as tar:
            try:
                tar.extractall(tmp, filter="data")
            except TypeError:  # pragma: no cover - Python without extraction filters
                tar.extractall(tmp)
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, PermissionError):
            raise
        detail = " ".join(str(err).split())
        raise CorruptDatasetError(
            f"{archive} is not a readable .tar.gz archive ({type(err).__name__}: {detail}). Delete or replace it "
            "(with download enabled, pipeprop then downloads the official archive into its cache)."
        ) from err
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def missing(folder: Path, names: Sequence[str]) -> list[str]:
    """The names in ``names`` that are not files in ``folder``."""
    return [n for n in names if not (folder / n).is_file()]
