"""Blur corruptions: defocus_blur, glass_blur, motion_blur, zoom_blur.

CIFAR-10-C parameters from Hendrycks & Dietterich (ICLR 2019), spec ``ALGORITHMS.md`` §9.1
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
    """The anti-aliased disk of the reference, cropped to its non-zero support.

    A 17x17 (or ``2r+1`` for r > 8) indicator of ``x^2 + y^2 <= r^2``, normalised to sum 1,
    then smoothed like OpenCV ``GaussianBlur`` with a 3x3 (5x5 for r > 8) kernel of standard
    deviation ``alias_sigma`` and reflect-101 border. Cropping the all-zero margin does not
    change the filtered image.
    """
    half = 8 if radius <= 8 else int(radius)
    grid = np.arange(-half, half + 1, dtype=np.float64)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    ksize = 3 if radius <= 8 else 5
    offsets = np.arange(ksize, dtype=np.float64) - (ksize - 1) / 2
    taps = np.exp(-(offsets**2) / (2.0 * alias_sigma**2))
    taps /= taps.sum()
    index = _filters.extend_index(disk.shape[0], ksize // 2, ksize // 2, "reflect101")
    padded = disk[index][:, index]
    blurred = sum(taps[i] * padded[i : i + disk.shape[0]] for i in range(ksize))
    blurred = sum(taps[i] * blurred[:, i : i + disk.shape[1]] for i in range(ksize))
    nonzero = np.nonzero(np.abs(blurred).max(axis=0) > 0)[0]
    r = int(max(abs(nonzero[0] - half), abs(nonzero[-1] - half)))
    return blurred[half - r : half + r + 1, half - r : half + r + 1]


@register("defocus_blur")
def defocus_blur(x: torch.Tensor, severity: int, rng: SampleRandom) -> torch.Tensor:
    """Convolution with an anti-aliased disk, reflect-101 border (§9.1 item 4)."""
    kernel = torch.from_numpy(defocus_kernel(*DEFOCUS[severity - 1]))
    return _filters.conv2d_same(x, kernel, "reflect101").clamp_(0.0, 1.0)


@register("glass_blur")
def glass_blur(x: torch.Tensor, severity: int, rng: SampleRandom) -> torch.Tensor:
    """Gaussian blur, local pixel copying, Gaussian blur again (§9.1 item 5).

    The first blur is truncated to 8-bit levels as in the reference. On flat regions the
    blurred value sits within float64 rounding noise of an 8-bit level, so the truncation
    depends on the exact arithmetic: both blurs are therefore computed in float64 with
    SciPy's summation order (see :func:`scipy_gaussian_float64`) on the 8-bit input levels,
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
    blurred = scipy_gaussian_float64(levels / 255.0, sigma)
    y = torch.floor(blurred * 255.0)  # np.uint8 truncation of float64 values in [0, 255]
    for iteration in range(iterations):
        y = _copy_neighbours(y, rng, stream=iteration)
    return scipy_gaussian_float64(y / 255.0, sigma).to(x.dtype).clamp_(0.0, 1.0)


def scipy_gaussian_float64(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``skimage.filters.gaussian`` (SciPy ``gaussian_filter``, ``mode="nearest"``) in float64.

    Reproduces SciPy's arithmetic order for symmetric kernels: per axis (H, then W), the
    centre tap first, then the symmetric pairs ``(x[-j] + x[+j]) * w[j]`` from the outermost
    ``j`` inwards. The result is then bit-identical to SciPy's for the same float64 input.
    """
    taps = _filters.gaussian_taps(float(sigma), 4.0)
    radius = len(taps) // 2
    out = x.to(torch.float64)
    for dim in (-2, -1):
        n = out.shape[dim]
        if dim == -2:
            padded = _filters.pad(out, radius, radius, 0, 0, "edge")
        else:
            padded = _filters.pad(out, 0, 0, radius, radius, "edge")

        def window(offset: int) -> torch.Tensor:
            return padded.narrow(dim, radius + offset, n)

        total = window(0) * taps[radius]
        for j in range(radius, 0, -1):
            total = total + (window(-j) + window(j)) * taps[radius + j]
        out = total
    return out


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
    return _filters.quantize(_filters.motion_blur(x, radius, sigma, angle))


def zoom_factors(severity: int) -> np.ndarray:
    """``np.arange(1, end, 0.01)``: 7, 12, 16, 21 and 26 factors for severities 1-5."""
    return np.arange(1.0, ZOOM_END[severity - 1], 0.01)


_DENSE_ZOOM_MAX_PIXELS = 1024  # up to 32x32 the whole blur is one (HW x HW) matrix (4 MB)


@lru_cache(maxsize=16)
def zoom_blur_operator(h: int, w: int, severity: int, device: str = "cpu") -> torch.Tensor:
    """``(I + sum_z Zh(z) (x) Zw(z)) / (n + 1)``: zoom blur of a flattened ``h x w`` image."""
    total = np.eye(h * w)
    for factor in zoom_factors(severity):
        total += np.kron(_filters.clipped_zoom_matrix(h, float(factor)), _filters.clipped_zoom_matrix(w, float(factor)))
    total /= len(zoom_factors(severity)) + 1
    return torch.from_numpy(total.astype(np.float32)).to(device)


@register("zoom_blur")
def zoom_blur(x: torch.Tensor, severity: int, rng: SampleRandom) -> torch.Tensor:
    """Mean of the image and its centre zooms by every factor (§9.1 item 7).

    Every zoom is linear, so for small images the mean of all of them is precomputed as a
    single matrix on the flattened image; larger images use two small products per factor.
    """
    b, c, h, w = x.shape
    if h * w <= _DENSE_ZOOM_MAX_PIXELS:
        operator = zoom_blur_operator(h, w, severity, str(x.device))
        return _filters.matmul(x.reshape(b * c, h * w), operator.T, x).view(b, c, h, w).clamp_(0.0, 1.0)
    factors = zoom_factors(severity)
    acc = x.clone()
    for factor in factors:
        acc += _filters.clipped_zoom(x, float(factor))
    return acc.div_(len(factors) + 1).clamp_(0.0, 1.0)
