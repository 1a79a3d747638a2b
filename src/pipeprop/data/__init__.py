"""Data sets as in-memory uint8 tensors (images) or character ids (text), seeded augmentation, and seeded micro-batch streams."""

from .augmentation import RandomCropFlip, augment
from .dataset import ImageDataset, Split
from .digits import load_digits
from .files import CorruptDatasetError, DatasetNotFoundError
from .registry import available_datasets, load_dataset
from .stream import MicroBatchStream
from .text import SequenceStream, TextDataset, load_tiny_shakespeare

__all__ = [
    "ImageDataset",
    "Split",
    "load_digits",
    "load_dataset",
    "available_datasets",
    "MicroBatchStream",
    "TextDataset",
    "SequenceStream",
    "load_tiny_shakespeare",
    "augment",
    "RandomCropFlip",
    "DatasetNotFoundError",
    "CorruptDatasetError",
]
