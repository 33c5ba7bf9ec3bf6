"""Batched spatial building blocks shared by the corruptions (all on ``(B, C, H, W)`` floats).

Each helper reproduces the boundary handling of the library call it stands in for in the
official generator (docs/METHODS.md §9.1), because at 32x32 pixels the border is a
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


def scipy_gaussian(x: torch.Tensor, sigma: float, *, mode: str, truncate: float = 4.0) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter`` over H then W, in float64 with SciPy's arithmetic.

    SciPy's ``correlate1d`` for a symmetric kernel computes, per output value, the centre
    tap first and then the pairs ``(x[-j] + x[+j]) * w[j]`` from the outermost ``j``
    inwards; doing the same element-wise gives SciPy's float64 result bit for bit, and a
    value that never depends on the other images of the batch. ``mode``: ``"edge"``
    (SciPy ``nearest``, what ``skimage.filters.gaussian`` uses by default) or
    ``"symmetric"`` (SciPy ``reflect``).
    """
    taps = gaussian_taps(float(sigma), float(truncate))
    radius = len(taps) // 2
    out = x.to(torch.float64)
    if radius == 0:
        return out * taps[0]
    for dim in (-2, -1):
        n = out.shape[dim]
        if dim == -2:
            padded = pad(out, radius, radius, 0, 0, mode)
        else:
            padded = pad(out, 0, 0, radius, radius, mode)

        def window(offset: int) -> torch.Tensor:
            return padded.narrow(dim, radius + offset, n)

        total = window(0) * taps[radius]
        for j in range(radius, 0, -1):
            total = total + (window(-j) + window(j)) * taps[radius + j]
        out = total
    return out


def correlate_taps(x: torch.Tensor, kernel: np.ndarray, mode: str) -> torch.Tensor:
    """Correlate every channel with an odd-sized 2-D ``kernel`` as OpenCV's direct ``filter2D``.

    OpenCV sums ``kernel[i, j] * pixel`` over the non-zero kernel entries in row-major order,
    starting from the first product; this does the same, one shifted view per tap, in the
    dtype of ``x`` (float64 for the reference's float64 images). Each output value is a fixed
    sequence of element-wise operations, so it is the same whatever else is in the batch.
    """
    kh, kw = kernel.shape
    padded = pad(x, kh // 2, kh // 2, kw // 2, kw // 2, mode)
    h, w = x.shape[-2:]
    total: torch.Tensor | None = None
    for i, j in zip(*np.nonzero(kernel)):  # row-major, at most a few dozen taps
        term = padded[..., i : i + h, j : j + w] * float(kernel[i, j])
        total = term if total is None else total + term
    return total if total is not None else torch.zeros_like(x)


@lru_cache(maxsize=256)
def clipped_zoom_taps(size: int, zoom: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The reference ``clipped_zoom`` along one axis of length ``size``: two taps per output.

    The reference crops the centred ``ceil(size/zoom)`` pixels (first index
    ``(size - crop)//2``), enlarges them with ``scipy.ndimage.zoom(order=1)`` to
    ``round(crop*zoom)`` pixels (output ``o`` samples input ``o*(crop-1)/(out-1)``, linear
    interpolation) and keeps ``size`` pixels starting at ``(out - size)//2``.

    Returns ``(lower, upper, w_lower, w_upper)``: source indices into the uncropped axis and
    SciPy's order-1 weights (``w_lower = 1 - t``, ``w_upper = 1 - w_lower``).
    """
    crop = int(math.ceil(size / zoom))
    start = (size - crop) // 2
    out = int(round(crop * zoom))
    trim = (out - size) // 2
    scale = (crop - 1) / (out - 1) if out > 1 else 0.0
    coords = np.arange(trim, trim + size, dtype=np.float64) * scale
    floor = np.floor(coords)
    w_lower = 1.0 - (coords - floor)
    w_upper = 1.0 - w_lower
    lower = np.clip(floor.astype(np.int64), 0, crop - 1)
    upper = np.minimum(lower + 1, crop - 1)
    return lower + start, upper + start, w_lower, w_upper


_ZOOM_CACHE: dict[tuple[int, int, float, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def clipped_zoom_gather(h: int, w: int, zoom: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat source indices and row/column weights ``(4, h*w)`` of the four neighbours (cached)."""
    key = (h, w, float(zoom), str(device))
    if key not in _ZOOM_CACHE:
        r_lo, r_hi, wr_lo, wr_hi = clipped_zoom_taps(h, float(zoom))
        c_lo, c_hi, wc_lo, wc_hi = clipped_zoom_taps(w, float(zoom))
        index, weight_r, weight_c = [], [], []
        for rows, wr in ((r_lo, wr_lo), (r_hi, wr_hi)):  # SciPy's neighbour order
            for cols, wc in ((c_lo, wc_lo), (c_hi, wc_hi)):
                index.append((rows[:, None] * w + cols[None, :]).reshape(-1))
                weight_r.append(np.repeat(wr, w))
                weight_c.append(np.tile(wc, h))
        _ZOOM_CACHE[key] = tuple(torch.from_numpy(np.stack(a)).to(device) for a in (index, weight_r, weight_c))  # type: ignore[assignment]
    return _ZOOM_CACHE[key]


def clipped_zoom(x: torch.Tensor, zoom: float) -> torch.Tensor:
    """Centre zoom of the last two dims of ``x`` by ``zoom`` >= 1, bilinear, same size, float64.

    Each output value is SciPy's order-1 sum ``v00*wr0*wc0 + v01*wr0*wc1 + v10*wr1*wc0 +
    v11*wr1*wc1`` (in that order, float64), computed element-wise: independent of the batch.
    """
    h, w = x.shape[-2:]
    index, weight_r, weight_c = clipped_zoom_gather(h, w, zoom, x.device)
    flat = x.to(torch.float64).reshape(*x.shape[:-2], h * w)
    terms = flat.index_select(-1, index.view(-1)).view(*x.shape[:-2], 4, h * w) * weight_r * weight_c
    total = ((terms[..., 0, :] + terms[..., 1, :]) + terms[..., 2, :]) + terms[..., 3, :]
    return total.view(*x.shape[:-2], h, w)


def map_index_tensor(index: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """:func:`map_index` on an integer tensor (any distance from the axis)."""
    if mode == "edge" or n == 1:
        return index.clamp(0, n - 1)
    if mode == "reflect101":
        index = torch.remainder(index, 2 * (n - 1))
        return torch.minimum(index, 2 * (n - 1) - index)
    if mode == "symmetric":
        index = torch.remainder(index, 2 * n)
        return torch.minimum(index, 2 * n - 1 - index)
    raise ValueError(f"unknown border mode {mode!r}")


def _gather_pixels(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``x[b, :, rows[b], cols[b]]`` for in-range integer ``(B, H', W')`` indices."""
    b, c, h, w = x.shape
    index = (rows * w + cols).view(b, 1, -1).expand(b, c, -1)
    return torch.gather(x.reshape(b, c, h * w), 2, index).view(b, c, *rows.shape[1:])


def remap_bilinear_opencv(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, mode: str) -> torch.Tensor:
    """OpenCV 4's bilinear ``remap``/``warpAffine`` of a float32 image at 1/32-px positions.

    ``rows``/``cols``: ``(B, H', W')`` float32 source positions on OpenCV's 1/32-pixel grid
    (see ``digital._opencv_affine_coords``). OpenCV looks the weights up in a table of
    products ``wy * wx`` (exact at this grid) and sums ``S00*w00 + S01*w01 + S10*w10 +
    S11*w11`` left to right in float32; out-of-range neighbours are mapped with the border
    ``mode``. Element-wise, so a sample's result never depends on the rest of the batch.
    """
    h, w = x.shape[-2:]
    r0, c0 = torch.floor(rows), torch.floor(cols)
    fy, fx = (rows - r0).to(x.dtype), (cols - c0).to(x.dtype)
    r0, c0 = r0.to(torch.int64), c0.to(torch.int64)
    wy = (1.0 - fy, fy)
    wx = (1.0 - fx, fx)
    total: torch.Tensor | None = None
    for i in (0, 1):
        r = map_index_tensor(r0 + i, h, mode)
        for j in (0, 1):
            q = map_index_tensor(c0 + j, w, mode)
            term = _gather_pixels(x, r, q) * (wy[i] * wx[j]).unsqueeze(1)
            total = term if total is None else total + term
    assert total is not None
    return total


def _scipy_reflect_coordinate(c: torch.Tensor, n: int) -> torch.Tensor:
    """SciPy's ``map_coordinate`` for ``mode="reflect"``: fold a float coordinate into range."""
    if n <= 1:
        return torch.zeros_like(c)
    size2 = 2 * n
    low = c < 0
    wrapped = torch.where(c < -size2, size2 * torch.trunc(-c / size2) + c, c)
    folded_low = torch.where(wrapped < -n, wrapped + size2, torch.where(wrapped > -1e-15, 1e-15, -wrapped) - 1)
    high = c > n - 1
    reduced = c - size2 * torch.trunc(c / size2)
    folded_high = torch.where(reduced >= n, size2 - reduced - 1, reduced)
    return torch.where(low, folded_low, torch.where(high, folded_high, c))


def map_coordinates_scipy(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``scipy.ndimage.map_coordinates(order=1, mode="reflect")`` per sample, all channels.

    ``rows``/``cols``: ``(B, H', W')`` float64 positions. SciPy folds each coordinate into
    the axis (half-sample symmetric), takes ``t = c - floor(c)``, weights ``w0 = 1 - t``
    and ``w1 = 1 - w0``, and sums ``v * wr * wc`` over the four neighbours (row-major) in
    float64; the result is returned in float64 (SciPy then casts to the input's dtype).
    """
    h, w = x.shape[-2:]
    rows = _scipy_reflect_coordinate(rows.to(torch.float64), h)
    cols = _scipy_reflect_coordinate(cols.to(torch.float64), w)
    r0, c0 = torch.floor(rows), torch.floor(cols)
    wr0 = 1.0 - (rows - r0)
    wc0 = 1.0 - (cols - c0)
    wr = (wr0, 1.0 - wr0)
    wc = (wc0, 1.0 - wc0)
    r0, c0 = r0.to(torch.int64), c0.to(torch.int64)
    source = x.to(torch.float64)
    total: torch.Tensor | None = None
    # folded coordinates lie in [-1, n - 1], so the neighbours are in [-1, n] and the
    # symmetric border maps them by clamping
    for i in (0, 1):
        r = (r0 + i).clamp_(0, h - 1)
        for j in (0, 1):
            q = (c0 + j).clamp_(0, w - 1)
            term = _gather_pixels(source, r, q) * wr[i].unsqueeze(1) * wc[j].unsqueeze(1)
            total = term if total is None else total + term
    assert total is not None
    return total


def quantize(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Round to the nearest 8-bit level (what writing an 8-bit PNG/JPEG/PIL image does).

    The result ``level / 255`` is computed in ``dtype`` (default: ``x``'s), so that
    multiplying it by 255 again gives the level back exactly.
    """
    levels = torch.floor(x.clamp(0.0, 1.0) * 255.0 + 0.5)
    return levels.to(dtype or x.dtype) / 255.0


def truncate_uint8_levels(x: torch.Tensor) -> torch.Tensor:
    """NumPy's truncating ``np.uint8(x * 255)`` in [0, 1] units."""
    return torch.floor(x.clamp(0.0, 1.0) * 255.0) / 255.0


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
