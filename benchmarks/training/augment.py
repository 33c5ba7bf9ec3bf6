"""Batched data augmentation for 32x32 training images (no per-sample Python loop)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


PADDING_MODES = ("reflect", "zeros")


def random_crop_flip(
    images: torch.Tensor,
    padding: int,
    generator: torch.Generator | None = None,
    *,
    flip: bool = True,
    padding_mode: str = "reflect",
) -> torch.Tensor:
    """Random ``padding``-pixel translation (padded crop) and, if ``flip``, horizontal flip.

    The standard CIFAR augmentation (He et al. 2016, §4.2; reflect padding, flips), done for a
    whole batch with one gather: every image gets its own crop offset and flip. Digits use
    ``flip=False, padding_mode="zeros"`` (a mirrored digit is another symbol, and the border
    of a digit image is background). ``images``: ``(N, C, H, W)`` of any dtype; the result has
    the same shape, dtype and device. Random numbers come from ``generator`` (on the CPU) so
    a seeded run is reproducible on any device; without flips none are drawn for them.
    """
    if images.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) images, got shape {tuple(images.shape)}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    n, _, height, width = images.shape
    device = images.device
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator).to(device)
    flips = (torch.rand(n, generator=generator) < 0.5).to(device) if flip else torch.zeros(n, dtype=torch.bool, device=device)
    # padding needs a float tensor; uint8 round-trips exactly
    mode = "reflect" if padding_mode == "reflect" else "constant"
    padded = F.pad(images.float(), (padding,) * 4, mode=mode) if padding else images.float()
    rows = offsets[:, :1] + torch.arange(height, device=device)  # (N, H)
    columns = torch.arange(width, device=device).expand(n, width)
    columns = torch.where(flips[:, None], columns.flip(1), columns) + offsets[:, 1:]  # (N, W)
    batch = torch.arange(n, device=device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], columns[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).to(images.dtype).contiguous(memory_format=torch.channels_last)
