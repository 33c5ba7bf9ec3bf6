"""Name -> function registry of the corruptions (filled by the corruption modules on import)."""

from __future__ import annotations

from typing import Callable

import torch

from benchmarks.corruptions._random import SampleRandom

# The 15 standard corruptions of Hendrycks & Dietterich (ICLR 2019), in the standard order
# (docs/METHODS.md §9.1); the order also seeds each corruption's random numbers.
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

CorruptionFn = Callable[[torch.Tensor, int, SampleRandom], torch.Tensor]
"""``fn(images, severity, rng) -> images``: float32 (B, 3, H, W) in [0, 1] in and out."""

REGISTRY: dict[str, CorruptionFn] = {}


def register(name: str) -> Callable[[CorruptionFn], CorruptionFn]:
    """Decorator adding a corruption function to :data:`REGISTRY` under ``name``."""
    if name not in CORRUPTIONS:
        raise ValueError(f"{name!r} is not one of the standard corruptions {CORRUPTIONS}")

    def decorate(fn: CorruptionFn) -> CorruptionFn:
        REGISTRY[name] = fn
        return fn

    return decorate
