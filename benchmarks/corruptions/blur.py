"""Blur corruptions: defocus_blur, glass_blur, motion_blur, zoom_blur.

CIFAR-10-C parameters from Hendrycks & Dietterich (ICLR 2019), docs/METHODS.md §9.1
items 4-7.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from benchmarks.corruptions import _filters
from benchmarks.corruptions._random import SampleRandom
from benchmarks.corruptions._registry import register

DEFOCUS = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))  # (radius, alias sigma)
GLASS = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))  # (sigma, delta, iters)
MOTION = ((6, 1.0), (6, 1.5), (6, 2.0), (8, 2.0), (9, 2.5))  # (radius, sigma)
ZOOM_END = (1.06, 1.11, 1.16, 1.21, 1.26)  # zoom factors np.arange(1, end, 0.01)


@lru_cache(maxsize=16)
def defocus_kernel(radius: float, alias_sigma: float) -> np.ndarray:
    """The reference's anti-aliased disk, in float32 as it is built there.

    A 17x17 (or ``2r+1`` for r > 8) float32 indicator of ``x^2 + y^2 <= r^2``, divided by
    its sum in float32, then smoothed like OpenCV's float32 ``GaussianBlur`` with a 3x3 (5x5
    for r > 8) kernel of standard deviation ``alias_sigma`` and reflect-101 border: OpenCV's
    float32 Gaussian taps (``exp`` in float64, rounded, renormalised, rounded again) applied
    separably, rows first, each output as ``centre * k0 + (left + right) * k1`` in float32.
    The float32 rounding matters: the kernel sums to slightly more than 1 (e.g. 1 + 1.8e-8
    at severity 4), which decides the reference's truncation to 8 bits in flat regions.
    Checked bit for bit against OpenCV (tests). Returned as float64 (exact copies).
    """
    half = 8 if radius <= 8 else int(radius)
    grid = np.arange(-half, half + 1)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float32)
    disk /= np.sum(disk)
    ksize = 3 if radius <= 8 else 5
    offsets = np.arange(ksize, dtype=np.float64) - (ksize - 1) / 2
    raw = np.exp((-0.5 / (alias_sigma * alias_sigma)) * offsets * offsets).astype(np.float32)
    scale = 1.0 / sum(float(t) for t in raw)
    taps = (raw.astype(np.float64) * scale).astype(np.float32)
    centre = ksize // 2
    index = _filters.extend_index(disk.shape[0], centre, centre, "reflect101")
    n = disk.shape[0]

    def smooth(a: np.ndarray, axis: int) -> np.ndarray:
        padded = np.take(a, index, axis=axis)
        window = lambda k: np.take(padded, np.arange(k, k + n), axis=axis)  # noqa: E731
        out = window(centre) * taps[centre]
        for j in range(1, centre + 1):
            out = out + (window(centre - j) + window(centre + j)) * taps[centre + j]
        return out.astype(np.float32)

    return smooth(smooth(disk, 1), 0).astype(np.float64)


@register("defocus_blur")
def defocus_blur(x: torch.Tensor, severity: int, rng: SampleRandom) -> torch.Tensor:
    """Correlation with the anti-aliased disk, reflect-101 border (§9.1 item 4).

    Summed tap by tap like OpenCV's direct ``filter2D`` (see
    :func:`~benchmarks.corruptions._filters.correlate_taps`), in the dtype of ``x``.
    """
    kernel = defocus_kernel(*DEFOCUS[severity - 1])
    return _filters.correlate_taps(x, kernel, "reflect101").clamp_(0.0, 1.0)


@register("glass_blur")
def glass_blur(x: torch.Tensor, severity: int, rng: SampleRandom) -> torch.Tensor:
    """Gaussian blur, local pixel copying, Gaussian blur again (§9.1 item 5).

    The first blur is truncated to 8-bit levels as in the reference. On flat regions the
    blurred value sits within float64 rounding noise of an 8-bit level, so the truncation
    depends on the exact arithmetic: both blurs are therefore computed in float64 with
    SciPy's summation order (see :func:`~benchmarks.corruptions._filters.scipy_gaussian`)
    on the 8-bit input levels,
    which reproduces the reference's truncation for 8-bit images.

    The reference then scans the pixels in place, from the bottom-right to the top-left
    (rows and columns ``H - delta`` down to ``delta + 1``), copying into pixel ``(h, w)``
    the value of ``(h + dy, w + dx)`` with ``dx, dy`` drawn from ``{-delta, ..., delta - 1}``
    (its "swap" of NumPy views is a copy, see the spec). Here all copies of one iteration
    happen at once from the image as it was before the iteration. For ``delta = 1`` (every
    CIFAR severity) that is exactly the sequential result, not an approximation: the source
    is up and/or left of the destination, which that scan order has not written yet when it
    reads it. Larger ``delta`` (ImageNet-C parameters) would make the parallel copy an
    approximation and is rejected.
    """
    sigma, delta, iterations = GLASS[severity - 1]
    if delta != 1:
        raise ValueError("the vectorised glass blur is exact only for delta == 1")
    levels = torch.floor(x.clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.float64)
    blurred = _filters.scipy_gaussian(levels / 255.0, sigma, mode="edge")
    y = torch.floor(blurred * 255.0)  # np.uint8 truncation of float64 values in [0, 255]
    for iteration in range(iterations):
        y = _copy_neighbours(y, rng, stream=iteration)
    return _filters.scipy_gaussian(y / 255.0, sigma, mode="edge").to(x.dtype).clamp_(0.0, 1.0)


def _copy_neighbours(x: torch.Tensor, rng: SampleRandom, stream: int) -> torch.Tensor:
    """One glass-blur iteration with delta = 1: pixels (2.., 2..) take an up/left neighbour."""
    b, c, h, w = x.shape
    nh, nw = h - 2, w - 2
    shift = rng.randint(-1, 1, (2, nh, nw), stream)  # dy, dx in {-1, 0}
    rows = torch.arange(h, device=x.device).view(1, h, 1).expand(b, h, w).clone()
    cols = torch.arange(w, device=x.device).view(1, 1, w).expand(b, h, w).clone()
    rows[:, 2:, 2:] += shift[:, 0]
    cols[:, 2:, 2:] += shift[:, 1]
    index = (rows * w + cols).view(b, 1, h * w).expand(b, c, h * w)
    return torch.gather(x.reshape(b, c, h * w), 2, index).view(b, c, h, w)


@register("motion_blur")
def motion_blur(x: torch.Tensor, severity: int, rng: SampleRandom) -> torch.Tensor:
    """ImageMagick-style motion blur along a random angle in [-45, 45] degrees (§9.1 item 6).

    See :func:`benchmarks.corruptions._filters.motion_blur` for the kernel and how it differs
    from ImageMagick. The result is rounded to 8-bit levels, as the reference's PNG round
    trip through ImageMagick does.
    """
    radius, sigma = MOTION[severity - 1]
    angle = rng.uniform((), stream=0) * 90.0 - 45.0
    return _filters.quantize(_filters.motion_blur(x, radius, sigma, angle), x.dtype)


def zoom_factors(severity: int) -> np.ndarray:
    """``np.arange(1, end, 0.01)``: 7, 12, 16, 21 and 26 factors for severities 1-5."""
    return np.arange(1.0, ZOOM_END[severity - 1], 0.01)


_ZOOM_CPU_COLUMNS = 24  # image channels per pass on the CPU: the float64 terms stay in cache


@register("zoom_blur")
def zoom_blur(x: torch.Tensor, severity: int, rng: SampleRandom) -> torch.Tensor:
    """Mean of the image and its centre zooms by every factor (§9.1 item 7).

    In float32, as the reference: every zoom is SciPy's float64 order-1 interpolation of the
    float32 image (see :func:`~benchmarks.corruptions._filters.clipped_zoom`) rounded to
    float32, the zooms are accumulated one by one in float32 in factor order, then
    ``(x + sum) / (n + 1)``. Every step is element-wise, so a sample's result does not
    depend on the batch (a single matrix product would: BLAS blocks its sums by the batch
    size). The pixels are laid out as rows of ``(H*W, B*C)`` so that each neighbour gather
    copies whole rows; on the CPU a few image channels at a time.
    """
    b, c, h, w = x.shape
    factors = zoom_factors(severity)
    gathers = [_filters.clipped_zoom_gather(h, w, float(f), x.device) for f in factors]
    x32 = x.to(torch.float32).reshape(b * c, h * w).T
    out = torch.empty_like(x32)
    step = _ZOOM_CPU_COLUMNS if x.device.type == "cpu" else b * c
    for start in range(0, b * c, step):
        columns = slice(start, start + step)
        pixels = x32[:, columns].to(torch.float64).contiguous()
        acc = torch.zeros_like(x32[:, columns])
        for index, weight_r, weight_c in gathers:
            terms = pixels.index_select(0, index.view(-1)).view(4, h * w, -1) * weight_r[..., None] * weight_c[..., None]
            acc = acc + (((terms[0] + terms[1]) + terms[2]) + terms[3]).to(torch.float32)
        out[:, columns] = (x32[:, columns] + acc) / float(len(factors) + 1)
    return out.T.reshape(b, c, h, w).clamp_(0.0, 1.0)
