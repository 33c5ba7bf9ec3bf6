"""UnMix-TNS normalization layer (Tomar et al., "Un-Mixing Test-Time Normalization
Statistics: Combatting Label Temporal Correlation", ICLR 2024, arXiv 2401.08328).

Spec: docs/METHODS.md §4. Equation numbers refer to the paper's §3.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tta.layers.base import AdaptiveNorm, SourceNormState
from tta.layers.stats import instance_stats, normalize


class UnMixTNS(AdaptiveNorm):
    """K statistic components per layer, un-mixed online from label-correlated test batches.

    Per layer and stream, the state is K component means ``M`` and variances ``V`` (K x C),
    initialised from the source statistics (``alpha_init``: share of the source variance that
    goes into the spread of the component means):

    * K = 1: ``M = mu_s``, ``V = sigma_s^2``;
    * K > 1: ``M_k = mu_s + sqrt(alpha_init K / (K - 1)) sigma_s xi_k`` with ``xi ~ N(0, I)``,
      ``V_k = (1 - alpha_init) sigma_s^2``, so the uniform mixture keeps mean ``mu_s`` and
      variance ``sigma_s^2`` in expectation. All streams start from the same draw.

    Forward for ``z`` of shape (B, C, *spatial):

    1. instance statistics ``mu~_b, sigma~^2_b`` (biased, over spatial positions);
    2. assignment ``p_bk = softmax_k(cos(mu~_b, M_k) / tau)`` (no gradient);
    3. mixed statistics ``mu^_bk = (1 - p_bk) M_k + p_bk mu~_b`` (same for the variance);
    4. per-instance statistics as the uniform mixture over k (law of total variance)
       ``mu-_b = mean_k mu^_bk``, ``sigma-^2_b = mean_k sigma^^2_bk + mean_k mu^_bk^2 - mu-_b^2``,
       computed with the closed forms of docs/METHODS.md §4 (O(B K C), nothing of size B x K x C);
    5. ``gamma (z - mu-_b) / sqrt(sigma-^2_b + eps) + beta``;
    6. update with the pre-update components already used for the output:
       ``M_k <- M_k + lambda / B sum_b p_bk (mu~_b - M_k)`` (same for V), where
       ``lambda = 1 - (1 - m)^(B / B_max)`` and m is the replaced BN's momentum.

    As in the official code the update is averaged over the batch (divided by B, not by
    sum_b p_bk) and the commented-out cross term ``(1 - p) p (mu~ - M_k)^2`` is not used.
    Unlike the official code, a method that forwards twice per batch updates once (see
    :class:`tta.layers.base.AdaptiveNorm`).
    """

    def __init__(
        self,
        source: SourceNormState,
        k: int = 16,
        tau: float = 0.07,
        alpha_init: float = 0.5,
        b_max: int = 64,
        num_streams: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(source, num_streams)
        source_mean, source_var = self.require_source_stats()
        self.k = int(k)
        self.tau = float(tau)
        self.alpha_init = float(alpha_init)
        self.b_max = int(b_max)
        if self.k == 1:
            means = source_mean[None].clone()
            variances = source_var[None].clone()
        else:
            noise = torch.randn(
                (self.k, self.num_features), generator=generator, dtype=torch.float32
            ).to(source_mean.device)
            spread = math.sqrt(self.alpha_init * self.k / (self.k - 1))
            means = source_mean + spread * source_var.sqrt() * noise
            variances = ((1.0 - self.alpha_init) * source_var).expand(self.k, -1).clone()
        self.register_buffer("component_means", means.expand(num_streams, -1, -1).clone())
        self.register_buffer("component_vars", variances.expand(num_streams, -1, -1).clone())

    def update_rate(self, batch_size: int) -> float:
        """``lambda = 1 - (1 - m)^(B / B_max)`` (official momentum rule)."""
        return 1.0 - (1.0 - self.source_momentum) ** (batch_size / self.b_max)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.check_input(z)
        if z.dim() < 3:
            raise ValueError(
                f"UnMix-TNS needs spatial dims (N, C, *spatial); got {tuple(z.shape)}. "
                "BatchNorm1d layers are normalized with source statistics instead."
            )
        streams, k = self.num_streams, self.k
        inst_mean, inst_var = instance_stats(z)  # (N, C), gradients flow
        mu = inst_mean.unflatten(0, (streams, -1))  # (S, B, C)
        var = inst_var.unflatten(0, (streams, -1))
        means, variances = self.component_means, self.component_vars  # (S, K, C)

        with torch.no_grad():
            cosine = torch.bmm(F.normalize(mu, dim=-1), F.normalize(means, dim=-1).transpose(1, 2))
            p = torch.softmax(cosine.div_(self.tau), dim=-1)  # (S, B, K)
        q = 1.0 - p
        inv_k = 1.0 / k
        # Closed forms of step 4 with sum_k p_bk = 1, as fused batched products
        # (baddbmm(c, a, b) = c + a @ b):
        #   K mu-_b            = mu~_b + sum_k q_bk M_k
        #   K mean_k sigma^^2  = sigma~^2_b + sum_k q_bk V_k
        #   K mean_k mu^^2     = sum_k q_bk^2 M_k^2 + 2 mu~_b sum_k p_bk q_bk M_k + mu~_b^2 sum_k p_bk^2
        mix_mean = torch.baddbmm(mu, q, means).mul_(inv_k)
        moment = torch.baddbmm(var, q, variances)
        moment = torch.baddbmm(moment, q.square(), means.square())
        moment.addcmul_(mu, torch.bmm(p * q, means), value=2.0)
        moment.addcmul_(mu.square(), p.square().sum(-1, keepdim=True))
        mix_var = moment.mul_(inv_k).addcmul_(mix_mean, mix_mean, value=-1.0).clamp_min(0.0)
        out = normalize(z, mix_mean.flatten(0, 1), mix_var.flatten(0, 1), self.weight, self.bias, self.eps)

        if self.wants_update:
            with torch.no_grad():
                new_means, new_vars = self.updated_components(p, mu.detach(), var.detach())
            self.propose_update(component_means=new_means, component_vars=new_vars)
        return out

    def updated_components(
        self, p: torch.Tensor, mu: torch.Tensor, var: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 6: the components' new means and variances ``(S, K, C)`` from the
        assignments ``p`` ``(S, B, K)`` and the instance statistics ``(S, B, C)``."""
        means, variances = self.component_means, self.component_vars
        batch = mu.shape[1]
        rate = self.update_rate(batch) / batch
        # M + rate (sum_b p_bk mu~_b - w_k M) = (1 - rate w_k) M + rate sum_b p_bk mu~_b
        keep = torch.mul(p.sum(1), -rate).add_(1.0).unsqueeze(-1)  # (S, K, 1)
        p_t = p.transpose(1, 2)  # (S, K, B)
        new_means = torch.baddbmm(means * keep, p_t, mu, alpha=rate)
        new_vars = torch.baddbmm(variances * keep, p_t, var, alpha=rate)
        return new_means, new_vars

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, k={self.k}, tau={self.tau}, alpha_init={self.alpha_init}, "
            f"b_max={self.b_max}"
        )
