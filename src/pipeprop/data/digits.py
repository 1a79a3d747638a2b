"""The embedded default data set: scikit-learn's 8x8 handwritten digits (ships with the wheel, no download)."""

from __future__ import annotations

import torch

from .dataset import ImageDataset, Split

__all__ = ["load_digits"]


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> ImageDataset:
    """1,797 digits as uint8 ``[N, 1, 8, 8]`` (pixel values 0..16 rescaled to 0..255), fixed shuffled split."""
    try:
        from sklearn.datasets import load_digits as _sk_load
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("the embedded digits data needs scikit-learn: pip install 'pipeprop[cli]'") from err
    bunch = _sk_load()
    images = torch.from_numpy((bunch.images * (255.0 / 16.0)).round()).to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(bunch.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    images, labels = images[order], labels[order]
    n_test = int(round(test_fraction * len(labels)))
    train = Split(images[n_test:], labels[n_test:])
    test = Split(images[:n_test], labels[:n_test])
    mean = train.images.float().mean().item() / 255.0
    std = train.images.float().std().item() / 255.0
    return ImageDataset("digits", train, test, 10, (mean,), (std,))
