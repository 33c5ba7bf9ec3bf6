"""Normalization layers for continual training."""

from continual.layers.adab2n import (
    AdaB2N,
    TaskBatchContext,
    balanced_sample_weights,
    eta_sequence,
    weighted_batch_stats,
)

__all__ = [
    "AdaB2N",
    "TaskBatchContext",
    "balanced_sample_weights",
    "eta_sequence",
    "weighted_batch_stats",
]
