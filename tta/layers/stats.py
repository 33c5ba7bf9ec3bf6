"""Batched normalization statistics in float32, per stream or per instance.

Every statistics layer goes through these helpers so that half-precision models keep their
statistics in fp32 and multi-stream inputs (S sub-batches stacked stream-major along dim 0)
are reduced per stream without copies: ``x.unflatten(0, (S, -1))`` is a view for any memory
format, channels_last included.

Fast paths (same statistics, same formulas; results agree to float rounding, ~1e-7):

* statistics that need no gradient come from ATen's normalization kernels instead of
  ``torch.var_mean`` (a scalar Welford reduction, about 5x slower on the CPU):
  ``torch.batch_norm_update_stats`` (two-pass mean and biased variance; vectorised for
  channels_last) and, on the CPU for contiguous maps of at least 64 positions, the
  vectorised per-row moments of ``torch.native_group_norm`` with one group per channel
  (ATen's NCHW batch-norm statistics loop is scalar; 2-4x slower from 32K elements on).
  Per-(sample, channel) moments are combined into per-stream, per-channel ones exactly, by
  the law of total variance. Per-instance statistics are those row moments directly (or
  the batch-norm kernel on the ``(1, N*C, *spatial)`` view);
* normalizing an fp32 batch with statistics that need no gradient is one
  ``torch.batch_norm`` call in inference mode (one pass, channels_last aware, cuDNN on
  CUDA) instead of about eight small operators and an ``addcmul``. Per-stream and
  per-instance statistics use it on the ``(1, N*C, *spatial)`` view of a contiguous batch;
* test-time BN of one stream (:func:`batch_normalize`) is one training-mode
  ``torch.batch_norm`` (fused statistics, normalization and backward) where gradients flow
  or the CPU row-moment path does not apply.

Statistics that gradients must flow through (an objective such as TENT over
``alpha_bn``/``unmix_tns``) and half-precision inputs take the generic path.
"""

from __future__ import annotations

import math

import torch


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


#: fewest spatial positions for which the CPU row-moment kernel beats the batch-norm one
_MIN_ROW_POSITIONS = 64
#: below this size the combination of row moments costs more than it saves (channel stats)
_MIN_COMBINED_ELEMENTS = 1 << 15


def _row_moments_apply(x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() >= 3
        and x.is_contiguous()
        and math.prod(x.shape[2:]) >= _MIN_ROW_POSITIONS
    )


def _row_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of every (sample, channel) row, float32 ``(N, C)``.

    The moments of ``native_group_norm`` with one group per channel and eps = 0 (its output
    is discarded); the variance is recovered as ``rstd ** -2`` (exact up to rounding; 0 when
    the row is constant, where rstd is inf).
    """
    n, c = x.shape[:2]
    _, mean, rstd = torch.native_group_norm(x, None, None, n, c, math.prod(x.shape[2:]), c, 0.0)
    return mean, rstd.square().reciprocal()


def _channel_stats(x: torch.Tensor, num_streams: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-stream channel mean and biased variance without autograd, float32 ``(S, C)``;
    None where no kernel path applies (the caller uses ``torch.var_mean``)."""
    if _row_moments_apply(x) and x.numel() >= _MIN_COMBINED_ELEMENTS:
        row_mean, row_var = _row_moments(x)
        row_mean = row_mean.unflatten(0, (num_streams, -1))  # (S, B, C)
        row_var = row_var.unflatten(0, (num_streams, -1))
        mean = row_mean.mean(1)
        # law of total variance over equal-size rows: within-row + between-row variance
        var = row_var.mean(1) + (row_mean - mean.unsqueeze(1)).square().mean(1)
        return mean, var
    if num_streams == 1:
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        return mean[None].float(), var[None].float()
    if x.device.type == "cpu":  # one vectorised kernel per stream beats one Welford reduction
        parts = [torch.batch_norm_update_stats(chunk, None, None, 0.0) for chunk in x.chunk(num_streams)]
        return torch.stack([m for m, _ in parts]).float(), torch.stack([v for _, v in parts]).float()
    return None


def stream_stats(x: torch.Tensor, num_streams: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-stream channel mean and biased variance over batch and spatial dims.

    Args:
        x: ``(S*B, C, *spatial)``.
        num_streams: S.

    Returns:
        ``(mean, var)``, each float32 of shape ``(S, C)``.
    """
    x = x.float()
    if not _needs_grad(x):
        stats = _channel_stats(x, num_streams)
        if stats is not None:
            return stats
    grouped = x.unflatten(0, (num_streams, -1))
    dims = [1, *range(3, grouped.dim())]
    var, mean = torch.var_mean(grouped, dim=dims, correction=0)
    return mean, var


def instance_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample channel mean and biased variance over spatial dims: float32 ``(N, C)``."""
    if x.dim() < 3:
        raise ValueError(f"instance statistics need spatial dims, got input of shape {tuple(x.shape)}")
    x = x.float()
    if not _needs_grad(x):
        if _row_moments_apply(x):
            return _row_moments(x)
        if x.is_contiguous():
            n, c = x.shape[:2]
            mean, var = torch.batch_norm_update_stats(x.view(1, n * c, -1), None, None, 0.0)
            return mean.view(n, c).float(), var.view(n, c).float()
    dims = list(range(2, x.dim()))
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    return mean, var


def _fused_normalize(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor | None:
    """``normalize`` as one inference-mode ``torch.batch_norm``, or None where it does not apply."""
    if x.dtype != torch.float32 or mean.dtype != torch.float32 or var.dtype != torch.float32:
        return None
    if any(p is not None and p.dtype != torch.float32 for p in (weight, bias)):
        return None
    if _needs_grad(mean, var):  # inference-mode batch norm has no gradient for the statistics
        return None
    cudnn = torch.backends.cudnn.enabled
    rows = 1 if mean.dim() == 1 else mean.shape[0]
    if rows == 1:
        return torch.batch_norm(x, weight, bias, mean.reshape(-1), var.reshape(-1), False, 0.0, eps, cudnn)
    if x.dim() < 2 or not x.is_contiguous() or x.shape[0] % rows:
        return None
    n, c = x.shape[:2]
    if rows != n:  # per-stream statistics: one row per sample of the stream
        mean = mean.repeat_interleave(n // rows, dim=0)
        var = var.repeat_interleave(n // rows, dim=0)
    flat = x.view(1, n * c, *x.shape[2:])
    weight = weight.repeat(n) if weight is not None else None
    bias = bias.repeat(n) if bias is not None else None
    out = torch.batch_norm(flat, weight, bias, mean.reshape(-1), var.reshape(-1), False, 0.0, eps, cudnn)
    return out.view(x.shape)


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
    fused = _fused_normalize(x, mean, var, weight, bias, eps)
    if fused is not None:
        return fused
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


def batch_normalize(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor | None:
    """Test-time BN of one stream: ``normalize(x, *stream_stats(x, 1), weight, bias, eps)``.

    One training-mode ``torch.batch_norm`` without running statistics (statistics of ``x``,
    biased variance; fused forward and backward), except on the CPU without gradients where
    the row-moment statistics plus an inference-mode ``torch.batch_norm`` are faster. None
    where neither applies (non-fp32 input or parameters): the caller takes the generic path.
    """
    if x.dtype != torch.float32 or any(p is not None and p.dtype != torch.float32 for p in (weight, bias)):
        return None
    if (
        _row_moments_apply(x)
        and x.numel() >= _MIN_COMBINED_ELEMENTS
        and not _needs_grad(x, *(p for p in (weight, bias) if p is not None))
    ):
        mean, var = _channel_stats(x, 1)  # type: ignore[misc]
        return torch.batch_norm(x, weight, bias, mean[0], var[0], False, 0.0, eps, torch.backends.cudnn.enabled)
    return torch.batch_norm(x, weight, bias, None, None, True, 0.0, eps, torch.backends.cudnn.enabled)
