"""Normalization layers that replace a model's BatchNorm layers for adaptation."""

from tta.layers.base import AdaptiveNorm, NormAct, SourceNormState
from tta.layers.batch_stats import AlphaBatchNorm, SourceStatsNorm, TestTimeBatchNorm
from tta.layers.bcn import BatchChannelNorm2d, TestTimeBatchChannelNorm, convert_to_bcn_ws
from tta.layers.unmix_tns import UnMixTNS
from tta.layers.ws import WSConv2d

__all__ = [
    "AdaptiveNorm",
    "AlphaBatchNorm",
    "BatchChannelNorm2d",
    "NormAct",
    "SourceNormState",
    "SourceStatsNorm",
    "TestTimeBatchChannelNorm",
    "TestTimeBatchNorm",
    "UnMixTNS",
    "WSConv2d",
    "convert_to_bcn_ws",
]
