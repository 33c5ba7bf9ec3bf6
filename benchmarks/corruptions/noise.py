"""Noise corruptions: gaussian_noise, shot_noise, impulse_noise.

CIFAR-10-C parameters from Hendrycks & Dietterich (ICLR 2019), docs/METHODS.md §9.1
items 1-3. Every random number comes from :class:`SampleRandom`, so results depend only on
``(seed, corruption, severity, sample_id)``.
"""

from __future__ import annotations

import math

import torch

from benchmarks.corruptions._random import SampleRandom
from benchmarks.corruptions._registry import register

GAUSSIAN_STD = (0.04, 0.06, 0.08, 0.09, 0.10)
SHOT_PHOTONS = (500.0, 250.0, 100.0, 75.0, 50.0)
IMPULSE_AMOUNT = (0.01, 0.02, 0.03, 0.05, 0.07)

_PTRS_MIN_RATE = 10.0  # below it Poisson samples come from CDF inversion (as NumPy does)
_MAX_INVERSION_STEPS = 80  # P(k > 80 | rate < 10) < 1e-40: the loop always ends before


@register("gaussian_noise")
def gaussian_noise(x: torch.Tensor, severity: int, rng: SampleRandom) -> torch.Tensor:
    """``x + N(0, c^2)`` per pixel and channel, clipped (§9.1 item 1)."""
    c = GAUSSIAN_STD[severity - 1]
    return (x + c * rng.normal(tuple(x.shape[1:]), stream=0)).clamp_(0.0, 1.0)


@register("shot_noise")
def shot_noise(x: torch.Tensor, severity: int, rng: SampleRandom) -> torch.Tensor:
    """``Poisson(x * c) / c`` per pixel and channel, clipped (§9.1 item 2).

    Samples are exact. Values on the 8-bit grid (``x = k/255``, the normal case: images
    decoded from 8-bit files) are drawn by table-guided inversion of the Poisson CDF for
    the 256 possible rates; any other value by :func:`poisson_sample`.
    """
    c = SHOT_PHOTONS[severity - 1]
    b = x.shape[0]
    flat = x.clamp(0.0, 1.0).reshape(b, -1)
    u = rng.uniform((flat.shape[1],), stream=0)
    levels = torch.round(flat * 255.0)
    on_grid = (flat * 255.0 - levels).abs() < 1e-3
    if bool(on_grid.all()):  # the usual case: skip the masking
        counts = _poisson_8bit(levels, u, c)
    else:
        counts = torch.empty_like(flat)
        grid = torch.nonzero(on_grid, as_tuple=True)
        counts[grid] = _poisson_8bit(levels[grid], u[grid], c)
        rows, cols = torch.nonzero(~on_grid, as_tuple=True)
        counts[rows, cols] = poisson_sample(flat[rows, cols] * c, u[rows, cols], rows, cols, rng, stream=1)
    return (counts.to(x.dtype) / c).clamp_(0.0, 1.0).view_as(x)


# Inversion of the Poisson CDF for the 256 rates k * photons / 255 (8-bit inputs), exact for the
# uniforms of SampleRandom.uniform: u = (r + 1/2) / 2**23 with an integer r < 2**23. Then
# u > CDF(j) exactly when r >= T_j := floor(CDF(j) * 2**23 - 1/2) + 1 (computed in float64), and
# the sample -- the smallest j with CDF(j) >= u -- is the number of j with T_j <= r. The r axis
# is cut into 2**_BIN_BITS bins of _BIN_WIDTH values. One int32 per (rate, bin) packs the count
# at the bin's start, the first threshold inside the bin (relative to the bin start; _BIN_WIDTH
# when there is none) and whether more thresholds follow inside the bin, so most elements cost
# one gather and one compare. The bins with several thresholds (the far tails, probability
# ~1e-3) finish with a fixed-width gather over their thresholds.
_UNIFORM_BITS = 23
_BIN_BITS = 12
_BIN_WIDTH = 2 ** (_UNIFORM_BITS - _BIN_BITS)
_RELATIVE_BITS = (_BIN_WIDTH).bit_length()  # holds 0 .. _BIN_WIDTH
_MULTI_BIT = 1 << _RELATIVE_BITS
_START_SHIFT = _RELATIVE_BITS + 1
_TABLE_CACHE: dict[tuple[float, str], "_InversionTables"] = {}


class _InversionTables:
    def __init__(self, photons: float, device: torch.device) -> None:
        rate = torch.arange(256, dtype=torch.float64) * (photons / 255.0)
        self.length = int(rate.max() + 12.0 * math.sqrt(float(rate.max())) + 40.0)
        count = torch.arange(self.length, dtype=torch.float64)
        log_pmf = -rate[:, None] + count[None] * torch.log(rate.clamp(min=1e-300))[:, None] - torch.lgamma(count + 1.0)[None]
        pmf = torch.exp(log_pmf)
        pmf[0] = 0.0
        pmf[0, 0] = 1.0  # rate 0: always 0
        cdf = torch.cumsum(pmf, dim=1)
        cdf[:, -1] = 1.0  # the tail beyond ~12 standard deviations is below float64 resolution
        scale = float(2**_UNIFORM_BITS)
        thresholds = (torch.floor(cdf * scale - 0.5) + 1.0).clamp_(0.0, scale).to(torch.int64)  # nondecreasing
        bin_start = torch.arange(2**_BIN_BITS, dtype=torch.int64) * _BIN_WIDTH
        first = torch.searchsorted(thresholds, bin_start.expand(256, -1).contiguous(), right=True)
        last = torch.searchsorted(thresholds, (bin_start + _BIN_WIDTH - 1).expand(256, -1).contiguous(), right=True)
        inside = last - first  # thresholds falling inside each bin
        relative = torch.gather(thresholds, 1, first.clamp(max=self.length - 1)) - bin_start
        relative = torch.where(inside > 0, relative, _BIN_WIDTH)
        packed = (first << _START_SHIFT) | torch.where(inside > 1, _MULTI_BIT, 0) | relative
        self.packed = packed.to(torch.int32).reshape(-1).to(device)
        self.max_inside = int(inside.max())
        self.thresholds = thresholds.to(torch.float32).reshape(-1).to(device)  # <= 2**23: exact


def _poisson_8bit(levels: torch.Tensor, u: torch.Tensor, photons: float) -> torch.Tensor:
    """Poisson(k * photons / 255) samples for integer-valued float ``levels`` k (any shape)."""
    key = (float(photons), str(levels.device))
    if key not in _TABLE_CACHE:
        _TABLE_CACHE[key] = _InversionTables(photons, levels.device)
    tables = _TABLE_CACHE[key]
    # float32 is exact throughout: levels * 4096 + bin < 2**24 and r = u * 2**23 - 1/2 is an integer
    bins = torch.floor(u * 2**_BIN_BITS)
    slot = (levels * 2**_BIN_BITS + bins).to(torch.int64)
    r = u * 2**_UNIFORM_BITS - 0.5
    packed = torch.take(tables.packed, slot)
    relative = (packed & (2 * _BIN_WIDTH - 1)).to(torch.float32)
    count = (packed >> _START_SHIFT).to(torch.float32)
    count += (r - bins * _BIN_WIDTH) >= relative
    multi = torch.nonzero((packed & _MULTI_BIT).view(-1)).squeeze(1)
    if multi.numel():
        count_flat, slot_flat = count.view(-1), slot.view(-1)
        start = (packed.view(-1)[multi] >> _START_SHIFT).to(torch.int64)
        level = torch.div(slot_flat[multi], 2**_BIN_BITS, rounding_mode="floor")
        offsets = torch.arange(1, tables.max_inside, device=levels.device)
        index = (start[:, None] + offsets).clamp_(max=tables.length - 1) + level[:, None] * tables.length
        later = torch.take(tables.thresholds, index)  # thresholds beyond the bin's last are > r
        count_flat[multi] += (r.reshape(-1)[multi, None] >= later).sum(1).to(count.dtype)
    return count


@register("impulse_noise")
def impulse_noise(x: torch.Tensor, severity: int, rng: SampleRandom) -> torch.Tensor:
    """Salt-and-pepper noise (scikit-image ``random_noise(mode="s&p")``, §9.1 item 3).

    Each value is replaced with probability ``amount``; a replaced value becomes 1 or 0 with
    equal probability. This is the per-element Bernoulli scheme of current scikit-image;
    versions before 0.19 flipped exactly ``ceil(amount * size / 2)`` positions drawn with
    replacement, which has the same expected effect.
    """
    amount = IMPULSE_AMOUNT[severity - 1]
    u = rng.uniform(tuple(x.shape[1:]), stream=0)
    out = torch.where(u < amount, (u >= 0.5 * amount).to(x.dtype), x)
    return out.clamp_(0.0, 1.0)


def poisson_sample(
    rate: torch.Tensor, u: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, rng: SampleRandom, stream: int
) -> torch.Tensor:
    """Exact Poisson samples for arbitrary rates (1-D), from counter-based uniforms.

    Like NumPy: rates below 10 use inversion of the CDF with the given uniforms ``u``
    (sequential search from 0), larger rates Hörmann's transformed rejection with squeeze
    (PTRS, 1993), whose extra uniforms come from element ``(rows, cols)`` of streams
    ``stream, stream + 1, ...``; rejected elements redraw only themselves, so an element's
    value never depends on other elements.
    """
    out = torch.zeros_like(rate)  # rate 0 gives 0
    small = torch.nonzero((rate > 0) & (rate < _PTRS_MIN_RATE)).squeeze(1)
    if small.numel():
        out[small] = _poisson_inversion(rate[small], u[small])
    large = torch.nonzero(rate >= _PTRS_MIN_RATE).squeeze(1)
    if large.numel():
        r, c = rows[large], cols[large]
        v = rng.uniform_at(r, c, stream)
        out[large] = _poisson_ptrs(rate[large], u[large], v, r, c, rng, stream + 1)
    return out


def _poisson_inversion(rate: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Smallest k with CDF(k) >= u (sequential search from 0 in float64; rates < 10).

    Only the still-searching elements are touched in each step.
    """
    rate = rate.to(torch.float64)
    u = u.to(torch.float64)
    k = torch.zeros_like(rate)
    prob = torch.exp(-rate)
    cdf = prob.clone()
    active = torch.nonzero(u > cdf).squeeze(1)
    for step in range(1, _MAX_INVERSION_STEPS + 1):
        if active.numel() == 0:
            break
        p = prob[active] * rate[active] / step
        c = cdf[active] + p
        prob[active] = p
        cdf[active] = c
        k[active] += 1.0
        active = active[u[active] > c]
    return k.to(torch.float32)


def _poisson_ptrs(
    rate: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    rng: SampleRandom,
    stream: int,
) -> torch.Tensor:
    """Hörmann's PTRS for rates >= 10; each round redraws only the rejected elements.

    The cheap squeeze runs in float32; the exact acceptance test (log-pmf) in float64.
    """
    b = 0.931 + 2.53 * torch.sqrt(rate)
    a = -0.059 + 0.02483 * b
    vr = 0.9277 - 3.6224 / (b - 2.0)
    result = torch.empty_like(rate)
    pending = torch.arange(rate.numel(), device=rate.device)
    round_index = 0
    while pending.numel() > 0:
        if round_index > 0:  # fresh uniforms for the rejected elements only
            s = stream + 2 * (round_index - 1)
            u = rng.uniform_at(rows[pending], cols[pending], s)
            v = rng.uniform_at(rows[pending], cols[pending], s + 1)
        lam, a_p, b_p = rate[pending], a[pending], b[pending]
        centred = u - 0.5
        us = 0.5 - centred.abs()
        k = torch.floor((2.0 * a_p / us + b_p) * centred + lam + 0.43)
        accept = (us >= 0.07) & (v <= vr[pending])
        maybe = torch.nonzero(~accept & (k >= 0) & ~((us < 0.013) & (v > us))).squeeze(1)
        if maybe.numel():
            lam_m = lam[maybe].to(torch.float64)
            a_m, b_m = a_p[maybe].to(torch.float64), b_p[maybe].to(torch.float64)
            us_m, k_m = us[maybe].to(torch.float64), k[maybe].to(torch.float64)
            lhs = torch.log(v[maybe].to(torch.float64)) + torch.log(1.1239 + 1.1328 / (b_m - 3.4))
            lhs = lhs - torch.log(a_m / (us_m * us_m) + b_m)
            rhs = -lam_m + k_m * torch.log(lam_m) - torch.lgamma(k_m + 1.0)
            accept[maybe] = lhs <= rhs
        result[pending[accept]] = k[accept]
        pending = pending[~accept]
        round_index += 1
    return result
