"""Shared conversion of statistics methods: swap every BatchNorm for an adaptive layer."""

from __future__ import annotations

from torch import nn

from tta.layers.base import AdaptiveNorm, SourceNormState
from tta.methods.base import STATISTICS, Method
from tta.surgery import replace_norm_layers


class StatisticsMethod(Method):
    """A method that only replaces normalization layers; the step is a plain forward."""

    role = STATISTICS
    supports_streams = True

    def build_layer(self, name: str, source: SourceNormState) -> AdaptiveNorm:
        raise NotImplementedError

    def convert(self, model: nn.Module) -> nn.Module:
        replace_norm_layers(model, self.build_layer)
        return model
