"""UnMix-TNS with per-component update rates set by each component's assigned mass (a variant
of :class:`tta.layers.UnMixTNS`, not the published method)."""

from __future__ import annotations

import math

import torch

from tta.layers.unmix_tns import UnMixTNS


def mass_rates(mass: torch.Tensor, k: int, momentum: float, b_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-component rates ``lambda_k = 1 - (1 - m)^(K w_k / B_max)`` for assigned masses
    ``w_k = sum_b p_bk``, and ``lambda_k / w_k`` (its limit ``-K ln(1 - m) / B_max`` at
    ``w_k = 0``), both shaped like ``mass``. ``m = 1`` is read as ``1 - 1e-7``."""
    c = k * math.log1p(-min(float(momentum), 1.0 - 1e-7)) / b_max  # <= 0
    rate = -torch.expm1(c * mass)
    safe = mass.clamp_min(1e-12)
    return rate, -torch.expm1(c * safe) / safe


class UnMixTNSMass(UnMixTNS):
    """UnMix-TNS whose K components each move at the rate of their own assigned mass.

    Normalization (steps 1-5 of :class:`tta.layers.UnMixTNS`) is unchanged. Only the update
    (step 6, :meth:`updated_components`) differs. With assignments ``p_bk``, mass ``w_k = sum_b p_bk`` and the component's
    weighted target ``mu*_k = sum_b p_bk mu~_b / w_k``:

    * official (``unmix_tns``): ``M_k <- M_k + (lambda / B) sum_b p_bk (mu~_b - M_k)``
      ``= M_k + lambda (w_k / B) (mu*_k - M_k)`` with ``lambda = 1 - (1 - m)^(B / B_max)``.
      Since ``sum_k w_k = B``, a component holding its even share ``w_k = B / K`` moves
      ``lambda / K`` per batch (0.6 % at K = 16, B = B_max = 64, m = 0.1): on an i.i.d.
      stream the statistics barely follow a shift (``docs/RESULTS.md``);
    * here: each component is a running estimate that expects ``1/K`` of the samples, so
      it applies the official momentum rule to its own mass with ``B_max / K`` as its
      reference batch: ``M_k <- M_k + lambda_k (mu*_k - M_k)``,
      ``lambda_k = 1 - (1 - m)^(K w_k / B_max)`` (:func:`mass_rates`); the same for ``V``.

    Consequences: at the even share ``w_k = B / K`` a component moves at ``lambda`` (as
    test-time BN with momentum would), K times faster than the official rule; a component
    that receives (almost) nothing stays where it is, so label-sorted batches still move only
    the components they are assigned to (the un-mixing is kept); a component that takes the
    whole batch moves at ``1 - (1 - m)^(K B / B_max)`` (0.81 at K = 16, B = B_max = 64).
    K = 1 gives exactly the official update. Not in the paper or the official code: use
    ``unmix_tns`` for the published method.
    """

    def updated_components(
        self, p: torch.Tensor, mu: torch.Tensor, var: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        means, variances = self.component_means, self.component_vars
        rate, per_mass = mass_rates(p.sum(1), self.k, self.source_momentum, self.b_max)  # (S, K)
        keep = torch.sub(1.0, rate).unsqueeze(-1)  # (S, K, 1)
        per_mass = per_mass.unsqueeze(-1)
        p_t = p.transpose(1, 2)  # (S, K, B)
        # M + lambda_k (sum_b p_bk mu~_b / w_k - M) = (1 - lambda_k) M + (lambda_k / w_k) P^T mu~
        new_means = torch.bmm(p_t, mu).mul_(per_mass).addcmul_(means, keep)
        new_vars = torch.bmm(p_t, var).mul_(per_mass).addcmul_(variances, keep)
        return new_means, new_vars
