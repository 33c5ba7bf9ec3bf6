"""``bcn``: test-time update of Batch-Channel Normalization's estimated statistics."""

from __future__ import annotations

import dataclasses

from torch import nn

from tta.hyperparams import hparam
from tta.layers.base import AdaptiveNorm, SourceNormState
from tta.layers.bcn import BatchChannelNorm2d, TestTimeBatchChannelNorm
from tta.methods.statistics import StatisticsMethod
from tta.registry import register_method
from tta.surgery import replace_modules


@dataclasses.dataclass
class BCNHparams:
    #: EstBN moving speed r of the estimated batch-stage statistics at test time. None: each
    #: layer's own training value (``moving_speed`` of an estimated-statistics BCN, the BN
    #: momentum of a BatchNorm-stage BCN, 0.1 when that is None). UNVERIFIED in the papers.
    moving_speed: float | None = hparam(None, low=0.0, high=1.0, symbol="r")


@register_method
class BCN(StatisticsMethod):
    """Batch-Channel Normalization at test time (Qiao et al., arXiv 1903.10520 §4 and
    arXiv 1911.09738; docs/METHODS.md §7).

    For models *trained* with :class:`tta.layers.BatchChannelNorm2d` (see
    :func:`tta.layers.bcn.convert_to_bcn_ws`). Every such layer becomes a
    :class:`tta.layers.TestTimeBatchChannelNorm`, which keeps applying EstBN's update to the
    batch-stage estimates on the test stream: ``mu^ <- (1 - r) mu^ + r m``,
    ``sigma^2 <- (1 - r) sigma^2 + r mean((z - mu^_old)^2)``, and normalizes with the updated
    estimates; the group stage is batch independent. The official code only updates in
    training mode; the test-time update is this library's use of the same rule. Updates are
    committed by :class:`tta.Adapted` after the step (deferred, NaN-safe, not under
    ``no_adapt``, restored by ``reset()``). Compose with an objective as ``"bcn+tent"``.
    """

    name = "bcn"
    Hparams = BCNHparams
    requires = "a model trained with BatchChannelNorm2d layers (tta.layers.bcn.convert_to_bcn_ws)"

    def build_layer(self, name: str, source: SourceNormState) -> AdaptiveNorm:  # pragma: no cover
        raise NotImplementedError("bcn converts BatchChannelNorm2d layers, not BatchNorm")

    def convert(self, model: nn.Module) -> nn.Module:
        replaced = replace_modules(
            model,
            lambda _, module: isinstance(module, BatchChannelNorm2d),
            lambda _, module: TestTimeBatchChannelNorm(
                module, moving_speed=self.hparams.moving_speed, num_streams=self.num_streams
            ),
        )
        if not replaced:
            raise ValueError(
                "method 'bcn' needs a model with BatchChannelNorm2d layers; build one with "
                "tta.layers.bcn.convert_to_bcn_ws(model, ...) and train it"
            )
        return model
