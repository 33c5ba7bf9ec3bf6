"""Noise corruptions: gaussian_noise, shot_noise, impulse_noise.

CIFAR-10-C parameters from Hendrycks & Dietterich (ICLR 2019), spec ``ALGORITHMS.md`` §9.1
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
        counts = _poisson_8bit(levels.to(torch.int64), u, c)
    else:
        counts = torch.empty_like(flat)
        grid = torch.nonzero(on_grid, as_tuple=True)
        counts[grid] = _poisson_8bit(levels[grid].to(torch.int64), u[grid], c)
        rows, cols = torch.nonzero(~on_grid, as_tuple=True)
        counts[rows, cols] = poisson_sample(flat[rows, cols] * c, u[rows, cols], rows, cols, rng, stream=1)
    return (counts / c).clamp_(0.0, 1.0).view_as(x)


_TABLE_GUIDE_SIZE = 1024
_TABLE_CACHE: dict[tuple[float, str], tuple[torch.Tensor, torch.Tensor, int]] = {}


def _level_tables(photons: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """CDF table ``(256 * J,)`` of Poisson(k * photons / 255) and its guide table ``(256, M)``.

    ``guide[k, m]`` is the smallest count whose CDF reaches ``m / M``: the inversion for a
    uniform ``u`` starts there and is at most a step or two from the answer (Chen & Asau).
    """
    key = (float(photons), str(device))
    if key not in _TABLE_CACHE:
        rate = torch.arange(256, dtype=torch.float64) * (photons / 255.0)
        length = int(rate.max() + 12.0 * math.sqrt(float(rate.max())) + 40.0)
        count = torch.arange(length, dtype=torch.float64)
        log_rate = torch.log(rate.clamp(min=1e-300))
        log_pmf = -rate[:, None] + count[None] * log_rate[:, None] - torch.lgamma(count + 1.0)[None]
        pmf = torch.exp(log_pmf)
        pmf[0] = 0.0
        pmf[0, 0] = 1.0  # rate 0: always 0
        cdf = torch.cumsum(pmf, dim=1)
        cdf[:, -1] = 1.0  # the tail beyond ~12 standard deviations is below float64 resolution
        targets = (torch.arange(_TABLE_GUIDE_SIZE, dtype=torch.float64) / _TABLE_GUIDE_SIZE).expand(256, -1)
        guide = torch.searchsorted(cdf, targets.contiguous())
        _TABLE_CACHE[key] = (cdf.reshape(-1).to(device), guide.to(device), length)
    return _TABLE_CACHE[key]


def _poisson_8bit(levels: torch.Tensor, u: torch.Tensor, photons: float) -> torch.Tensor:
    """Smallest count ``j`` with ``CDF_k(j) >= u`` for rates ``k * photons / 255`` (any shape)."""
    cdf, guide, length = _level_tables(photons, levels.device)
    count = torch.take(guide, levels * _TABLE_GUIDE_SIZE + (u * _TABLE_GUIDE_SIZE).to(torch.int64))
    base = levels * length
    step = torch.take(cdf, base + count) < u  # about 1% of the elements need a step
    count += step
    count_flat, base_flat, u_flat = count.view(-1), base.reshape(-1), u.reshape(-1)
    active = torch.nonzero(step.view(-1)).squeeze(1)
    active = active[torch.take(cdf, base_flat[active] + count_flat[active]) < u_flat[active]]
    while active.numel():
        count_flat[active] += 1
        active = active[torch.take(cdf, base_flat[active] + count_flat[active]) < u_flat[active]]
    return count.to(torch.float32)


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
