"""``norm``: test-time batch normalization, optionally with an EMA of target statistics."""

from __future__ import annotations

import dataclasses

from tta.layers.base import AdaptiveNorm, SourceNormState
from tta.layers.batch_stats import TestTimeBatchNorm
from tta.methods.base import require_range
from tta.methods.statistics import StatisticsMethod
from tta.registry import register_method


@dataclasses.dataclass
class NormHparams:
    #: EMA weight m of the current batch; None normalizes with the batch statistics alone
    momentum: float | None = None


@register_method
class Norm(StatisticsMethod):
    """Test-time BN (Schneider et al., NeurIPS 2020; Nado et al., arXiv 2006.10963).

    Every BatchNorm normalizes with the mean and biased variance of the test batch
    (``shared/reference/ALGORITHMS.md`` §1). With ``momentum=m`` it normalizes with
    ``(1 - m) * EMA + m * batch`` and keeps that as the new EMA, starting from the source
    statistics; see :class:`tta.layers.TestTimeBatchNorm`.
    """

    name = "norm"
    Hparams = NormHparams

    def validate(self) -> None:
        if self.hparams.momentum is not None:
            require_range("momentum", self.hparams.momentum, 0.0, 1.0)

    def build_layer(self, name: str, source: SourceNormState) -> AdaptiveNorm:
        return TestTimeBatchNorm(source, momentum=self.hparams.momentum, num_streams=self.num_streams)
