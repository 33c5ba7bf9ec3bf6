"""``alpha_bn``: mix source and test-batch statistics."""

from __future__ import annotations

import dataclasses

from tta.hyperparams import hparam
from tta.layers.base import AdaptiveNorm, SourceNormState
from tta.layers.batch_stats import AlphaBatchNorm
from tta.methods.statistics import StatisticsMethod, layers_hparam
from tta.registry import register_method


@dataclasses.dataclass
class AlphaBNHparams:
    #: weight of the *source* statistics (paper convention); BN-alpha's a = 1 - alpha
    alpha: float = hparam(0.9, low=0.0, high=1.0, symbol="α")
    #: which BatchNorm layers mix statistics: "spatial" (BatchNorm2d/3d, as the BN-alpha
    #: reference, which wraps BatchNorm2d only) or "all" (BatchNorm1d too); the others keep
    #: their source statistics
    layers: str = layers_hparam("spatial")


@register_method
class AlphaBN(StatisticsMethod):
    """alpha-BN (You, Li & Zhao, "Test-time Batch Statistics Calibration for Covariate
    Shift", arXiv 2110.04065): ``mu = alpha mu_s + (1 - alpha) mu_t`` and
    ``sigma^2 = alpha sigma_s^2 + (1 - alpha) sigma_t^2``.

    ``alpha = 1`` is the source model, ``alpha = 0`` test-time BN. No official code exists; the
    default 0.9 equals the BN-alpha baseline's ``a = 0.1`` of the UnMix-TNS and
    mariodoebler benchmarks (which weight the test side). See docs/METHODS.md §5.

    ``layers="spatial"`` (default, the BN-alpha reference) adapts BatchNorm2d/3d and keeps
    BatchNorm1d layers at their source statistics; ``layers="all"`` mixes in BatchNorm1d too.

    Not implemented: the paper's "Core" loss (alpha-BN plus an online objective on pairwise
    class correlations of the batch's predictions). Its equation could not be found in any
    source available to us (the abstract names it only; third-party notes show it as an
    image), so no version of it is offered rather than a guessed one (docs/METHODS.md §11).
    """

    name = "alpha_bn"
    Hparams = AlphaBNHparams

    def build_layer(self, name: str, source: SourceNormState) -> AdaptiveNorm:
        return AlphaBatchNorm(source, alpha=self.hparams.alpha, num_streams=self.num_streams)
