"""Data sets as in-memory uint8 tensors, seeded augmentation, and seeded micro-batch streams."""

from .augmentation import RandomCropFlip, augment
from .dataset import ImageDataset, Split
from .digits import load_digits
from .files import CorruptDatasetError, DatasetNotFoundError
from .registry import available_datasets, load_dataset
from .stream import MicroBatchStream

__all__ = [
    "ImageDataset",
    "Split",
    "load_digits",
    "load_dataset",
    "available_datasets",
    "MicroBatchStream",
    "augment",
    "RandomCropFlip",
    "DatasetNotFoundError",
    "CorruptDatasetError",
]
