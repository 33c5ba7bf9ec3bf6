"""``balanced_bn``: TRIBE's balanced batch normalization as a statistics method."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch
from torch import nn

from tta.features import find_classifier
from tta.hyperparams import hparam
from tta.layers.balanced_bn import BalancedBatchNorm
from tta.layers.base import AdaptiveNorm, SourceNormState
from tta.methods.statistics import StatisticsMethod, layers_hparam
from tta.registry import register_method


@dataclasses.dataclass
class BalancedBNHparams:
    #: eta, step size of the per-class statistics (official CIFAR-10 config 0.01; the
    #: authors' rule is about max(0.0005 K, 0.01): 0.05 for CIFAR-100, 0.5 for ImageNet)
    eta: float = hparam(0.01, low=0.0, low_open=True, high=1.0, symbol="η")
    #: gamma, share of the update shared by all classes (official CIFAR-10 0.0, CIFAR-100
    #: 0.1, ImageNet 0.5)
    gamma: float = hparam(0.0, low=0.0, high=1.0, symbol="γ")
    #: K, number of classes; None reads it from the model's classifier (last Linear layer)
    num_classes: int | None = hparam(None, low=2, symbol="K")
    #: which BatchNorm layers adapt: "all" (official: BalancedRobustBN1dV5 replaces
    #: BatchNorm1d too) or "spatial" (BatchNorm1d keeps its source statistics)
    layers: str = layers_hparam("all")


def infer_num_classes(model: nn.Module, method: str) -> int:
    """Output size of the model's classifier, or a ``ValueError`` asking for ``num_classes``."""
    found = find_classifier(model)
    if found is not None and isinstance(found[1], nn.Linear):
        return int(found[1].out_features)
    raise ValueError(f"method {method!r} cannot find the model's classifier; pass num_classes=<K>")


def check_class_output(out: torch.Tensor, num_classes: int, method: str) -> None:
    """A ``ValueError`` unless ``out`` holds logits ``(N, num_classes)``."""
    if out.dim() != 2 or out.shape[1] != num_classes:
        raise ValueError(
            f"{method} was built for {num_classes} classes, the model returned "
            f"shape {tuple(out.shape)}; pass num_classes=<K>"
        )


@contextlib.contextmanager
def frozen_layers(layers: list[BalancedBatchNorm]) -> Iterator[None]:
    """Within the context the layers normalize with their stored statistics, unchanged."""
    for layer in layers:
        layer.frozen = True
    try:
        yield
    finally:
        for layer in layers:
            layer.frozen = False


@register_method
class BalancedBN(StatisticsMethod):
    """Balanced BN of TRIBE (Su et al., AAAI 2024, §4.1, Eqs. 6-8;
    Gorilla-Lab-SCUT/TRIBE ``core/utils/balanced_bn_pyv.py``): per-class running statistics
    updated with the model's own pseudo-labels and combined with equal weight per class, so
    that an imbalanced or class-sorted stream does not pull the normalization towards its
    frequent classes. See :class:`tta.layers.BalancedBatchNorm` for the update.

    Step on a batch x (the official TRIBE step reduced to its normalization; TRIBE's
    network that predicts normalizes with the stored statistics in eval mode, then updates
    them in a second, labelled train-mode forward of the same batch):

    1. forward with the stored global statistics, nothing updated: the returned prediction;
    2. pseudo-labels ``y = argmax`` of that prediction;
    3. second forward of x with the labels: every layer updates its per-class statistics
       from its input (which already reflects the updated statistics of the layers before
       it, as in the official train-mode forward); its output is discarded.

    Cost: two forwards per batch. No host synchronisation.

    Composition: an objective method on top (``"balanced_bn+tent"``) forwards without
    labels; the layers then keep a robust-BN moving average of the global statistics with
    rate eta (the official layer's unlabelled train-mode forward).

    Multi-stream: each stream has its own per-class statistics.
    """

    name = "balanced_bn"
    Hparams = BalancedBNHparams

    def convert(self, model: nn.Module) -> nn.Module:
        self._num_classes = self.hparams.num_classes or infer_num_classes(model, self.name)
        return super().convert(model)

    def build_layer(self, name: str, source: SourceNormState) -> AdaptiveNorm:
        hp = self.hparams
        return BalancedBatchNorm(
            source, num_classes=self._num_classes, eta=hp.eta, gamma=hp.gamma, num_streams=self.num_streams
        )

    @staticmethod
    def layers(model: nn.Module) -> list[BalancedBatchNorm]:
        return [m for m in model.modules() if isinstance(m, BalancedBatchNorm)]

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), frozen_layers(self.layers(model)):
            return model(x)

    def step(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        layers = self.layers(model)
        out = self.predict(model, x)
        check_class_output(out, self._num_classes, self.name)
        labels = out.argmax(1)
        try:
            for layer in layers:
                layer.labels = labels
            with torch.no_grad():
                model(x)
        finally:
            for layer in layers:
                layer.labels = None
        return out
