"""CIFAR-10 and CIFAR-100 in the standard "python version" layout (pickled batches).

A copy whose bytes differ from the official release (e.g. the offline CIFAR-10 in shared/data) is
accepted when it passes a structural check: the files exist and unpickle, images are uint8 with
3x32x32 pixels, 50,000 training and 10,000 test images, and every label is in range. Downloads are
checked against the official MD5 instead.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .dataset import ImageDataset, Split
from .files import CorruptDatasetError, RemoteFile, extract_archive, missing

__all__ = ["CIFAR10", "CIFAR100", "CifarLayout", "find_cifar", "read_cifar"]


@dataclass(frozen=True)
class CifarLayout:
    name: str
    archive: RemoteFile
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    num_classes: int
    class_names_key: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def files(self) -> tuple[str, ...]:
        return self.train_files + self.test_files + (self.meta_file,)


CIFAR10 = CifarLayout(
    name="cifar10",
    archive=RemoteFile(
        "cifar-10-python.tar.gz",
        ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
        "c58f30108f718f92721af3b95e74349a",
    ),
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    label_key="labels",
    num_classes=10,
    class_names_key="label_names",
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
)

CIFAR100 = CifarLayout(
    name="cifar100",
    archive=RemoteFile(
        "cifar-100-python.tar.gz",
        ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
        "eb9058c3a382ffc7106e4002c42a8d85",
    ),
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    label_key="fine_labels",
    num_classes=100,
    class_names_key="fine_label_names",
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
)


def find_cifar(layout: CifarLayout, root: Path, cache: Path, explicit: bool) -> Optional[Path]:
    """The extracted batches folder for ``layout`` under ``root`` (extracting its archive if needed), or None.

    A folder that exists but lacks files raises :class:`CorruptDatasetError` naming them.
    """
    candidates = [root / layout.folder] + ([root] if explicit else [])
    for folder in candidates:
        if not folder.is_dir() or (folder == root and not any((root / f).exists() for f in layout.files)):
            continue
        absent = missing(folder, layout.files)
        if absent:
            raise CorruptDatasetError(
                f"{layout.name}: {folder} lacks {', '.join(absent)}. Restore the files, or delete the folder so "
                f"that the archive {layout.archive.name} is used (or downloaded) instead."
            )
        return folder
    archive = root / layout.archive.name
    if archive.is_file():
        extracted = extract_archive(archive, cache)
        folder = extracted / layout.folder
        absent = missing(folder, layout.files)
        if absent:
            raise CorruptDatasetError(
                f"{layout.name}: archive {archive} does not contain {layout.folder}/{', '.join(absent)}. It is not a "
                f"CIFAR archive in the standard python layout; replace it with {layout.archive.urls[0]}."
            )
        return folder
    return None


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    except Exception as err:  # pickle raises many types on corrupt input
        raise CorruptDatasetError(
            f"cannot read {path} ({type(err).__name__}: {err}); the file is corrupt. Delete it (or its archive) "
            "and load again to re-extract or re-download it."
        ) from err
    if not isinstance(obj, dict):
        raise CorruptDatasetError(f"{path} does not hold a CIFAR batch (a dict); got {type(obj).__name__}")
    return obj


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    if "data" not in d or label_key not in d:
        raise CorruptDatasetError(f"{path} lacks the keys 'data' and {label_key!r} of a CIFAR batch (has {sorted(d)})")
    data = np.asarray(d["data"])
    labels = np.asarray(d[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise CorruptDatasetError(f"{path}: 'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise CorruptDatasetError(f"{path}: {len(labels)} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise CorruptDatasetError(f"{path}: labels outside 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def _read_split(folder: Path, files: tuple[str, ...], layout: CifarLayout, expected: Optional[int]) -> Split:
    parts = [_read_batch(folder / f, layout.label_key, layout.num_classes) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if expected is not None and len(labels) != expected:
        raise CorruptDatasetError(
            f"{layout.name}: {folder}/{{{','.join(files)}}} hold {len(labels)} images, expected {expected}. "
            "The copy is incomplete; replace it."
        )
    return Split(torch.from_numpy(images), torch.from_numpy(labels))


def read_cifar(layout: CifarLayout, folder: Path, *, check_counts: bool = True) -> ImageDataset:
    """Read and structurally check an extracted CIFAR folder."""
    train = _read_split(folder, layout.train_files, layout, 50_000 if check_counts else None)
    test = _read_split(folder, layout.test_files, layout, 10_000 if check_counts else None)
    names = _unpickle(folder / layout.meta_file).get(layout.class_names_key, [])
    return ImageDataset(
        layout.name, train, test, layout.num_classes, layout.mean, layout.std,
        classes=tuple(str(n) for n in names), source=str(folder),
    )
