"""Data sets as in-memory uint8 tensors, and seeded micro-batch streams."""

from .dataset import ImageDataset, Split
from .digits import load_digits
from .stream import MicroBatchStream

__all__ = ["ImageDataset", "Split", "load_digits", "MicroBatchStream"]
