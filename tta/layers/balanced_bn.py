"""Balanced batch normalization of TRIBE (Su, Xu & Jia, "Towards Real-World Test-Time
Adaptation: Tri-Net Self-Training with Balanced Normalization", AAAI 2024, arXiv 2309.14949,
§4.1; official code: Gorilla-Lab-SCUT/TRIBE, ``core/utils/balanced_bn_pyv.py``, the "v5"
update that ``core/utils/bn_layers.py::BalancedRobustBN2dV5`` calls)."""

from __future__ import annotations

import torch

from tta.layers.base import AdaptiveNorm, SourceNormState
from tta.layers.stats import instance_stats, normalize, stream_stats


class BalancedBatchNorm(AdaptiveNorm):
    """Class-balanced test statistics: one running mean and variance per (pseudo-)class,
    combined with equal weight per class.

    State per stream: per-class statistics ``mu_k, sigma_k^2`` (K x C) and global ones
    ``mu_g, sigma_g^2`` (C), all initialised with the source running statistics.

    **Labelled update** (``labels`` set: one class index per sample, the prediction of a
    previous forward). With ``d_n = x_n - mu_{y_n}`` (spatial map minus its class mean),
    over the classes ``k`` present in the batch (``K'`` of them, ``n_k`` samples each):

    * step size ``m_k = 1 / n_k`` if ``n_k > 1 / eta`` else ``eta`` (a class seen often in
      one batch moves at most to its batch mean);
    * ``delta_k = m_k sum_{n: y_n = k} mean_hw(d_n)`` and ``S_k = sum_{n: y_n = k} mean_hw(d_n^2)``;
    * ``mu_k <- mu_k + (1 - gamma) delta_k`` for present classes, then every class moves by
      ``gamma mean_{k'}(delta_k')`` (the shared shift, paper Eq. 8, gamma the balance between
      class-wise and global updates);
    * ``sigma_k^2 <- sigma_k^2 + (1 - gamma) (m_k (S_k - n_k sigma_k^2) - delta_k^2)`` for
      present classes (an incremental variance around the moved mean), then every class
      ``sigma_k^2 <- sigma_k^2 + gamma (mean_{k'}(m_k' S_k' - delta_k'^2) - mean_{k'}(m_k' n_k') sigma_k^2)``;
    * ``mu_g = mean_k mu_k`` and ``sigma_g^2 = mean_k sigma_k^2 + var_k(mu_k)`` over all K
      classes (paper Eq. 7, the law of total variance of a uniform class mixture).

    Then it normalizes with the updated ``mu_g, sigma_g^2``. Following the official code,
    ``var_k`` is the *unbiased* variance over classes (``Tensor.var``), not the biased one
    the law of total variance gives. Without autograd the per-sample moments come from the
    fused instance statistics (``mean_hw(d^2) = var_hw(x) + mean_hw(d)^2``, equal to the
    official centred sums up to rounding); under autograd from the centred sums. The update is batched over classes, samples and streams (scatter-adds over
    ``stream * K + class``), with no host synchronisation.

    **Unlabelled forward** (``labels`` is None): ``frozen = True`` normalizes with the stored
    ``mu_g, sigma_g^2`` and changes nothing (the official eval-mode forward);
    ``frozen = False`` is the official unlabelled train-mode forward, a robust-BN moving
    average ``mu_g <- (1 - eta) mu_g + eta mu_t`` (same for the biased variance; per-class
    statistics untouched), then normalizes with it. That is what an objective method
    composed on top (``"balanced_bn+tent"``) gets, since it forwards without labels.

    The official 1-D layer (for token inputs ``(B, N, C)``) rebinds rather than writes the
    shared shift of the class means, so with ``gamma > 0`` it does not persist there; here
    every input kind follows the 2-D layer (identical at the default ``gamma = 0``).
    """

    def __init__(
        self,
        source: SourceNormState,
        num_classes: int,
        eta: float = 0.01,
        gamma: float = 0.0,
        num_streams: int = 1,
    ) -> None:
        super().__init__(source, num_streams)
        if num_classes < 2:
            raise ValueError(f"balanced BN needs num_classes >= 2, got {num_classes}")
        source_mean, source_var = self.require_source_stats()
        self.num_classes = int(num_classes)
        self.eta = float(eta)
        self.gamma = float(gamma)
        self.frozen = False
        #: class index per sample for the next forward (consumed by it), or None
        self.labels: torch.Tensor | None = None
        shape = (num_streams, self.num_classes, self.num_features)
        self.register_buffer("local_mean", source_mean.expand(shape).clone())
        self.register_buffer("local_var", source_var.expand(shape).clone())
        self.register_buffer("global_mean", source_mean.expand(num_streams, -1).clone())
        self.register_buffer("global_var", source_var.expand(num_streams, -1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        labels, self.labels = self.labels, None
        if labels is not None:
            mean, var = self._labelled_update(x, labels)
        elif self.frozen:
            _, _, mean, var = self.stored_state()
        else:
            _, _, global_mean, global_var = self.stored_state()
            batch_mean, batch_var = stream_stats(x, self.num_streams)
            mean = torch.lerp(global_mean, batch_mean, self.eta)
            var = torch.lerp(global_var, batch_var, self.eta)
            self.propose_update(global_mean=mean, global_var=var)
        return normalize(x, mean, var, self.weight, self.bias, self.eps)

    def stored_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The statistics a forward starts from: ``(local_mean, local_var, global_mean,
        global_var)``, the stored buffers (a subclass may start some streams elsewhere)."""
        return self.local_mean, self.local_var, self.global_mean, self.global_var

    def _labelled_update(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if labels.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
        stored_mean, stored_var, _, _ = self.stored_state()
        s, k, c = stored_mean.shape
        per_stream = x.shape[0] // s
        stream = torch.arange(s, device=x.device).repeat_interleave(per_stream)
        index = stream * k + labels.to(x.device).long()  # (N,) row of the flattened (S*K) state
        local_mean = stored_mean.reshape(s * k, c)
        local_var = stored_var.reshape(s * k, c)
        centre = local_mean[index]  # (N, C): each sample's class mean
        if x.dim() > 2 and not (torch.is_grad_enabled() and x.requires_grad):
            sample_mean, sample_var = instance_stats(x)  # (N, C) float32, fused row moments
            diff = sample_mean - centre  # mean_hw(d_n)
            diff_sq = sample_var + diff.square()  # mean_hw(d_n^2)
        else:
            # under autograd (TRIBE trains through these statistics): the official centred
            # sums, one elementwise pass, instead of the slower differentiable var_mean
            dims = tuple(range(2, x.dim()))
            centred = x.float() - centre.view(*centre.shape, *([1] * len(dims)))
            diff = centred.mean(dims) if dims else centred
            diff_sq = centred.square().mean(dims) if dims else centred.square()
        count = torch.zeros(s * k, device=x.device, dtype=torch.float32).index_add_(
            0, index, torch.ones_like(index, dtype=torch.float32)
        )
        step = torch.where(count > 1.0 / self.eta, 1.0 / count.clamp_min(1.0), self.eta)
        sample_step = step[index][:, None]  # m_k of each sample's class
        # Scatter-adds of per-sample terms: rows of absent classes stay exactly zero, and each
        # K x C pass is made once (K can be 1,000: these passes, not the forward, dominate).
        # delta_k = m_k sum_n d_n; shrink_k = m_k (S_k - n_k sigma_k^2)
        delta = torch.zeros_like(local_mean, dtype=diff.dtype).index_add(0, index, sample_step * diff)
        weighted_var = sample_step * local_var[index]  # m_k sigma_k^2 of each sample's class
        shrink = torch.zeros_like(local_mean, dtype=diff.dtype).index_add(0, index, sample_step * diff_sq - weighted_var)
        gamma = self.gamma
        delta_sq = delta.square()
        new_mean = torch.add(local_mean, delta, alpha=1.0 - gamma).view(s, k, c)
        new_var = torch.add(local_var, shrink - delta_sq, alpha=1.0 - gamma).view(s, k, c)
        if gamma:
            num_present = (count > 0).to(diff.dtype).view(s, k).sum(1, keepdim=True)  # (S, 1)
            new_mean = new_mean + gamma * (delta.view(s, k, c).sum(1) / num_present)[:, None]
            # mean over present k of m_k S_k - delta_k^2, where sum_k m_k S_k = sum_k shrink_k +
            # sum_n m_k sigma_k^2 adds back the same per-sample products that shrink took away
            # (so the identity holds to rounding in any precision)
            stream_weighted_var = torch.zeros(s, c, dtype=diff.dtype, device=x.device).index_add(0, stream, weighted_var)
            gap = ((shrink - delta_sq).view(s, k, c).sum(1) + stream_weighted_var) / num_present  # (S, C)
            rate = (step * count).view(s, k).sum(1, keepdim=True) / num_present  # (S, 1): mean_k m_k n_k
            new_var = new_var + gamma * (gap[:, None] - rate[:, :, None] * new_var)
        global_mean = new_mean.mean(1)
        global_var = new_var.mean(1) + new_mean.var(1)  # unbiased over classes, as the official code
        self.propose_update(local_mean=new_mean, local_var=new_var, global_mean=global_mean, global_var=global_var)
        return global_mean, global_var

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_classes={self.num_classes}, eta={self.eta}, gamma={self.gamma}"
