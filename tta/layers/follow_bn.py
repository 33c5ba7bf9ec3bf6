"""The normalization layer of ``follow`` (:mod:`tta.methods.follow`): TRIBE's class-balanced
statistics, or the test batch's own statistics when the method asks for them."""

from __future__ import annotations

import torch

from tta.layers.balanced_bn import BalancedBatchNorm
from tta.layers.stats import normalize, stream_stats


class FollowBatchNorm(BalancedBatchNorm):
    """:class:`~tta.layers.balanced_bn.BalancedBatchNorm` with one more mode.

    ``batch_stats = True`` (set by the method for one forward): normalize with the mean and
    biased variance of the test batch (per stream), exactly as test-time BN (``norm``) does,
    and change nothing. Every other forward is the balanced layer's (labelled update,
    frozen, or unlabelled moving average).
    """

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.batch_stats = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.batch_stats or self.labels is not None:
            return super().forward(x)
        self.check_input(x)
        mean, var = stream_stats(x, self.num_streams)
        return normalize(x, mean, var, self.weight, self.bias, self.eps)
