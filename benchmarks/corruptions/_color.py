"""RGB <-> HSV in torch with scikit-image's conventions (``rgb2hsv`` / ``hsv2rgb``).

Used by ``brightness`` (docs/METHODS.md §9.1 row 11). Hue is in [0, 1); when all
three channels are equal, hue and saturation are 0; ties for the maximum channel resolve
to blue, then green, then red, as scikit-image's successive masked assignments do.
"""

from __future__ import annotations

import torch


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` RGB in [0, 1] -> HSV with every component in [0, 1]."""
    r, g, b = rgb.unbind(1)
    value = rgb.amax(dim=1)
    delta = value - rgb.amin(dim=1)
    chromatic = delta > 0
    safe_delta = torch.where(chromatic, delta, torch.ones_like(delta))
    safe_value = torch.where(value > 0, value, torch.ones_like(value))
    saturation = torch.where(chromatic, delta / safe_value, torch.zeros_like(delta))
    hue = torch.where(
        b == value,
        4.0 + (r - g) / safe_delta,
        torch.where(g == value, 2.0 + (b - r) / safe_delta, (g - b) / safe_delta),
    )
    hue = torch.remainder(hue / 6.0, 1.0)
    hue = torch.where(chromatic, hue, torch.zeros_like(hue))
    return torch.stack((hue, saturation, value), dim=1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv` (the standard six-sector formula)."""
    hue, saturation, value = hsv.unbind(1)
    sector_f = torch.floor(hue * 6.0)
    frac = hue * 6.0 - sector_f
    sector = torch.remainder(sector_f.to(torch.int64), 6).unsqueeze(0)
    p = value * (1.0 - saturation)
    q = value * (1.0 - frac * saturation)
    t = value * (1.0 - (1.0 - frac) * saturation)
    red = torch.stack((value, q, p, p, t, value)).gather(0, sector)[0]
    green = torch.stack((t, value, value, q, p, p)).gather(0, sector)[0]
    blue = torch.stack((p, p, t, value, value, q)).gather(0, sector)[0]
    return torch.stack((red, green, blue), dim=1)
