"""The in-memory image container that every data source returns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ImageArrays:
    """Decoded images with labels, in the layout of the official CIFAR-10-C files.

    Attributes:
        images: ``uint8`` array of shape ``(N, H, W, 3)``.
        labels: ``int64`` array of shape ``(N,)``.
        classes: class names; ``labels`` index into it.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(
                f"images must be uint8 of shape (N, H, W, 3), got {self.images.dtype} {self.images.shape}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must have shape ({self.images.shape[0]},), got {self.labels.shape}"
            )
        object.__setattr__(self, "labels", self.labels.astype(np.int64, copy=False))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, index: np.ndarray) -> "ImageArrays":
        return ImageArrays(self.images[index], self.labels[index], self.classes)

    def to_tensor(self, index: np.ndarray | slice | None = None) -> torch.Tensor:
        """Float32 NCHW tensor in [0, 1] of the selected images (all by default)."""
        images = self.images if index is None else self.images[index]
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
