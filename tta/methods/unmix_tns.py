"""``unmix_tns``: un-mixing test-time normalization statistics."""

from __future__ import annotations

import dataclasses

from tta.hyperparams import hparam
from tta.layers.base import AdaptiveNorm, SourceNormState
from tta.layers.unmix_tns import UnMixTNS as UnMixTNSLayer
from tta.methods.statistics import StatisticsMethod, layers_hparam
from tta.registry import register_method


@dataclasses.dataclass
class UnMixTNSHparams:
    #: K, number of statistic components per layer (official: 16; 128 for mixed domains)
    k: int = hparam(16, low=1, symbol="K")
    #: tau, softmax temperature of the cosine assignment
    tau: float = hparam(0.07, low=0.0, low_open=True, symbol="τ")
    #: alpha_init ("coeff" in the official code), share of source variance spread over means
    alpha_init: float = hparam(0.5, low=0.0, high=1.0, symbol="α_init")
    #: B_max, batch size at which the update rate equals the BN momentum (official: 64)
    b_max: int = hparam(64, low=1, symbol="B_max")
    #: which BatchNorm layers un-mix: "spatial" (BatchNorm2d/3d; BatchNorm1d keeps its source
    #: statistics, as the official UnMixTNS1d) or "all" (BatchNorm1d too, which then needs
    #: inputs with a length dim, (N, C, L))
    layers: str = layers_hparam("spatial")


@register_method
class UnMixTNS(StatisticsMethod):
    """UnMix-TNS (Tomar et al., ICLR 2024, arXiv 2401.08328), docs/METHODS.md §4.

    Every BatchNorm2d/3d (and SyncBatchNorm, timm's BN variants) becomes a
    :class:`tta.layers.UnMixTNS` layer; BatchNorm1d normalizes with its frozen source
    statistics, as the official ``UnMixTNS1d`` does (``layers="all"`` un-mixes it too).
    Component means are initialised with noise from the wrapper's generator
    (``tta.adapt(..., seed=...)``), one ``K x C`` draw per layer in module order (the official
    code draws from the global torch RNG); ``reset()`` restores the same draw.

    In an explicit composition (``"unmix_tns+tent"``, ``"unmix_tns+sar"``...) the other
    method's ``lr`` defaults to 1e-5, the UnMix-TNS authors' CIFAR setting for every method
    they train on top of these layers (``objective_defaults``); pass ``tent__lr=...`` to
    override it.
    """

    name = "unmix_tns"
    Hparams = UnMixTNSHparams
    #: the UnMix-TNS authors train every method on top of their layers with lr 1e-5 on CIFAR
    #: (devavratTomar/unmixtns tta_experiments/run.sh, OPTIM.LR; ImageNet-C: 2.5e-6); TENT's own
    #: 1e-3 collapses on CIFAR-10-C in this composition
    objective_defaults = {"lr": 1e-5}
    #: the layer that replaces each BatchNorm (variants swap only the layer)
    layer_class: type[UnMixTNSLayer] = UnMixTNSLayer

    def build_layer(self, name: str, source: SourceNormState) -> AdaptiveNorm:
        hp = self.hparams
        return self.layer_class(
            source,
            k=hp.k,
            tau=hp.tau,
            alpha_init=hp.alpha_init,
            b_max=hp.b_max,
            num_streams=self.num_streams,
            generator=self.generator,
        )
