"""UnMix-TNS with per-component update rates set by each component's assigned mass (a variant
of :class:`tta.layers.UnMixTNS`, not the published method)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tta.layers.stats import instance_stats, normalize
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
    differs. With assignments ``p_bk``, mass ``w_k = sum_b p_bk`` and the component's
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

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # Steps 1-5 are those of UnMixTNS.forward (the base layer offers no update hook; the
        # test suite checks that both layers give identical outputs from the same state).
        self.check_input(z)
        if z.dim() < 3:
            raise ValueError(
                f"UnMix-TNS needs spatial dims (N, C, *spatial); got {tuple(z.shape)}. "
                "BatchNorm1d layers are normalized with source statistics instead."
            )
        streams, k = self.num_streams, self.k
        inst_mean, inst_var = instance_stats(z)
        mu = inst_mean.unflatten(0, (streams, -1))  # (S, B, C)
        var = inst_var.unflatten(0, (streams, -1))
        means, variances = self.component_means, self.component_vars  # (S, K, C)
        with torch.no_grad():
            cosine = torch.bmm(F.normalize(mu, dim=-1), F.normalize(means, dim=-1).transpose(1, 2))
            p = torch.softmax(cosine.div_(self.tau), dim=-1)  # (S, B, K)
        q = 1.0 - p
        inv_k = 1.0 / k
        mix_mean = torch.baddbmm(mu, q, means).mul_(inv_k)
        moment = torch.baddbmm(var, q, variances)
        moment = torch.baddbmm(moment, q.square(), means.square())
        moment.addcmul_(mu, torch.bmm(p * q, means), value=2.0)
        moment.addcmul_(mu.square(), p.square().sum(-1, keepdim=True))
        mix_var = moment.mul_(inv_k).addcmul_(mix_mean, mix_mean, value=-1.0).clamp_min(0.0)
        out = normalize(z, mix_mean.flatten(0, 1), mix_var.flatten(0, 1), self.weight, self.bias, self.eps)

        if self.wants_update:
            with torch.no_grad():
                rate, per_mass = mass_rates(p.sum(1), k, self.source_momentum, self.b_max)  # (S, K)
                keep = torch.sub(1.0, rate).unsqueeze(-1)  # (S, K, 1)
                per_mass = per_mass.unsqueeze(-1)
                p_t = p.transpose(1, 2)  # (S, K, B)
                # M + lambda_k (sum_b p_bk mu~_b / w_k - M) = (1 - lambda_k) M + (lambda_k / w_k) P^T mu~
                new_means = torch.bmm(p_t, mu.detach()).mul_(per_mass).addcmul_(means, keep)
                new_vars = torch.bmm(p_t, var.detach()).mul_(per_mass).addcmul_(variances, keep)
            self.propose_update(component_means=new_means, component_vars=new_vars)
        return out

