"""The built-in default dataset: scikit-learn's bundled 8x8 digits, upsampled to RGB.

It needs no download, so the demo, the tests and CI run anywhere. The 1,797 images are split
once with a fixed permutation into a training and a test split.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.data.base import ImageArrays

DIGIT_CLASSES = tuple(str(d) for d in range(10))
_SPLIT_SEED = 0
_TEST_FRACTION = 0.4


@lru_cache(maxsize=4)
def load_digits(split: str = "test", size: int = 32) -> ImageArrays:
    """Digits as ``ImageArrays`` of ``size x size`` RGB images (bilinear upsampling).

    Args:
        split: ``"train"`` (60%) or ``"test"`` (40%), fixed split.
        size: output side length; 32 matches CIFAR so every CIFAR corruption applies.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    gray = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]
    upsampled = F.interpolate(gray, size=(size, size), mode="bilinear", align_corners=False)
    images = (upsampled.clamp(0, 1) * 255.0).round().to(torch.uint8)
    images = images.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().numpy()
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(labels))
    n_test = int(round(len(labels) * _TEST_FRACTION))
    index = order[:n_test] if split == "test" else order[n_test:]
    index = np.sort(index)
    return ImageArrays(images[index], labels[index], DIGIT_CLASSES)
