"""Digital corruptions: brightness, contrast, elastic_transform, pixelate, jpeg_compression.

CIFAR-10-C parameters from Hendrycks & Dietterich (ICLR 2019), spec ``ALGORITHMS.md`` §9.1
items 11-15.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from benchmarks.corruptions import _filters
from benchmarks.corruptions._color import hsv_to_rgb, rgb_to_hsv
from benchmarks.corruptions._jpeg import jpeg_roundtrip
from benchmarks.corruptions._random import SampleRandom
from benchmarks.corruptions._registry import register

BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)
_IMSIZE = 32  # the CIFAR script scales the elastic parameters by a fixed 32
# (alpha, sigma, affine) in pixels: 32 * (0, 0, 0.08), 32 * (0.05, 0.2, 0.07), ...
ELASTIC = tuple(
    (_IMSIZE * a, _IMSIZE * s, _IMSIZE * f)
    for a, s, f in ((0.0, 0.0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))
)
PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)
JPEG_QUALITY = (80, 65, 58, 50, 40)


@register("brightness")
def brightness(x: torch.Tensor, severity: int, rng: SampleRandom) -> torch.Tensor:
    """HSV value channel raised by ``c`` and clipped (§9.1 item 11)."""
    hsv = rgb_to_hsv(x)
    hsv[:, 2] = (hsv[:, 2] + BRIGHTNESS[severity - 1]).clamp_(0.0, 1.0)
    return hsv_to_rgb(hsv).clamp_(0.0, 1.0)


@register("contrast")
def contrast(x: torch.Tensor, severity: int, rng: SampleRandom) -> torch.Tensor:
    """Each channel pulled towards its spatial mean: ``(x - mean) * c + mean`` (§9.1 item 12)."""
    c = CONTRAST[severity - 1]
    mean = x.mean(dim=(2, 3), keepdim=True)
    return ((x - mean) * c + mean).clamp_(0.0, 1.0)


def affine_source_points(h: int, w: int) -> np.ndarray:
    """The reference's three anchor points ``(x, y)``: centre +-(size // 3), float32 like it."""
    centre = np.float32([h, w]) // 2
    side = min(h, w) // 3
    return np.array(
        [centre + side, [centre[0] + side, centre[1] - side], centre - side], dtype=np.float64
    )


def _opencv_affine_coords(inverse: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source (row, col) of every output pixel as OpenCV ``warpAffine`` computes them.

    OpenCV evaluates the inverse map in fixed point: both terms are rounded to 1/1024 px,
    then the sum is rounded to 1/32 px (``INTER_BITS = 5``), which also fixes the bilinear
    weights to multiples of 1/32. ``inverse``: ``(B, 2, 3)`` float64 destination -> source.
    """
    ys = torch.arange(h, device=inverse.device, dtype=torch.float64).view(1, h, 1)
    xs = torch.arange(w, device=inverse.device, dtype=torch.float64).view(1, 1, w)
    m = inverse.view(-1, 6, 1, 1)
    x_fixed = torch.round((m[:, 1] * ys + m[:, 2]) * 1024) + torch.round(m[:, 0] * xs * 1024) + 16
    y_fixed = torch.round((m[:, 4] * ys + m[:, 5]) * 1024) + torch.round(m[:, 3] * xs * 1024) + 16
    cols = torch.floor(x_fixed / 32) / 32
    rows = torch.floor(y_fixed / 32) / 32
    return rows, cols


@register("elastic_transform")
def elastic_transform(x: torch.Tensor, severity: int, rng: SampleRandom) -> torch.Tensor:
    """Random affine warp, then smooth random displacement (§9.1 item 13, CIFAR variant).

    Affine: the three anchor points moved by ``U(-affine, affine)`` each define the map
    (OpenCV ``getAffineTransform``); the image is resampled bilinearly with reflect-101
    border at OpenCV's 1/32-pixel positions. Displacement: two ``U(-1, 1)`` fields smoothed
    by a Gaussian (``sigma``, SciPy ``reflect`` border, truncate 3) and scaled by ``alpha``;
    the image is resampled bilinearly at ``(row + dy, col + dx)`` with SciPy's ``reflect``
    (edge-repeating) border, as ``map_coordinates(order=1)``. Severity 1 has ``alpha = 0``.
    """
    alpha, sigma, affine = ELASTIC[severity - 1]
    b, _, h, w = x.shape
    src = torch.from_numpy(affine_source_points(h, w)).to(x.device)
    jitter = rng.uniform((3, 2), stream=0).to(torch.float64) * (2 * affine) - affine
    dst = src + jitter
    system = torch.cat((src, torch.ones(3, 1, dtype=torch.float64, device=x.device)), dim=1)
    forward = torch.linalg.solve(system, dst).transpose(1, 2)  # (B, 2, 3): src -> dst
    linear_inv = torch.linalg.inv(forward[:, :, :2])
    shift_inv = -(linear_inv @ forward[:, :, 2:])
    rows, cols = _opencv_affine_coords(torch.cat((linear_inv, shift_inv), dim=2), h, w)
    warped = _filters.bilinear_sample(x, rows.to(x.dtype), cols.to(x.dtype), "reflect101")
    if alpha == 0:
        return warped.clamp_(0.0, 1.0)
    fields = rng.uniform((2, h, w), stream=1) * 2.0 - 1.0
    shift = _filters.gaussian_filter(fields, sigma, mode="symmetric", truncate=3.0) * alpha
    shift = shift.to(torch.float32)
    grid_r = torch.arange(h, device=x.device, dtype=torch.float32).view(1, h, 1)
    grid_c = torch.arange(w, device=x.device, dtype=torch.float32).view(1, 1, w)
    out = _filters.bilinear_sample(warped, grid_r + shift[:, 1], grid_c + shift[:, 0], "symmetric")
    return out.clamp_(0.0, 1.0)


_PILLOW_PRECISION_BITS = 22  # Pillow's fixed-point coefficients for 8-bit images


@lru_cache(maxsize=64)
def pillow_box_coefficients(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's ``Image.resize(..., BOX)`` weights for one axis, as fixed-point ints (out, in).

    Pillow centres output pixel ``i`` at ``(i + 0.5) * scale`` in input coordinates
    (``scale = in/out``), takes the input pixels whose centres fall inside a box of width
    ``max(scale, 1)`` around it (``-0.5 < d <= 0.5`` in filter units), normalises the
    weights and rounds them to ``PRECISION_BITS`` fractional bits.
    """
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 0.5 * filter_scale
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):  # a one-off per (in, out) size pair, cached
        centre = (i + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), in_size)
        d = (np.arange(lo, hi) - centre + 0.5) / filter_scale
        k = ((d > -0.5) & (d <= 0.5)).astype(np.float64)
        weights[i, lo:hi] = k / k.sum() if k.sum() else k
    fixed = np.where(weights < 0, -0.5, 0.5) + weights * (1 << _PILLOW_PRECISION_BITS)
    return np.trunc(fixed).astype(np.int64)


def _pillow_resample(levels: torch.Tensor, dim: int, out_size: int) -> torch.Tensor:
    """One Pillow 8-bit resampling pass of ``(N, H, W)`` levels along ``dim`` (-1 or -2).

    Pillow sums ``level * fixed_coefficient``, adds half and shifts right by 22 bits. The
    same is computed with the coefficients as exact binary fractions; float32 reproduces
    it exactly when every weight is 1 or 1/2 (all CIFAR pixelate sizes), float64 otherwise.
    """
    coef = pillow_box_coefficients(int(levels.shape[dim]), int(out_size))
    exact32 = bool(np.isin(coef, (0, 1 << (_PILLOW_PRECISION_BITS - 1), 1 << _PILLOW_PRECISION_BITS)).all())
    dtype = _filters.exact_dtype(levels) if exact32 else torch.float64
    weights = torch.from_numpy(coef / float(1 << _PILLOW_PRECISION_BITS)).to(device=levels.device, dtype=dtype)
    levels = levels.to(dtype)
    total = levels @ weights.T if dim == -1 else weights @ levels
    return torch.floor(total + 0.5).clamp_(0.0, 255.0)


def pillow_box_resize(levels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pillow BOX resize of ``(N, H, W)`` 8-bit levels (horizontal pass first, rounding each)."""
    if levels.shape[-1] != width:
        levels = _pillow_resample(levels, -1, width)
    if levels.shape[-2] != height:
        levels = _pillow_resample(levels, -2, height)
    return levels


@register("pixelate")
def pixelate(x: torch.Tensor, severity: int, rng: SampleRandom) -> torch.Tensor:
    """Pillow BOX downscale to ``int(size * c)`` and BOX upscale back (§9.1 item 14).

    Bit-exact with Pillow for 8-bit input: the input is rounded to 8-bit levels (the
    reference works on a PIL image) and each resampling pass rounds like Pillow's.
    """
    c = PIXELATE[severity - 1]
    h, w = x.shape[-2:]
    levels = torch.floor(x.clamp(0.0, 1.0) * 255.0 + 0.5).view(-1, h, w)
    small = pillow_box_resize(levels, int(h * c), int(w * c))
    return (pillow_box_resize(small, h, w) / 255.0).to(x.dtype).view_as(x)


@register("jpeg_compression")
def jpeg_compression(x: torch.Tensor, severity: int, rng: SampleRandom) -> torch.Tensor:
    """JPEG re-encoding at quality 80, 65, 58, 50, 40 (§9.1 item 15); see ``_jpeg``."""
    return jpeg_roundtrip(x, JPEG_QUALITY[severity - 1])
