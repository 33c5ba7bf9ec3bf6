"""What a submission receives: the context handed to its ``make_strategy`` factory.

A submission is a Python file with

    def make_strategy(context: SubmissionContext) -> avalanche.training.templates.SupervisedTemplate

and optionally

    def predict(strategy, images: torch.Tensor) -> torch.Tensor | numpy.ndarray

which maps float32 images ``(N, C, H, W)`` in [0, 1] to scores ``(N, num_classes)``
(default: the strategy's model in eval mode). See docs/COMPETITION.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SubmissionContext:
    """Facts about the stream and the budgets, all a submission may know in advance.

    Attributes:
        num_classes: number of output classes C (labels are 0..C-1).
        num_tasks: number of tasks T in the stream.
        input_shape: ``(channels, height, width)`` of every image.
        experience_size: samples per training experience (the last of a task may be shorter).
        seed: the run's seed (seed your own randomness with it).
        device: the torch device to train on.
        threads: CPU threads the process may use.
        scratch_dir: the only folder the submission may write.
        time_budget_s: wall time for training and all predictions.
        memory_budget_mb: memory the submission may allocate.
        hparams: the hyperparameter values of this run, drawn from the submission's declared
            ``SEARCH_SPACE`` by the tuning phase, or the frozen ones in the evaluation phase
            (empty for a single-phase run; see docs/COMPETITION.md).
    """

    num_classes: int
    num_tasks: int
    input_shape: tuple[int, int, int]
    experience_size: int
    seed: int
    device: str
    threads: int
    scratch_dir: str
    time_budget_s: float
    memory_budget_mb: int
    hparams: dict[str, Any] = field(default_factory=dict)
