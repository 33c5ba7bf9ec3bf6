"""Experience replay for online streams: Avalanche's ReplayPlugin over a reservoir buffer.

Online ER (Chaudhry et al., 2019; the ER baselines of AdaB²N and Si-Blurry) keeps a
reservoir sample of the whole stream and concatenates a replay mini-batch to every incoming
batch. Avalanche's ``ReplayPlugin`` does the concatenation (``ReplayDataLoader``) and
updates its buffer after every experience; on an online stream of small sub-experiences with
a ``ReservoirSamplingBuffer`` that is online ER.
"""

from __future__ import annotations

from typing import Any

from avalanche.training.plugins import ReplayPlugin
from avalanche.training.storage_policy import ReservoirSamplingBuffer


class ReservoirReplayPlugin(ReplayPlugin):
    """``ReplayPlugin`` with a reservoir buffer of ``mem_size`` samples.

    Args:
        mem_size: buffer size (AdaB²N's Split CIFAR-10 runs: 500 or 2000).
        batch_size: incoming samples per step (None: the strategy's ``train_mb_size``).
        batch_size_mem: replayed samples per step (official AdaB²N: 32).
    """

    def __init__(self, mem_size: int, batch_size: int | None = None, batch_size_mem: int | None = None) -> None:
        super().__init__(
            mem_size=mem_size, batch_size=batch_size, batch_size_mem=batch_size_mem,
            storage_policy=ReservoirSamplingBuffer(mem_size),
        )

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        # Same update as ReplayPlugin, through the non-deprecated storage-policy entry point.
        self.storage_policy.post_adapt(strategy, strategy.experience)
