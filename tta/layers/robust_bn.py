"""Robust batch normalization of RoTTA (Yuan et al., "Robust Test-Time Adaptation in Dynamic
Scenarios", CVPR 2023, arXiv 2303.13899, §3.2; official code: BIT-DA/RoTTA,
``core/utils/bn_layers.py``)."""

from __future__ import annotations

import torch

from tta.layers.base import AdaptiveNorm, SourceNormState
from tta.layers.stats import normalize, stream_stats


class RobustBatchNorm(AdaptiveNorm):
    """Normalize with a global exponential moving average of test-batch statistics.

    State per stream: ``mu_g, sigma_g^2`` (C each), initialised with the source running
    statistics. A forward on a batch with mean ``mu_t`` and *biased* variance ``sigma_t^2``
    (over batch and spatial positions) does (paper Eq. 3)::

        mu_g      <- (1 - alpha) mu_g      + alpha mu_t
        sigma_g^2 <- (1 - alpha) sigma_g^2 + alpha sigma_t^2

    and normalizes with the *updated* ``mu_g, sigma_g^2`` and the source affine parameters.
    The statistics of the batch stay in the autograd graph of this output, as in the official
    train-mode forward (an objective on top gets the gradient through ``mu_t, sigma_t^2``).

    ``frozen = True`` is the official eval-mode forward: normalize with the stored ``mu_g,
    sigma_g^2`` and change nothing (RoTTA's teacher predicts this way). The paper describes
    the variance update with the unbiased batch variance in places; the official code uses
    the biased one, as here.

    With ``frozen = False`` this is :class:`tta.layers.TestTimeBatchNorm` with
    ``momentum = alpha``; the layer exists for the frozen mode and the RoTTA naming.
    """

    def __init__(self, source: SourceNormState, alpha: float = 0.05, num_streams: int = 1) -> None:
        super().__init__(source, num_streams)
        source_mean, source_var = self.require_source_stats()
        self.alpha = float(alpha)
        self.frozen = False
        self.register_buffer("ema_mean", source_mean.expand(num_streams, -1).clone())
        self.register_buffer("ema_var", source_var.expand(num_streams, -1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if self.frozen:
            return normalize(x, self.ema_mean, self.ema_var, self.weight, self.bias, self.eps)
        mean, var = stream_stats(x, self.num_streams)
        mean = torch.lerp(self.ema_mean, mean, self.alpha)
        var = torch.lerp(self.ema_var, var, self.alpha)
        self.propose_update(ema_mean=mean, ema_var=var)
        return normalize(x, mean, var, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}"
