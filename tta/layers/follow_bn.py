"""The normalization layer of ``follow`` (:mod:`tta.methods.follow`): TRIBE's class-balanced
statistics, or the test batch's own statistics when the method asks for them."""

from __future__ import annotations

from typing import Callable

import torch

from tta.layers.balanced_bn import BalancedBatchNorm
from tta.layers.stats import normalize, stream_stats


class FollowBatchNorm(BalancedBatchNorm):
    """:class:`~tta.layers.balanced_bn.BalancedBatchNorm` with three more controls, each set by
    the method for one step and cleared after it.

    * ``batch_stats = True``: normalize with the mean and biased variance of the test batch
      (per stream), exactly as test-time BN (``norm``) does, and change nothing.
    * ``restart``: a bool per stream; the streams where it is True start this step's forwards
      (frozen and labelled) from the *source* statistics instead of their stored per-class
      and global ones, as if the layer had just been built. Nothing is written here: the
      labelled forward proposes its update from that start, and the step's commit keeps it.
    * ``recentre``: a bool per stream, read only where ``restart`` is True: those streams
      restart by *recentring* instead (:meth:`recentred_state`): the global statistics
      become the source's as above, but each class keeps its offset from the class mixture.
    * ``watch``: a callable that gets the layer's input before anything else happens (the
      method reads the first layer's input with it and sets ``restart`` on every layer).
    * ``keep_batch_var = True``: a ``batch_stats`` forward leaves the test batch's variance
      per stream and channel, ``(S, C)`` float32, in ``batch_var`` (the method's restart
      signal over every layer reads it; the method clears it).

    Every other forward is the balanced layer's (labelled update, frozen, or unlabelled
    moving average).
    """

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.batch_stats = False
        self.restart: torch.Tensor | None = None
        self.recentre: torch.Tensor | None = None
        self.watch: Callable[[torch.Tensor], None] | None = None
        self.keep_batch_var = False
        self.batch_var: torch.Tensor | None = None

    def stored_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        stored = super().stored_state()
        if self.restart is None:
            return stored
        source_mean, source_var = self.require_source_stats()
        start_mean, start_var = source_mean.expand_as(stored[0]), source_var.expand_as(stored[1])
        if self.recentre is not None:
            kept_mean, kept_var = self.recentred_state(*stored)
            keep = self.recentre.to(source_mean.device).view(-1, 1, 1)
            start_mean, start_var = torch.where(keep, kept_mean, start_mean), torch.where(keep, kept_var, start_var)
        fresh = self.restart.to(source_mean.device)
        local, global_ = fresh.view(-1, 1, 1), fresh.view(-1, 1)
        return (
            torch.where(local, start_mean, stored[0]),
            torch.where(local, start_var, stored[1]),
            torch.where(global_, source_mean, stored[2]),
            torch.where(global_, source_var, stored[3]),
        )

    def recentred_state(
        self, local_mean: torch.Tensor, local_var: torch.Tensor, global_mean: torch.Tensor, global_var: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-class statistics ``(S, K, C)`` mapped, per stream and channel, by the affine map
        that takes the class mixture's global mean and variance to the source's:
        ``mu_k' = mu_s + (mu_k - mu_g) r`` and ``sigma_k'^2 = sigma_k^2 r^2`` with
        ``r = sqrt(sigma_s^2 / sigma_g^2)``. Since ``mu_g`` is the mean of the ``mu_k`` and
        ``sigma_g^2`` their mean variance plus the variance of the means, the mapped classes'
        global statistics are exactly ``mu_s`` and ``sigma_s^2``. A channel whose global
        variance is zero takes the source statistics for every class."""
        source_mean, source_var = self.require_source_stats()
        valid = global_var > 0
        ratio = torch.where(valid, source_var / global_var.clamp_min(torch.finfo(global_var.dtype).tiny), 1.0)
        kept_mean = source_mean + (local_mean - global_mean[:, None]) * ratio.sqrt()[:, None]
        kept_var = local_var * ratio[:, None]
        valid = valid[:, None]
        return torch.where(valid, kept_mean, source_mean), torch.where(valid, kept_var, source_var)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.watch is not None:
            self.check_input(x)
            self.watch(x)
        if not self.batch_stats or self.labels is not None:
            return super().forward(x)
        self.check_input(x)
        mean, var = stream_stats(x, self.num_streams)
        if self.keep_batch_var:
            self.batch_var = var.detach()
        return normalize(x, mean, var, self.weight, self.bias, self.eps)
