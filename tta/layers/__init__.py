"""Normalization layers that replace a model's BatchNorm layers for adaptation."""

from tta.layers.base import AdaptiveNorm, NormAct, SourceNormState
from tta.layers.batch_stats import AlphaBatchNorm, SourceStatsNorm, TestTimeBatchNorm
from tta.layers.unmix_tns import UnMixTNS

__all__ = [
    "AdaptiveNorm",
    "AlphaBatchNorm",
    "NormAct",
    "SourceNormState",
    "SourceStatsNorm",
    "TestTimeBatchNorm",
    "UnMixTNS",
]
