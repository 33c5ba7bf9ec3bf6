"""Batched normalization statistics in float32, per stream or per instance.

Every statistics layer goes through these helpers so that half-precision models keep their
statistics in fp32 and multi-stream inputs (S sub-batches stacked stream-major along dim 0)
are reduced per stream without copies: ``x.unflatten(0, (S, -1))`` is a view for any memory
format, channels_last included.
"""

from __future__ import annotations

import torch


def stream_stats(x: torch.Tensor, num_streams: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-stream channel mean and biased variance over batch and spatial dims.

    Args:
        x: ``(S*B, C, *spatial)``.
        num_streams: S.

    Returns:
        ``(mean, var)``, each float32 of shape ``(S, C)``.
    """
    grouped = x.float().unflatten(0, (num_streams, -1))
    dims = [1, *range(3, grouped.dim())]
    var, mean = torch.var_mean(grouped, dim=dims, correction=0)
    return mean, var


def instance_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample channel mean and biased variance over spatial dims: float32 ``(N, C)``."""
    if x.dim() < 3:
        raise ValueError(f"instance statistics need spatial dims, got input of shape {tuple(x.shape)}")
    dims = list(range(2, x.dim()))
    var, mean = torch.var_mean(x.float(), dim=dims, correction=0)
    return mean, var


def normalize(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """``weight * (x - mean) / sqrt(var + eps) + bias`` with per-row statistics.

    ``mean``/``var`` are ``(C,)`` (shared), ``(S, C)`` (per stream; rows of ``x`` are
    stream-major) or ``(N, C)`` (per sample). The affine map is folded into one scale and
    shift in fp32, then applied in the input dtype: one pass over ``x``.
    """
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.float()
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.float()
    if scale.dim() == 2 and 1 < scale.shape[0] != x.shape[0]:
        repeats = x.shape[0] // scale.shape[0]
        scale = scale.repeat_interleave(repeats, dim=0)
        shift = shift.repeat_interleave(repeats, dim=0)
    view = (*scale.shape, *([1] * (x.dim() - 2)))
    if scale.dim() == 1:
        view = (1, *view)
    scale = scale.to(x.dtype).view(view)
    shift = shift.to(x.dtype).view(view)
    return torch.addcmul(shift, x, scale)
