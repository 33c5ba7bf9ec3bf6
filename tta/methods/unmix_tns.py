"""``unmix_tns``: un-mixing test-time normalization statistics."""

from __future__ import annotations

import dataclasses

from tta.layers.base import AdaptiveNorm, SourceNormState
from tta.layers.batch_stats import SourceStatsNorm
from tta.layers.unmix_tns import UnMixTNS as UnMixTNSLayer
from tta.methods.base import require_range
from tta.methods.statistics import StatisticsMethod
from tta.registry import register_method


@dataclasses.dataclass
class UnMixTNSHparams:
    #: K, number of statistic components per layer (official: 16; 128 for mixed domains)
    k: int = 16
    #: tau, softmax temperature of the cosine assignment
    tau: float = 0.07
    #: alpha_init ("coeff" in the official code), share of source variance spread over means
    alpha_init: float = 0.5
    #: B_max, batch size at which the update rate equals the BN momentum (official: 64)
    b_max: int = 64


@register_method
class UnMixTNS(StatisticsMethod):
    """UnMix-TNS (Tomar et al., ICLR 2024, arXiv 2401.08328), ``ALGORITHMS.md`` §4.

    Every BatchNorm2d/3d (and SyncBatchNorm, timm's BN variants) becomes a
    :class:`tta.layers.UnMixTNS` layer; BatchNorm1d normalizes with its frozen source
    statistics, as the official ``UnMixTNS1d`` does. Component means are initialised with
    noise from the global torch RNG, one ``K x C`` draw per layer in module order (seed torch
    for reproducibility); ``reset()`` restores the same draw.
    """

    name = "unmix_tns"
    Hparams = UnMixTNSHparams

    def validate(self) -> None:
        hp = self.hparams
        if int(hp.k) != hp.k or hp.k < 1:
            raise ValueError(f"k must be a positive integer, got {hp.k}")
        if hp.tau <= 0:
            raise ValueError(f"tau must be > 0, got {hp.tau}")
        require_range("alpha_init", hp.alpha_init, 0.0, 1.0)
        if int(hp.b_max) != hp.b_max or hp.b_max < 1:
            raise ValueError(f"b_max must be a positive integer, got {hp.b_max}")

    def build_layer(self, name: str, source: SourceNormState) -> AdaptiveNorm:
        if source.input_kind == "1d":
            return SourceStatsNorm(source, num_streams=self.num_streams)
        hp = self.hparams
        return UnMixTNSLayer(
            source,
            k=hp.k,
            tau=hp.tau,
            alpha_init=hp.alpha_init,
            b_max=hp.b_max,
            num_streams=self.num_streams,
        )
