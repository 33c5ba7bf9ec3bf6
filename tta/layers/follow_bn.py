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
    * ``watch``: a callable that gets the layer's input before anything else happens (the
      method reads the first layer's input with it and sets ``restart`` on every layer).

    Every other forward is the balanced layer's (labelled update, frozen, or unlabelled
    moving average).
    """

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.batch_stats = False
        self.restart: torch.Tensor | None = None
        self.watch: Callable[[torch.Tensor], None] | None = None

    def stored_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        stored = super().stored_state()
        if self.restart is None:
            return stored
        source_mean, source_var = self.require_source_stats()
        fresh = self.restart.to(source_mean.device)
        local, global_ = fresh.view(-1, 1, 1), fresh.view(-1, 1)
        return (
            torch.where(local, source_mean, stored[0]),
            torch.where(local, source_var, stored[1]),
            torch.where(global_, source_mean, stored[2]),
            torch.where(global_, source_var, stored[3]),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.watch is not None:
            self.check_input(x)
            self.watch(x)
        if not self.batch_stats or self.labels is not None:
            return super().forward(x)
        self.check_input(x)
        mean, var = stream_stats(x, self.num_streams)
        return normalize(x, mean, var, self.weight, self.bias, self.eps)
