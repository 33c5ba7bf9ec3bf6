"""Data sources. Each returns :class:`ImageArrays` (uint8 NHWC images and int64 labels)."""

from benchmarks.data.base import ImageArrays
from benchmarks.data.digits import load_digits

__all__ = ["ImageArrays", "load_digits"]
