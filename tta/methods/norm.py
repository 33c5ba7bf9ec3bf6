"""``norm``: test-time batch normalization, optionally with an EMA of target statistics."""

from __future__ import annotations

import dataclasses

from tta.hyperparams import hparam
from tta.layers.base import AdaptiveNorm, SourceNormState
from tta.layers.batch_stats import TestTimeBatchNorm
from tta.methods.statistics import StatisticsMethod, layers_hparam
from tta.registry import register_method


@dataclasses.dataclass
class NormHparams:
    #: EMA weight m of the current batch; None normalizes with the batch statistics alone
    momentum: float | None = hparam(None, low=0.0, high=1.0, symbol="m")
    #: which BatchNorm layers use test statistics: "all" (BatchNorm1d too, as the mariodoebler
    #: port's TENT/SAR configuration forces BatchNorm1d to batch statistics) or "spatial"
    #: (BatchNorm2d/3d, as the official TENT and SAR code; BatchNorm1d keeps its source statistics)
    layers: str = layers_hparam("all")


@register_method
class Norm(StatisticsMethod):
    """Test-time BN (Schneider et al., NeurIPS 2020; Nado et al., arXiv 2006.10963).

    Every BatchNorm normalizes with the mean and biased variance of the test batch
    (docs/METHODS.md §1). With ``momentum=m`` it normalizes with
    ``(1 - m) * EMA + m * batch`` and keeps that as the new EMA, starting from the source
    statistics; see :class:`tta.layers.TestTimeBatchNorm`.

    ``layers="all"`` (default) includes BatchNorm1d layers, as the mariodoebler port's
    TENT/SAR configuration does; ``layers="spatial"`` keeps them at their source statistics,
    as the official TENT and SAR code (which force batch statistics on BatchNorm2d only).
    """

    name = "norm"
    Hparams = NormHparams

    def build_layer(self, name: str, source: SourceNormState) -> AdaptiveNorm:
        return TestTimeBatchNorm(source, momentum=self.hparams.momentum, num_streams=self.num_streams)
