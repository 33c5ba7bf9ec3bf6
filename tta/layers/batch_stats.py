"""Test-time batch normalization layers: test-batch statistics, an EMA of them, and alpha-BN."""

from __future__ import annotations

import math
import warnings

import torch

from tta.layers.base import AdaptiveNorm, SourceNormState
from tta.layers.stats import batch_normalize, normalize, stream_stats


class TestTimeBatchNorm(AdaptiveNorm):
    """Normalize with the statistics of the test batch (TBN; Schneider et al., NeurIPS 2020;
    Nado et al., 2020), as TENT's normalization does (Wang et al., ICLR 2021, §3).

    ``mu_t, sigma_t^2`` = mean and *biased* variance over batch and spatial dims (docs/METHODS.md §1).

    With ``momentum = m`` the layer keeps an exponential moving average of the target
    statistics, initialised from the source statistics, and normalizes with the average that
    already includes the current batch:
    ``mu_ema <- (1 - m) mu_ema + m mu_t`` (same for the variance). ``m = 1`` is plain TBN;
    a small ``m`` keeps predictions stable for tiny or label-correlated batches.
    """

    __test__ = False  # not a pytest class despite the name

    def __init__(self, source: SourceNormState, momentum: float | None = None, num_streams: int = 1) -> None:
        super().__init__(source, num_streams)
        self.momentum = momentum
        self._warned_single_value = False
        if momentum is not None:
            source_mean, source_var = self.require_source_stats()
            self.register_buffer("target_mean", source_mean.expand(num_streams, -1).clone())
            self.register_buffer("target_var", source_var.expand(num_streams, -1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        self._warn_if_constant(x)
        if self.momentum is None and self.num_streams == 1:
            out = batch_normalize(x, self.weight, self.bias, self.eps)  # one fused kernel
            if out is not None:
                return out
        mean, var = stream_stats(x, self.num_streams)
        if self.momentum is not None:
            m = self.momentum
            mean = torch.lerp(self.target_mean, mean, m)
            var = torch.lerp(self.target_var, var, m)
            self.propose_update(target_mean=mean, target_var=var)
        return normalize(x, mean, var, self.weight, self.bias, self.eps)

    def _warn_if_constant(self, x: torch.Tensor) -> None:
        """Warn once when every channel is normalized over a single value (a BatchNorm1d on a
        batch of one, per stream): the test statistics are that value itself, so the layer
        outputs its bias whatever the input, and so does the model's prediction. A host-side
        check of the shape; no synchronisation."""
        values = x.shape[0] // self.num_streams * math.prod(x.shape[2:])
        if values == 1 and self.momentum in (None, 1.0) and not self._warned_single_value:
            self._warned_single_value = True
            warnings.warn(
                f"{type(self).__name__} (replacing a {self.source_type.rsplit('.', 1)[-1]}) normalizes each "
                "channel over a single value: at batch size 1 its output, and the model's prediction, no "
                "longer depend on the input. Use layers='spatial' (BatchNorm1d keeps its source statistics), "
                "norm's momentum=..., or batches of several samples",
                RuntimeWarning,
                stacklevel=2,
            )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, momentum={self.momentum}"


class AlphaBatchNorm(AdaptiveNorm):
    """alpha-BN: mix source and test-batch statistics (You, Li & Zhao, arXiv 2110.04065).

    ``mu = alpha mu_s + (1 - alpha) mu_t``, ``sigma^2 = alpha sigma_s^2 + (1 - alpha) sigma_t^2``
    then ``gamma (z - mu) / sqrt(sigma^2 + eps) + beta`` with the source affine parameters.
    ``alpha`` weights the *source* side as in the paper; the "BN-alpha" baseline of other
    benchmarks (Schneider et al. 2020; mariodoebler/test-time-adaptation) weights the test side,
    ``a = 1 - alpha`` (their default a = 0.1 is alpha = 0.9). That port also uses the unbiased
    batch variance; we use the biased one so that alpha = 0 is exactly test-time BN.
    Stateless: nothing carries over between batches.
    """

    def __init__(self, source: SourceNormState, alpha: float, num_streams: int = 1) -> None:
        super().__init__(source, num_streams)
        self.require_source_stats()
        self.alpha = float(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        mean, var = stream_stats(x, self.num_streams)
        mean = torch.lerp(mean, self.source_mean, self.alpha)
        var = torch.lerp(var, self.source_var, self.alpha)
        return normalize(x, mean, var, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}"


class SourceStatsNorm(AdaptiveNorm):
    """Normalize with the frozen source statistics (eval-mode BatchNorm).

    UnMix-TNS replaces ``BatchNorm1d`` with this (official ``UnMixTNS1d`` behaviour: no
    adaptation for 1-D BN, e.g. the BN of a classifier head).
    """

    def __init__(self, source: SourceNormState, num_streams: int = 1) -> None:
        super().__init__(source, num_streams)
        self.require_source_stats()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return normalize(x, self.source_mean, self.source_var, self.weight, self.bias, self.eps)
