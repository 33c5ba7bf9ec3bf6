"""``corrupt``: the public entry point of the corruption package."""

from __future__ import annotations

import torch

# Importing the corruption modules registers their functions.
from benchmarks.corruptions import blur, digital, noise, weather  # noqa: F401
from benchmarks.corruptions._random import SampleRandom
from benchmarks.corruptions._registry import CORRUPTIONS, REGISTRY, SEVERITIES


def corrupt(
    images: torch.Tensor,
    name: str,
    severity: int,
    *,
    seed: int = 0,
    sample_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply a CIFAR-10-C corruption (Hendrycks & Dietterich, ICLR 2019) to a batch.

    Args:
        images: float ``(B, 3, H, W)`` in [0, 1], on any device (32x32 is what the CIFAR
            parameters of spec ``ALGORITHMS.md`` §9.1 are meant for).
        name: one of :data:`CORRUPTIONS`.
        severity: 1..5.
        seed: global seed; with ``sample_ids`` it fixes every random number.
        sample_ids: ``(B,)`` integer ids of the images (default ``arange(B)``). The random
            numbers of a sample depend only on ``(seed, name, severity, sample_id)``, so any
            split of a dataset into batches gives the same images.

    Returns:
        float32 ``(B, 3, H, W)`` in [0, 1] on the device of ``images``. Use
        :func:`to_uint8` for the official generator's truncating 8-bit output.

    Raises:
        ValueError: unknown ``name`` or ``severity``, or badly shaped inputs.
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown corruption {name!r}; valid names: {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 3, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got {images.dtype}")
    batch = images.shape[0]
    if sample_ids is None:
        sample_ids = torch.arange(batch, device=images.device)
    else:
        sample_ids = torch.as_tensor(sample_ids)
        if sample_ids.shape != (batch,) or sample_ids.is_floating_point() or sample_ids.is_complex():
            raise ValueError(
                f"sample_ids must be an integer tensor of shape ({batch},), "
                f"got {sample_ids.dtype} {tuple(sample_ids.shape)}"
            )
        sample_ids = sample_ids.to(device=images.device, dtype=torch.int64)
    x = images.detach().to(torch.float32)
    if batch == 0:
        return x.clone()
    rng = SampleRandom(int(seed), CORRUPTIONS.index(name), int(severity), sample_ids)
    with torch.no_grad():
        out = REGISTRY[name](x.contiguous(), int(severity), rng)
    return out.to(torch.float32).clamp_(0.0, 1.0).contiguous()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """The official generator's output quantisation: clip to [0, 1], ``x * 255``, truncate.

    The reference casts with ``np.uint8`` (truncation, not rounding) from float64. In
    float32, values that are exact 8-bit levels in the reference (``k / 255``) can come out
    a hair below ``k``; a tolerance of 1e-3 (in 0..255 units) is added before truncating so
    they are not pushed down a level. Same layout and device as ``images``.
    """
    scaled = images.detach().to(torch.float32).clamp(0.0, 1.0) * 255.0
    return torch.floor(scaled + 1e-3).clamp_(0.0, 255.0).to(torch.uint8)
