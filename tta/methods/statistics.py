"""Shared conversion of statistics methods: swap every BatchNorm for an adaptive layer."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from tta.hyperparams import hparam
from tta.layers.base import AdaptiveNorm, SourceNormState
from tta.layers.batch_stats import SourceStatsNorm
from tta.methods.base import STATISTICS, Method
from tta.surgery import replace_norm_layers

#: accepted values of the ``layers`` hyperparameter of the statistics methods
LAYER_CHOICES = ("spatial", "all")


def layers_hparam(default: str) -> Any:
    """The ``layers`` field: which BatchNorm layers adapt. ``"spatial"``: BatchNorm2d/3d (and
    their SyncBatchNorm/timm/frozen variants); BatchNorm1d layers (e.g. in a classifier head)
    then normalize with their frozen source statistics. ``"all"``: BatchNorm1d too."""
    return hparam(default, choices=LAYER_CHOICES)


class StatisticsMethod(Method):
    """A method that only replaces normalization layers; the step is a plain forward.

    Subclasses with a ``layers`` hyperparameter (:func:`layers_hparam`) get it applied by
    :meth:`convert`: a BatchNorm1d layer outside the choice becomes a
    :class:`tta.layers.SourceStatsNorm` and :meth:`build_layer` never sees it.
    """

    role = STATISTICS
    supports_streams = True
    #: defaults this statistics method sets for the other part of an explicit composition
    #: (``"<this>+<method>"``), by hyperparameter name; the caller's values win
    objective_defaults: ClassVar[dict[str, Any]] = {}

    def build_layer(self, name: str, source: SourceNormState) -> AdaptiveNorm:
        raise NotImplementedError

    def _build(self, name: str, source: SourceNormState) -> AdaptiveNorm:
        if source.input_kind == "1d" and getattr(self.hparams, "layers", "all") == "spatial":
            return SourceStatsNorm(source, num_streams=self.num_streams)
        return self.build_layer(name, source)

    def convert(self, model: nn.Module) -> nn.Module:
        replace_norm_layers(model, self._build)
        return model
