"""An ImageNet-style image folder: ``root/train/<class>/<image>`` and ``root/val/<class>/<image>``.

Images are decoded with Pillow, resized (shorter side) and center-cropped to ``image_size``, and kept
in memory as uint8 tensors, so choose ``image_size`` and ``max_per_class`` to fit memory (full ImageNet at
224x224 needs about 190 GB).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .dataset import ImageDataset, Split
from .files import CorruptDatasetError, DatasetNotFoundError

__all__ = ["read_image_folder", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".webp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _load_image(path: Path, size: int) -> np.ndarray:
    from PIL import Image  # Pillow comes with the cli extra (matplotlib)

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            w, h = img.size
            scale = size / min(w, h)
            img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
            w, h = img.size
            left, top = (w - size) // 2, (h - size) // 2
            img = img.crop((left, top, left + size, top + size))
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    except OSError as err:
        raise CorruptDatasetError(f"cannot decode image {path} ({err}); delete or replace the file") from err


def _read_split(folder: Path, classes: Sequence[str], size: int, max_per_class: Optional[int], desc: str) -> Split:
    files: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):
        d = folder / cls
        if not d.is_dir():
            continue
        imgs = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        files += [(p, label) for p in imgs[:max_per_class]]
    if not files:
        raise DatasetNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}/<class>/")
    try:
        from tqdm.auto import tqdm

        it = tqdm(files, desc=desc, unit="img")
    except ImportError:  # pragma: no cover
        it = files
    images = np.stack([_load_image(p, size) for p, _ in it])
    labels = np.array([lab for _, lab in files], dtype=np.int64)
    return Split(torch.from_numpy(images), torch.from_numpy(labels))


def read_image_folder(
    root: Path, *, image_size: int = 64, max_per_class: Optional[int] = None, val_dir: str = "val"
) -> ImageDataset:
    """Load ``root/train`` and ``root/<val_dir>`` (classes: the sorted subfolders of ``train``)."""
    train_dir, test_dir = root / "train", root / val_dir
    for d in (train_dir, test_dir):
        if not d.is_dir():
            raise DatasetNotFoundError(
                f"image folder {root} needs subfolders train/ and {val_dir}/ with one folder per class; {d} is missing"
            )
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise DatasetNotFoundError(f"{train_dir} has no class subfolders")
    unknown = sorted({p.name for p in test_dir.iterdir() if p.is_dir()} - set(classes))
    if unknown:
        raise CorruptDatasetError(f"{test_dir} has classes that train/ lacks: {', '.join(unknown[:5])}")
    train = _read_split(train_dir, classes, image_size, max_per_class, "train images")
    test = _read_split(test_dir, classes, image_size, max_per_class, f"{val_dir} images")
    return ImageDataset(
        "imagenet-folder", train, test, len(classes), IMAGENET_MEAN, IMAGENET_STD, tuple(classes), str(root)
    )
