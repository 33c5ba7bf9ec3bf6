"""``rbn``: RoTTA's robust batch normalization alone, as a statistics method."""

from __future__ import annotations

import dataclasses

from tta.hyperparams import hparam
from tta.layers.base import AdaptiveNorm, SourceNormState
from tta.layers.robust_bn import RobustBatchNorm
from tta.methods.statistics import StatisticsMethod, layers_hparam
from tta.registry import register_method


@dataclasses.dataclass
class RBNHparams:
    #: alpha, weight of the current batch in the global moving average (official 0.05)
    alpha: float = hparam(0.05, low=0.0, high=1.0, symbol="α")
    #: which BatchNorm layers adapt: "all" (official: RobustBN1d replaces BatchNorm1d too) or
    #: "spatial" (BatchNorm1d keeps its source statistics)
    layers: str = layers_hparam("all")


@register_method
class RBN(StatisticsMethod):
    """Robust BN of RoTTA (Yuan et al., CVPR 2023, §3.2, Eq. 3; BIT-DA/RoTTA).

    Every BatchNorm keeps a global exponential moving average of the test-batch mean and
    biased variance, ``mu_g <- (1 - alpha) mu_g + alpha mu_t`` (same for the variance),
    starting from the source statistics, and normalizes with the average after the update
    (the official layer's train-mode forward); see :class:`tta.layers.RobustBatchNorm`.
    Compose it with an objective (``"rbn+tent"``); ``rotta`` runs on it by default.
    """

    name = "rbn"
    Hparams = RBNHparams

    def build_layer(self, name: str, source: SourceNormState) -> AdaptiveNorm:
        return RobustBatchNorm(source, alpha=self.hparams.alpha, num_streams=self.num_streams)
