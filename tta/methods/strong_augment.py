"""The strong test-time augmentation of CoTTA (Wang et al., CVPR 2022), as RoTTA uses it for
the student's input (BIT-DA/RoTTA ``core/utils/custom_transforms.py::get_tta_transforms``).

Applied to a whole batch of images in [0, 1] with *one* draw of the random parameters for
the batch (the official transform is applied to the stacked memory batch, so every image of
it gets the same jitter, affine map, blur and flip), except the Gaussian noise, which is
drawn per pixel. Steps, in order:

1. clip to [0, 1];
2. colour jitter in a random order of five operations: brightness ``x f``, contrast (blend
   with the mean grey level of each image), saturation (blend with the grey image), hue
   shift (in HSV) and gamma ``x^g`` (after clamping to [1e-8, 1]), each result clamped to
   [0, 1] as torchvision's functional ops do; saturation and hue only for RGB images;
3. edge padding by half the image height, a random affine map (rotation, integer
   translation up to 1/16 of the padded size, isotropic scale; bilinear, zero fill), a
   5x5 Gaussian blur (reflect padding), centre crop back to the input size;
4. horizontal flip with probability 0.5;
5. additive Gaussian noise (std 0.005) and a final clip to [0, 1].

Ranges ("strong", RoTTA's; "soft" is CoTTA's soft variant): brightness [0.6, 1.4]
([0.8, 1.2]), contrast [0.7, 1.3] ([0.85, 1.15]), saturation [0.5, 1.5] ([0.75, 1.25]),
hue [-0.06, 0.06] ([-0.03, 0.03]), gamma [0.7, 1.3] ([0.85, 1.15]), rotation +-15 deg
(+-8), scale [0.9, 1.1] ([0.95, 1.05]), blur sigma [0.001, 0.5] ([0.001, 0.25]).

The operations are written with torch ops (no torchvision dependency) and follow
torchvision's definitions; the affine map is applied with ``affine_grid``/``grid_sample``
rather than torchvision's own resampler, so single pixels differ slightly (the random
geometry has the same distribution). Random numbers come from the given CPU generator, so
results do not depend on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentRanges:
    brightness: tuple[float, float]
    contrast: tuple[float, float]
    saturation: tuple[float, float]
    hue: tuple[float, float]
    gamma: tuple[float, float]
    degrees: float
    scale: tuple[float, float]
    sigma: tuple[float, float]
    translate: float = 1.0 / 16.0
    flip_p: float = 0.5
    noise_std: float = 0.005


STRONG = AugmentRanges((0.6, 1.4), (0.7, 1.3), (0.5, 1.5), (-0.06, 0.06), (0.7, 1.3), 15.0, (0.9, 1.1), (0.001, 0.5))
SOFT = AugmentRanges((0.8, 1.2), (0.85, 1.15), (0.75, 1.25), (-0.03, 0.03), (0.85, 1.15), 8.0, (0.95, 1.05), (0.001, 0.25))
RANGES = {"strong": STRONG, "soft": SOFT}

_GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return float(torch.empty(()).uniform_(low, high, generator=generator))


def _grey(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(-3)
    return (_GREY[0] * r + _GREY[1] * g + _GREY[2] * b).unsqueeze(-3)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: float) -> torch.Tensor:
    return (factor * x + (1.0 - factor) * other).clamp(0.0, 1.0)


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, g, b = x.unbind(-3)
    maxc, minc = x.amax(-3), x.amin(-3)
    delta = maxc - minc
    flat = delta == 0
    s = delta / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    safe = torch.where(flat, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(flat, torch.zeros_like(h), (h / 6.0) % 1.0)
    return h, s, maxc


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    sector = i.long() % 6
    p, q, t = v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f))
    # channel value per hue sector 0..5 (r, g, b)
    table_r = torch.stack([v, q, p, p, t, v])
    table_g = torch.stack([t, v, v, q, p, p])
    table_b = torch.stack([p, p, t, v, v, q])
    index = sector.unsqueeze(0)
    return torch.stack([tab.gather(0, index)[0] for tab in (table_r, table_g, table_b)], dim=-3)


def _adjust_hue(x: torch.Tensor, shift: float) -> torch.Tensor:
    h, s, v = _rgb_to_hsv(x)
    return _hsv_to_rgb((h + shift) % 1.0, s, v)


def _gaussian_blur(x: torch.Tensor, sigma: float, size: int = 5) -> torch.Tensor:
    half = (size - 1) / 2.0
    grid = torch.linspace(-half, half, size, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (grid / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    pad = size // 2
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, size).expand(c, 1, 1, size), groups=c)
    return F.conv2d(x, kernel.view(1, 1, size, 1).expand(c, 1, size, 1), groups=c)


def _affine(x: torch.Tensor, angle: float, translate: tuple[int, int], scale: float) -> torch.Tensor:
    """Rotate by ``angle`` degrees about the centre, scale, shift by whole pixels; bilinear,
    zero outside the image (torchvision's ``RandomAffine`` with ``fill=0``)."""
    n, _, height, width = x.shape
    a = math.radians(angle)
    cos, sin = math.cos(a) / scale, math.sin(a) / scale  # inverse of rotation-and-scale
    tx, ty = 2.0 * translate[0] / width, 2.0 * translate[1] / height
    inverse = torch.tensor(
        [[cos, sin, -(cos * tx + sin * ty)], [-sin, cos, -(-sin * tx + cos * ty)]], dtype=x.dtype, device=x.device
    )
    grid = F.affine_grid(inverse.expand(n, 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def strong_augment(x: torch.Tensor, generator: torch.Generator, ranges: AugmentRanges = STRONG) -> torch.Tensor:
    """One random draw of the CoTTA/RoTTA augmentation applied to the batch ``x`` (N, C, H, W)."""
    if x.dim() != 4:
        raise ValueError(f"the strong augmentation needs images (N, C, H, W), got shape {tuple(x.shape)}")
    out = x.float().clamp(0.0, 1.0)
    rgb = out.shape[1] == 3
    for op in torch.randperm(5, generator=generator).tolist():
        if op == 0:
            out = (out * _uniform(generator, *ranges.brightness)).clamp(0.0, 1.0)
        elif op == 1:
            factor = _uniform(generator, *ranges.contrast)
            grey = _grey(out) if rgb else out
            out = _blend(out, grey.mean(dim=(-3, -2, -1), keepdim=True), factor)
        elif op == 2:
            factor = _uniform(generator, *ranges.saturation)
            if rgb:
                out = _blend(out, _grey(out), factor)
        elif op == 3:
            shift = _uniform(generator, *ranges.hue)
            if rgb:
                out = _adjust_hue(out, shift)
        else:
            gamma = _uniform(generator, *ranges.gamma)
            out = out.clamp(1e-8, 1.0).pow(gamma).clamp(0.0, 1.0)
    height, width = out.shape[-2:]
    pad = height // 2
    padded = F.pad(out, (pad, pad, pad, pad), mode="replicate")
    angle = _uniform(generator, -ranges.degrees, ranges.degrees)
    max_dx, max_dy = ranges.translate * padded.shape[-1], ranges.translate * padded.shape[-2]
    shift = (round(_uniform(generator, -max_dx, max_dx)), round(_uniform(generator, -max_dy, max_dy)))
    scale = _uniform(generator, *ranges.scale)
    padded = _affine(padded, angle, shift, scale)
    padded = _gaussian_blur(padded, _uniform(generator, *ranges.sigma))
    top, left = (padded.shape[-2] - height) // 2, (padded.shape[-1] - width) // 2
    out = padded[..., top : top + height, left : left + width]
    if float(torch.rand((), generator=generator)) < ranges.flip_p:
        out = out.flip(-1)
    noise = torch.randn(out.shape, generator=generator).to(device=out.device) * ranges.noise_std
    return (out + noise).clamp(0.0, 1.0).to(x.dtype)
