"""Digital corruptions: brightness, contrast, elastic_transform, pixelate, jpeg_compression.

CIFAR-10-C parameters from Hendrycks & Dietterich (ICLR 2019), docs/METHODS.md §9.1
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
    return np.array([centre + side, [centre[0] + side, centre[1] - side], centre - side], dtype=np.float32)


def opencv_affine_transform(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """OpenCV's ``getAffineTransform`` for a batch: ``(B, 3, 2)`` point pairs -> ``(B, 2, 3)``.

    OpenCV writes the six equations ``u_i = a x_i + b y_i + c`` and ``v_i = d x_i + e y_i +
    f`` as one 6x6 system (rows ``u_0, v_0, u_1, ...``) and solves it in float64 with its
    own small-matrix LU: partial pivoting on the first strictly largest ``|pivot|``,
    ``alpha = A[j, i] * (-1 / A[i, i])``, ``A[j, k] += alpha * A[i, k]``, then back
    substitution ``s -= A[i, k] * b[k]`` for increasing ``k`` and ``b[i] = s * (1 /
    A[i, i])`` (OpenCV 4's ``hal::LU``). The same operations run here element-wise over the
    batch (a loop over the 6 matrix rows, not over samples). OpenCV 5 orders the solve
    differently (last-bit differences, tested), far below what moves a 1/1024-pixel
    rounding of the warp. ``src``/``dst`` hold float32 values (OpenCV's ``Point2f``), used
    as float64.
    """
    b = src.shape[0]
    src, dst = src.to(torch.float64), dst.to(torch.float64)
    a = torch.zeros(b, 6, 6, dtype=torch.float64, device=src.device)
    rhs = torch.zeros(b, 6, dtype=torch.float64, device=src.device)
    for i in range(3):
        a[:, 2 * i, 0:2] = src[:, i]
        a[:, 2 * i, 2] = 1.0
        a[:, 2 * i + 1, 3:5] = src[:, i]
        a[:, 2 * i + 1, 5] = 1.0
        rhs[:, 2 * i] = dst[:, i, 0]
        rhs[:, 2 * i + 1] = dst[:, i, 1]
    batch = torch.arange(b, device=src.device)
    for i in range(6):
        pivot = torch.full((b,), i, dtype=torch.int64, device=src.device)
        for j in range(i + 1, 6):
            larger = a[:, j, i].abs() > a[batch, pivot, i].abs()
            pivot = torch.where(larger, torch.full_like(pivot, j), pivot)
        rows = torch.arange(6, device=src.device).expand(b, 6).clone()
        rows[batch, pivot] = i
        rows[:, i] = pivot
        a = a[batch[:, None], rows]
        rhs = rhs[batch[:, None], rows]
        d = -1.0 / a[:, i, i]
        for j in range(i + 1, 6):
            alpha = a[:, j, i] * d
            a[:, j, i + 1 :] = a[:, j, i + 1 :] + alpha[:, None] * a[:, i, i + 1 :]
            rhs[:, j] = rhs[:, j] + alpha * rhs[:, i]
        a[:, i, i] = -d
    for i in range(5, -1, -1):
        total = rhs[:, i]
        for k in range(i + 1, 6):
            total = total - a[:, i, k] * rhs[:, k]
        rhs[:, i] = total * a[:, i, i]
    return rhs.view(b, 2, 3)


def opencv_invert_affine(m: torch.Tensor) -> torch.Tensor:
    """OpenCV's ``invertAffineTransform`` (what ``warpAffine`` applies), ``(B, 2, 3)`` float64."""
    m0, m1, m2, m3, m4, m5 = m.reshape(-1, 6).unbind(1)
    det = m0 * m4 - m1 * m3
    det = torch.where(det != 0, 1.0 / det, torch.zeros_like(det))
    a11, a22, a12, a21 = m4 * det, m0 * det, -m1 * det, -m3 * det
    b1 = -a11 * m2 - a12 * m5
    b2 = -a21 * m2 - a22 * m5
    return torch.stack((a11, a12, b1, a21, a22, b2), dim=1).view(-1, 2, 3)


def _opencv_affine_coords(inverse: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source (row, col) of every output pixel as OpenCV ``warpAffine`` computes them.

    OpenCV evaluates the inverse map in fixed point: both terms are rounded to 1/1024 px,
    then the sum is rounded to 1/32 px (``INTER_BITS = 5``), which also fixes the bilinear
    weights to multiples of 1/32. ``inverse``: ``(B, 2, 3)`` float64 destination -> source.
    Returned as float32 (exact: multiples of 1/32 of small numbers).
    """
    ys = torch.arange(h, device=inverse.device, dtype=torch.float64).view(1, h, 1)
    xs = torch.arange(w, device=inverse.device, dtype=torch.float64).view(1, 1, w)
    m = inverse.view(-1, 6, 1, 1)
    x_fixed = torch.round((m[:, 1] * ys + m[:, 2]) * 1024) + torch.round(m[:, 0] * xs * 1024) + 16
    y_fixed = torch.round((m[:, 4] * ys + m[:, 5]) * 1024) + torch.round(m[:, 3] * xs * 1024) + 16
    cols = torch.floor(x_fixed / 32) / 32
    rows = torch.floor(y_fixed / 32) / 32
    return rows.to(torch.float32), cols.to(torch.float32)


@register("elastic_transform")
def elastic_transform(x: torch.Tensor, severity: int, rng: SampleRandom) -> torch.Tensor:
    """Random affine warp, then smooth random displacement (§9.1 item 13, CIFAR variant).

    Follows the reference's arithmetic, which is float32 in places:

    * Affine: the three float32 anchor points plus ``U(-affine, affine)`` jitter cast to
      float32 and added in float32 (the reference's ``pts1 + uniform(...).astype(float32)``)
      define the map (OpenCV ``getAffineTransform``, :func:`opencv_affine_transform`). The
      float32 image is resampled as OpenCV 4's ``warpAffine`` does: positions in fixed point
      (1/32 px), reflect-101 border, float32 bilinear sums
      (:func:`~benchmarks.corruptions._filters.remap_bilinear_opencv`).
    * Displacement: two ``U(-1, 1)`` fields smoothed in float64 by SciPy's Gaussian
      (``sigma``, ``reflect`` border, truncate 3), scaled by ``alpha`` and cast to float32;
      the warped image is resampled at ``(row + dy, col + dx)`` like SciPy's
      ``map_coordinates(order=1, mode="reflect")`` (float64 sums, float32 result).

    Severity 1 has ``alpha = 0`` (affine only). Returns float32, the reference's precision.
    """
    alpha, sigma, affine = ELASTIC[severity - 1]
    b, _, h, w = x.shape
    src = torch.from_numpy(affine_source_points(h, w)).to(x.device).expand(b, 3, 2)
    jitter = (-affine + (2 * affine) * rng.uniform((3, 2), stream=0).to(torch.float64)).to(torch.float32)
    dst = src + jitter  # float32, as the reference
    inverse = opencv_invert_affine(opencv_affine_transform(src, dst))
    rows, cols = _opencv_affine_coords(inverse, h, w)
    warped = _filters.remap_bilinear_opencv(x.to(torch.float32), rows, cols, "reflect101")
    if alpha == 0:
        return warped.clamp_(0.0, 1.0)
    fields = -1.0 + 2.0 * rng.uniform((2, h, w), stream=1).to(torch.float64)
    shift = (_filters.scipy_gaussian(fields, sigma, mode="symmetric", truncate=3.0) * alpha).to(torch.float32)
    grid_r = torch.arange(h, device=x.device, dtype=torch.float64).view(1, h, 1)
    grid_c = torch.arange(w, device=x.device, dtype=torch.float64).view(1, 1, w)
    rows = grid_r + shift[:, 1].to(torch.float64)
    cols = grid_c + shift[:, 0].to(torch.float64)
    out = _filters.map_coordinates_scipy(warped, rows, cols).to(torch.float32)
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
    return (pillow_box_resize(small, h, w).to(x.dtype) / 255.0).view_as(x)


@register("jpeg_compression")
def jpeg_compression(x: torch.Tensor, severity: int, rng: SampleRandom) -> torch.Tensor:
    """JPEG re-encoding at quality 80, 65, 58, 50, 40 (§9.1 item 15); see ``_jpeg``."""
    return jpeg_roundtrip(x, JPEG_QUALITY[severity - 1])
