"""The 15 CIFAR-10-C corruptions as batched torch operations (CPU or CUDA).

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019; parameters and reference behaviour in docs/METHODS.md
§9.1. ``corrupt(images, name, severity, seed=..., sample_ids=...)`` returns float images;
randomness is per sample and independent of how a dataset is split into batches.

Modules: ``noise`` (gaussian, shot, impulse), ``blur`` (defocus, glass, motion, zoom),
``weather`` (snow, frost, fog), ``digital`` (brightness, contrast, elastic, pixelate, JPEG).
"""

from benchmarks.corruptions._registry import CORRUPTIONS, REGISTRY, SEVERITIES
from benchmarks.corruptions.api import corrupt, corrupt_uint8, to_uint8

__all__ = ["CORRUPTIONS", "REGISTRY", "SEVERITIES", "corrupt", "corrupt_uint8", "to_uint8"]
