"""Batched spatial building blocks shared by the corruptions (all on ``(B, C, H, W)`` floats).

Each helper reproduces the boundary handling of the library call it stands in for in the
official generator (spec ``ALGORITHMS.md`` §9.1), because at 32x32 pixels the border is a
large part of the image:

* ``"reflect101"``: OpenCV's default ``BORDER_REFLECT_101`` (``dcb|abcd|cba``), also
  PyTorch's ``"reflect"``.
* ``"symmetric"``: SciPy's ``mode="reflect"`` (``cba|abcd|dcb``, the edge repeated).
* ``"edge"``: SciPy's ``mode="nearest"``, ImageMagick's edge virtual pixels.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F


def extend_index(n: int, before: int, after: int, mode: str) -> np.ndarray:
    """Source indices of a length-``n`` axis padded by ``before``/``after`` samples."""
    index = np.arange(-before, n + after)
    return map_index(index, n, mode)


def map_index(index: np.ndarray, n: int, mode: str) -> np.ndarray:
    """Map out-of-range integer indices into ``[0, n)`` with a border mode (any distance)."""
    if mode == "edge":
        return index.clip(0, n - 1)
    if n == 1:
        return index * 0
    if mode == "reflect101":
        index = index % (2 * (n - 1))
        return np.minimum(index, 2 * (n - 1) - index)
    if mode == "symmetric":
        index = index % (2 * n)
        return np.minimum(index, 2 * n - 1 - index)
    raise ValueError(f"unknown border mode {mode!r}")


def pad(x: torch.Tensor, top: int, bottom: int, left: int, right: int, mode: str) -> torch.Tensor:
    """Pad the last two dims with a border mode (any pad width, unlike ``F.pad``)."""
    h, w = x.shape[-2:]
    torch_mode = {"reflect101": "reflect", "edge": "replicate"}.get(mode)
    if torch_mode and x.dim() == 4 and max(top, bottom) < h and max(left, right) < w:
        return F.pad(x, (left, right, top, bottom), mode=torch_mode)
    rows = torch.from_numpy(extend_index(h, top, bottom, mode)).to(x.device)
    cols = torch.from_numpy(extend_index(w, left, right, mode)).to(x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def exact_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype for matrix products and convolutions that must keep full float32 accuracy.

    CUDA runs float32 convolutions (and matmuls, if enabled) in TF32 with a 10-bit mantissa,
    and ``torch.set_float32_matmul_precision("high"/"medium")`` allows reduced precision
    elsewhere; that would change 8-bit roundings. Such products are done in float64 then.
    """
    if x.dtype == torch.float64:
        return x.dtype
    if x.is_cuda or torch.get_float32_matmul_precision() != "highest":
        return torch.float64
    return x.dtype


def matmul(a: torch.Tensor, b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in :func:`exact_dtype` of ``like``, returned in ``like``'s dtype."""
    dtype = exact_dtype(like)
    return torch.matmul(a.to(dtype), b.to(dtype)).to(like.dtype)


def conv2d_same(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Correlate every channel with one odd-sized 2-D ``kernel`` (OpenCV ``filter2D`` style)."""
    b, c, h, w = x.shape
    kh, kw = kernel.shape
    dtype = exact_dtype(x)
    padded = pad(x, kh // 2, kh // 2, kw // 2, kw // 2, mode).to(dtype)
    weight = kernel.to(device=x.device, dtype=dtype)[None, None].expand(c, 1, kh, kw)
    return F.conv2d(padded, weight, groups=c).to(x.dtype)


@lru_cache(maxsize=128)
def filter_matrix(n: int, taps: tuple[float, ...], mode: str) -> np.ndarray:
    """The ``(n, n)`` matrix of "pad with ``mode``, then correlate with ``taps``" on one axis.

    Filtering a small image separably is then two batched matrix products, which is much
    faster than single-channel convolutions and handles any kernel size and border.
    """
    radius = len(taps) // 2
    matrix = np.zeros((n, n), dtype=np.float64)
    rows = np.arange(n)
    for k, tap in enumerate(taps):  # a few taps, once per (size, kernel, mode)
        np.add.at(matrix, (rows, map_index(rows + k - radius, n, mode)), tap)
    return matrix


def separable_filter(x: torch.Tensor, taps_h: tuple[float, ...], taps_w: tuple[float, ...], mode: str) -> torch.Tensor:
    """Correlate the last two dims with ``taps_h`` along H and ``taps_w`` along W (odd sizes)."""
    h, w = x.shape[-2:]
    mh = torch.from_numpy(filter_matrix(h, tuple(taps_h), mode)).to(x.device)
    mw = torch.from_numpy(filter_matrix(w, tuple(taps_w), mode)).to(x.device)
    return matmul(matmul(mh, x, x), mw.T, x)


@lru_cache(maxsize=64)
def gaussian_taps(sigma: float, truncate: float) -> tuple[float, ...]:
    """SciPy's normalised Gaussian taps, radius ``int(truncate * sigma + 0.5)``.

    Same floating-point expression as SciPy's ``_gaussian_kernel1d``, so the taps are
    bit-identical (glass blur depends on it).
    """
    radius = int(truncate * float(sigma) + 0.5)
    offsets = np.arange(-radius, radius + 1)
    if sigma <= 0:
        return tuple((offsets == 0).astype(np.float64))
    taps = np.exp(-0.5 / (float(sigma) * float(sigma)) * offsets**2)
    return tuple(taps / taps.sum())


def gaussian_filter(x: torch.Tensor, sigma: float, *, mode: str, truncate: float = 4.0) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter`` over H and W (kernel radius ``int(truncate*sigma+0.5)``).

    ``skimage.filters.gaussian`` calls SciPy with ``mode="nearest"`` (here ``"edge"``) and
    ``truncate=4`` by default; the elastic transform asks for ``mode="reflect"`` (here
    ``"symmetric"``) and ``truncate=3``.
    """
    taps = gaussian_taps(float(sigma), float(truncate))
    if len(taps) == 1:
        return x.clone()
    return separable_filter(x, taps, taps, mode)


@lru_cache(maxsize=256)
def clipped_zoom_matrix(size: int, zoom: float) -> np.ndarray:
    """The reference ``clipped_zoom`` along one axis of length ``size`` as an ``(size, size)`` map.

    The reference crops the centred ``ceil(size/zoom)`` pixels (first index
    ``(size - crop)//2``), enlarges them with ``scipy.ndimage.zoom(order=1)`` to
    ``round(crop*zoom)`` pixels (output ``o`` samples input ``o*(crop-1)/(out-1)``, linear
    interpolation) and keeps ``size`` pixels starting at ``(out - size)//2``.
    """
    crop = int(math.ceil(size / zoom))
    start = (size - crop) // 2
    out = int(round(crop * zoom))
    trim = (out - size) // 2
    scale = (crop - 1) / (out - 1) if out > 1 else 0.0
    coords = start + np.arange(trim, trim + size, dtype=np.float64) * scale
    lower = np.clip(np.floor(coords).astype(np.int64), 0, size - 1)
    upper = np.minimum(lower + 1, size - 1)
    frac = coords - lower
    matrix = np.zeros((size, size), dtype=np.float64)
    rows = np.arange(size)
    np.add.at(matrix, (rows, lower), 1.0 - frac)
    np.add.at(matrix, (rows, upper), frac)
    return matrix


def clipped_zoom(x: torch.Tensor, zoom: float) -> torch.Tensor:
    """Centre zoom of the last two dims of ``x`` by ``zoom`` >= 1, bilinear, same size out."""
    h, w = x.shape[-2:]
    mh = torch.from_numpy(clipped_zoom_matrix(h, float(zoom))).to(x.device)
    mw = torch.from_numpy(clipped_zoom_matrix(w, float(zoom))).to(x.device)
    return matmul(matmul(mh, x, x), mw.T, x)


def bilinear_sample(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, mode: str) -> torch.Tensor:
    """Sample every channel of ``x`` (B, C, H, W) at per-sample float positions.

    ``rows``/``cols``: ``(B, H', W')`` source coordinates in pixels (pixel centres at
    integers). Out-of-range neighbours are mapped with the border ``mode``, as OpenCV's
    ``remap``/``warpAffine`` and SciPy's ``map_coordinates(order=1)`` do. Implemented as:
    pad ``x`` with ``mode`` far enough that every neighbour is inside, then one
    ``grid_sample`` (bilinear, ``align_corners=True``: pixel centres at the grid ends).
    """
    b, c, h, w = x.shape
    top = max(0, -int(torch.floor(rows.min()))) + 1
    bottom = max(0, int(torch.ceil(rows.max())) - (h - 1)) + 1
    left = max(0, -int(torch.floor(cols.min()))) + 1
    right = max(0, int(torch.ceil(cols.max())) - (w - 1)) + 1
    padded = pad(x, top, bottom, left, right, mode)
    height, width = padded.shape[-2:]
    grid = torch.stack(
        ((cols + left) * (2.0 / (width - 1)) - 1.0, (rows + top) * (2.0 / (height - 1)) - 1.0), dim=-1
    )
    return F.grid_sample(padded, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=True)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest 8-bit level (what writing an 8-bit PNG/JPEG/PIL image does)."""
    return torch.floor(x.clamp(0.0, 1.0) * 255.0 + 0.5) / 255.0


def truncate_uint8_levels(x: torch.Tensor) -> torch.Tensor:
    """NumPy's truncating ``np.uint8(x * 255)`` in [0, 1] units (see ``to_uint8`` for eps)."""
    return torch.floor(x.clamp(0.0, 1.0) * 255.0 + 1e-3) / 255.0


@lru_cache(maxsize=64)
def _motion_taps(radius: float, sigma: float) -> tuple[float, ...]:
    width = int(2 * math.ceil(radius) + 1)
    i = np.arange(width, dtype=np.float64)
    taps = np.exp(-(i**2) / (2.0 * sigma**2))
    return tuple(taps / taps.sum())


def motion_blur(x: torch.Tensor, radius: float, sigma: float, angle_deg: torch.Tensor) -> torch.Tensor:
    """Kernel-based equivalent of ImageMagick's ``MotionBlurImage`` with per-sample angles.

    ImageMagick builds a one-sided line kernel of ``width = 2*ceil(radius)+1`` taps with
    weights ``exp(-i^2 / (2 sigma^2))`` (``i = 0..width-1``, normalised to sum 1); tap ``i``
    reads the pixel at offset ``(ceil(i*cos(a) - 0.5), ceil(i*sin(a) - 0.5))`` in (x, y),
    with y pointing down and edge virtual pixels (clamped coordinates). This function does
    the same with one gather per tap for the whole batch (each sample has its own angle).

    Differences from ImageMagick: arithmetic is float32 rather than its quantum type
    (Q16/HDRI); taps whose weight is below 1e-9 (far beyond 8-bit precision) are skipped;
    alpha-weighted accumulation is irrelevant for the opaque images used here. The caller
    rounds the result to 8 bits, which is what the PNG round trip of the reference does.
    """
    b, c, h, w = x.shape
    taps = _motion_taps(float(radius), float(sigma))
    theta = torch.deg2rad(angle_deg.to(torch.float64))
    cos, sin = torch.cos(theta), torch.sin(theta)
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    flat = x.reshape(b, c, h * w)
    out = torch.zeros_like(flat)
    for i, weight in enumerate(taps):
        if weight < 1e-9:
            continue
        dx = torch.ceil(i * cos - 0.5).to(torch.int64)
        dy = torch.ceil(i * sin - 0.5).to(torch.int64)
        r = (rows[None, :] + dy[:, None]).clamp_(0, h - 1)
        q = (cols[None, :] + dx[:, None]).clamp_(0, w - 1)
        index = (r[:, :, None] * w + q[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
        out.add_(torch.gather(flat, 2, index), alpha=weight)
    return out.view(b, c, h, w)
