"""``load_dataset(name)``: find (or download) a data set and load it into memory as uint8 tensors (images)
or character ids (text, :class:`~pipeprop.data.text.TextDataset`); :func:`dataset_task` says which task a
data set is for.

Lookup order: ``data_dir``, then ``$PIPEPROP_DATA``, then the cache (``cache_dir``/``$PIPEPROP_CACHE``/
``~/.cache/pipeprop``), then a download into the cache (official URL, MD5 check, progress bar).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from .cifar import CIFAR10, CIFAR100, CifarLayout, find_cifar, read_cifar
from .dataset import ImageDataset
from .digits import load_digits
from .files import CorruptDatasetError, DatasetNotFoundError, cache_dir as default_cache_dir, search_roots
from .files import download as download_file
from .folder import read_image_folder
from .text import TextDataset, load_tiny_shakespeare
from .mnist import FASHION_MNIST, IDX_FILES, MNIST, NPZ_10K, IdxLayout, find_idx_files, read_idx_dataset, read_mnist_10k

__all__ = ["load_dataset", "available_datasets", "dataset_task", "canonical_dataset", "CLASSIFICATION",
           "LANGUAGE_MODELLING"]

PathLike = Optional[os.PathLike | str]

_DATASETS = ("digits", "mnist", "mnist-10k", "fashion-mnist", "cifar10", "cifar100", "imagenet-folder", "tinyshakespeare")
#: the data sets for character-level language modelling (the others are for image classification)
_TEXT_DATASETS = ("tinyshakespeare",)
CLASSIFICATION, LANGUAGE_MODELLING = "classification", "language-modelling"
_ALIASES = {"shakespeare": "tinyshakespeare", "tiny-shakespeare": "tinyshakespeare","cifar-10": "cifar10", "cifar-100": "cifar100", "fashion": "fashion-mnist", "fmnist": "fashion-mnist",
            "imagenet": "imagenet-folder", "image-folder": "imagenet-folder", "mnist10k": "mnist-10k"}


def available_datasets() -> list[str]:
    return list(_DATASETS)


def canonical_dataset(name: str) -> str:
    """``"CIFAR-10"`` -> ``"cifar10"``, ``"shakespeare"`` -> ``"tinyshakespeare"`` (unknown names unchanged)."""
    key = str(name).strip().lower().replace("_", "-")
    return _ALIASES.get(key, key)


def dataset_task(name: str) -> str:
    """``"language-modelling"`` for the text data sets, ``"classification"`` for the image data sets."""
    return LANGUAGE_MODELLING if canonical_dataset(name) in _TEXT_DATASETS else CLASSIFICATION


def _places(roots: list[tuple[Path, bool]]) -> str:
    return ", ".join(str(r) for r, _ in roots)


def _load_cifar(layout: CifarLayout, roots: list[tuple[Path, bool]], cache: Path, allow_download: bool) -> ImageDataset:
    for root, explicit in roots:
        folder = find_cifar(layout, root, cache, explicit)
        if folder is not None:
            return read_cifar(layout, folder)
    if not allow_download:
        raise DatasetNotFoundError(
            f"{layout.name} not found: looked for {layout.folder}/ or {layout.archive.name} in {_places(roots)}. "
            f"Pass data_dir= (--data-dir) pointing at a folder holding one of them, or allow downloading."
        )
    try:
        download_file(layout.archive, cache)
    except DatasetNotFoundError as err:
        raise DatasetNotFoundError(
            f"{layout.name} is in none of {_places(roots)} and {err}. Download {layout.archive.urls[0]} by hand and "
            "pass its folder as data_dir= (--data-dir) or $PIPEPROP_DATA."
        ) from err
    folder = find_cifar(layout, cache, cache, False)
    assert folder is not None
    return read_cifar(layout, folder)


def _load_idx(layout: IdxLayout, roots: list[tuple[Path, bool]], cache: Path, allow_download: bool) -> ImageDataset:
    partial: list[str] = []
    for root, explicit in roots:
        for sub in layout.subdirs + (("",) if explicit else ()):
            folder = root / sub
            if not folder.is_dir():
                continue
            found, absent = find_idx_files(folder)
            if not absent:
                return read_idx_dataset(layout, found)
            if found:
                partial.append(f"{folder} lacks {', '.join(a + '.gz' for a in absent)}")
    hint = (
        " MNIST's train-images-idx3-ubyte.gz may be unavailable offline: load_dataset('mnist-10k') uses "
        f"{NPZ_10K} (the first 10,000 training digits) with the official test set instead."
        if layout is MNIST else ""
    )
    what = "; ".join(partial) if partial else f"no {layout.name} idx files in {_places(roots)} (subfolders {', '.join(layout.subdirs)})"
    if not allow_download:
        raise DatasetNotFoundError(f"{layout.name} not found: {what}. Put the 4 idx files there or allow downloading.{hint}")
    target = cache / layout.name
    try:
        for remote in layout.remotes:
            if not (target / remote.name).is_file():
                download_file(remote, target)
    except DatasetNotFoundError as err:
        raise DatasetNotFoundError(
            f"{layout.name} not found ({what}) and {err}. Put the 4 idx files in a folder "
            f"'{layout.subdirs[0]}/' under data_dir= (--data-dir) or $PIPEPROP_DATA.{hint}"
        ) from err
    found, absent = find_idx_files(target)
    if absent:
        raise CorruptDatasetError(f"{target} still lacks {', '.join(absent)} after downloading")
    return read_idx_dataset(layout, found)


def _load_mnist_10k(roots: list[tuple[Path, bool]]) -> ImageDataset:
    looked: list[str] = []
    for root, explicit in roots:
        for sub in MNIST.subdirs + (("",) if explicit else ()):
            folder = root / sub
            if not (folder / NPZ_10K).is_file():
                continue
            found, _ = find_idx_files(folder)
            test = {s: found[s] for s in IDX_FILES[2:] if s in found}
            if len(test) == 2:
                return read_mnist_10k(folder / NPZ_10K, test)
            looked.append(f"{folder} has {NPZ_10K} but lacks the t10k idx files")
    detail = "; ".join(looked) or f"no {NPZ_10K} in {_places(roots)} (subfolders {', '.join(MNIST.subdirs)})"
    raise DatasetNotFoundError(
        f"mnist-10k not found: {detail}. It needs {NPZ_10K} and t10k-{{images-idx3,labels-idx1}}-ubyte.gz in one "
        "folder (shared/data/mnist has them); pass its parent as data_dir= or use load_dataset('mnist')."
    )


def load_dataset(
    name: str,
    *,
    data_dir: PathLike = None,
    download: bool = True,
    cache_dir: PathLike = None,
    **options: Any,
) -> ImageDataset | TextDataset:
    """Load data set ``name`` into memory.

    Names: ``"digits"`` (embedded, 8x8), ``"mnist"``, ``"mnist-10k"``, ``"fashion-mnist"``, ``"cifar10"``,
    ``"cifar100"``, ``"imagenet-folder"`` (needs ``data_dir`` with ``train/`` and ``val/``; options
    ``image_size=64``, ``max_per_class=None``). ``options`` for ``"digits"``: ``test_fraction``, ``seed``.

    Raises:
        DatasetNotFoundError: the files are nowhere and cannot be downloaded (the message says where it looked).
        CorruptDatasetError: a file exists but is unreadable or fails the structural check.
    """
    key = canonical_dataset(name)
    if key not in _DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of: {', '.join(_DATASETS)}")
    if options and key not in ("digits", "imagenet-folder", "tinyshakespeare"):
        raise TypeError(f"data set {key!r} takes no options, got {sorted(options)}")
    if key == "digits":
        return load_digits(**options)
    if key == "imagenet-folder":
        if data_dir is None:
            raise ValueError("imagenet-folder needs data_dir= (--data-dir): a folder with train/<class>/ and val/<class>/")
        return read_image_folder(Path(data_dir).expanduser(), **options)
    if key == "tinyshakespeare":
        return load_tiny_shakespeare(data_dir, cache_dir=cache_dir, **options)
    cache = default_cache_dir(cache_dir)
    roots = search_roots(data_dir, cache)
    if key == "cifar10":
        return _load_cifar(CIFAR10, roots, cache, download)
    if key == "cifar100":
        return _load_cifar(CIFAR100, roots, cache, download)
    if key == "mnist":
        return _load_idx(MNIST, roots, cache, download)
    if key == "fashion-mnist":
        return _load_idx(FASHION_MNIST, roots, cache, download)
    return _load_mnist_10k(roots)
