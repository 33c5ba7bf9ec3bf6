"""``unmix_tns_mass``: UnMix-TNS whose components move at the rate of their assigned mass."""

from __future__ import annotations

from tta.layers.unmix_tns_mass import UnMixTNSMass as UnMixTNSMassLayer
from tta.methods.unmix_tns import UnMixTNS
from tta.registry import register_method


@register_method
class UnMixTNSMass(UnMixTNS):
    """A variant of UnMix-TNS (not the published method; ``unmix_tns`` is the faithful one).

    Same layers, hyperparameters, initialisation and normalization as ``unmix_tns``; only the
    component update differs (:class:`tta.layers.unmix_tns_mass.UnMixTNSMass`): the official
    update is averaged over the batch, ``M_k += (lambda / B) sum_b p_bk (mu~_b - M_k)``, so on
    an i.i.d. stream each of the K components moves about ``lambda / K`` per batch and the
    statistics lag a domain shift by tens of batches (``docs/RESULTS.md``: at the source error
    on 300-image segments). Here component k moves towards the p-weighted mean of its
    samples at ``lambda_k = 1 - (1 - m)^(K w_k / B_max)``, ``w_k = sum_b p_bk`` its assigned
    mass: ``lambda`` at an even share, nothing when it receives nothing, so i.i.d. streams
    adapt K times faster while label-sorted batches still move only their own components.
    """

    name = "unmix_tns_mass"
    layer_class = UnMixTNSMassLayer
