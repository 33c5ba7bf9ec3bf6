"""The normalization layer of ``gated_bn``: test-batch statistics mixed with slow moment
averages by a per-batch gate that the method sets (:mod:`tta.methods.gated_bn`)."""

from __future__ import annotations

import math

import torch

from tta.layers.base import AdaptiveNorm, SourceNormState
from tta.layers.stats import normalize, stream_stats


def sample_rate(batch_size: int, span: float) -> float:
    """The weight of a batch of ``batch_size`` samples in an exponential average whose time
    constant is ``span`` samples: ``1 - exp(-batch_size / span)`` (so the memory is the
    same in samples whatever the batch size)."""
    return -math.expm1(-batch_size / span)


class GatedBatchNorm(AdaptiveNorm):
    """Two forwards per batch: a *robust* one with slow statistics, then a *gated* one.

    State per stream: exponential averages of the first and second raw moments of the
    input, ``m1, m2`` (C each), initialised from the source statistics (``m1 = mu_s``,
    ``m2 = sigma_s^2 + mu_s^2``). Their time constant is ``span`` samples: a batch of n
    samples enters with weight ``rho = 1 - exp(-n / span)`` (:func:`sample_rate`).

    * **Robust forward** (``gate is None``, the step's first forward): with the batch's
      mean and biased variance ``mu_t, sigma_t^2`` (its second moment is
      ``sigma_t^2 + mu_t^2``), ``m1 <- lerp(m1, mu_t, rho)``, ``m2 <- lerp(m2, sigma_t^2 +
      mu_t^2, rho)``; normalize with ``mu_r = m1`` and ``sigma_r^2 = max(m2 - m1^2, 0)``,
      the updated values. Averaging raw moments (not variances, as RoTTA's robust BN does)
      keeps the spread between batches in the variance, which makes the average sound at
      any batch size, one image included.
    * **Gated forward** (``gate`` set by the method: ``(S,)`` in [0, 1]): normalize with
      ``lerp(mu_t, mu_r, gate)`` and ``lerp(sigma_t^2, sigma_r^2, gate)``: test-time BN at
      gate 0, the robust statistics of the first forward at gate 1. Nothing is updated
      (only a step's first forward updates, see :class:`AdaptiveNorm`).

    Statistics are float32 whatever the input dtype; no host synchronisation.
    """

    def __init__(self, source: SourceNormState, span: float = 1280.0, num_streams: int = 1) -> None:
        super().__init__(source, num_streams)
        source_mean, source_var = self.require_source_stats()
        if not span > 0:
            raise ValueError(f"span must be > 0, got {span}")
        self.span = float(span)
        self.register_buffer("moment1", source_mean.expand(num_streams, -1).clone())
        self.register_buffer("moment2", (source_var + source_mean.square()).expand(num_streams, -1).clone())
        #: set by the method between the two forwards of a step; None: robust forward
        self.gate: torch.Tensor | None = None
        self._robust: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        mean, var = stream_stats(x, self.num_streams)
        if self.gate is None:
            rho = sample_rate(x.shape[0] // self.num_streams, self.span)
            moment1 = torch.lerp(self.moment1, mean, rho)
            moment2 = torch.lerp(self.moment2, var + mean.square(), rho)
            self.propose_update(moment1=moment1, moment2=moment2)
            robust = (moment1, (moment2 - moment1.square()).clamp_min(0.0))
            self._robust = (robust[0].detach(), robust[1].detach())
            return normalize(x, robust[0], robust[1], self.weight, self.bias, self.eps)
        if self._robust is None:
            raise RuntimeError("GatedBatchNorm: a gated forward needs the robust forward of the same batch first")
        gate = self.gate.to(mean.device, torch.float32).view(-1, 1)
        mean = torch.lerp(mean, self._robust[0], gate)
        var = torch.lerp(var, self._robust[1], gate)
        return normalize(x, mean, var, self.weight, self.bias, self.eps)

    def end_step(self) -> None:
        """Forget the per-batch values (called by the method after the gated forward)."""
        self.gate = None
        self._robust = None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, span={self.span:g}"
