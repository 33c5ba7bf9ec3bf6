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
            parameters of docs/METHODS.md §9.1 are meant for).
        name: one of :data:`CORRUPTIONS`.
        severity: 1..5.
        seed: global seed; with ``sample_ids`` it fixes every random number.
        sample_ids: ``(B,)`` integer ids of the images (default ``arange(B)``). The random
            numbers of a sample depend only on ``(seed, name, severity, sample_id)``, so any
            split of a dataset into batches gives the same images.

    Returns:
        float32 ``(B, 3, H, W)`` in [0, 1] on the device of ``images``. Use
        :func:`corrupt_uint8` for the official generator's truncated 8-bit values. A
        sample's output depends only on its image and ``(seed, name, severity,
        sample_id)``, bit for bit, whatever else is in the batch.

    Raises:
        ValueError: unknown ``name`` or ``severity``, or badly shaped inputs.
    """
    x = _check_inputs(images, name, severity).detach().to(torch.float32)
    sample_ids = _sample_ids(sample_ids, x)
    if x.shape[0] == 0:
        return x.clone()
    rng = SampleRandom(int(seed), CORRUPTIONS.index(name), int(severity), sample_ids)
    with torch.no_grad():
        out = REGISTRY[name](x.contiguous(), int(severity), rng)
    return out.to(torch.float32).clamp_(0.0, 1.0).contiguous()


def corrupt_uint8(
    images: torch.Tensor,
    name: str,
    severity: int,
    *,
    seed: int = 0,
    sample_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The official generator's 8-bit output: ``np.uint8(clip(corruption(x), 0, 1) * 255)``.

    The reference truncates (not rounds) its float results, most of them float64 (zoom blur
    and the elastic transform are float32 there). Many of those results sit within float
    rounding of an 8-bit level (a flat region under a kernel that sums to 1 + 2e-8, or
    ``V + 0.2`` in brightness), so which level they truncate to depends on the last bits of
    the arithmetic: truncating :func:`corrupt`'s float32 output would land one level off
    for several percent of the values of some corruptions. This function therefore runs
    the corruption on the 8-bit levels of ``images`` as float64 ``level / 255`` (the
    reference's ``np.array(img) / 255.``), keeps each corruption's own precision (float32
    where the reference is float32), and truncates in that precision.

    Arguments as :func:`corrupt`; ``images`` are read as 8-bit images (rounded to the
    nearest level, as decoding them from 8-bit files gives). Returns uint8 ``(B, 3, H, W)``.
    Needs float64 on the device (not available on Apple MPS).
    """
    x = _check_inputs(images, name, severity)
    ids = _sample_ids(sample_ids, x)
    levels = torch.floor(x.detach().to(torch.float64).clamp(0.0, 1.0) * 255.0 + 0.5)
    if x.shape[0] == 0:
        return levels.to(torch.uint8)
    rng = SampleRandom(int(seed), CORRUPTIONS.index(name), int(severity), ids)
    with torch.no_grad():
        out = REGISTRY[name]((levels / 255.0).contiguous(), int(severity), rng)
    return to_uint8(out)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``np.uint8(np.clip(x, 0, 1) * 255)``: clip, scale and truncate, in ``images``' dtype.

    Pure truncation, like the reference's cast. To reproduce the reference's 8-bit values
    from a corruption use :func:`corrupt_uint8` (truncating float32 values can land one level
    above or below where the reference's float64 values truncate). Same layout and device.
    """
    x = images.detach()
    if not x.is_floating_point():
        x = x.to(torch.float32)
    return torch.floor(x.clamp(0.0, 1.0) * 255.0).to(torch.uint8)


def _check_inputs(images: torch.Tensor, name: str, severity: int) -> torch.Tensor:
    if name not in REGISTRY:
        raise ValueError(f"unknown corruption {name!r}; valid names: {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 3, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got {images.dtype}")
    return images


def _sample_ids(sample_ids: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    batch = x.shape[0]
    if sample_ids is None:
        return torch.arange(batch, device=x.device)
    ids = torch.as_tensor(sample_ids)
    if ids.shape != (batch,) or ids.is_floating_point() or ids.is_complex():
        raise ValueError(
            f"sample_ids must be an integer tensor of shape ({batch},), got {ids.dtype} {tuple(ids.shape)}"
        )
    return ids.to(device=x.device, dtype=torch.int64)
