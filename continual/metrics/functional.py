"""Online continual-learning accuracy metrics as plain functions (docs/METHODS.md §9.5).

Definitions follow Si-Blurry (Moon et al., ICCV 2023; official ``methods/_trainer.py``):

* accuracy at an evaluation point is measured on the test samples of the classes seen so
  far, with the logits of unseen classes masked out (set to −∞) before the argmax;
* **A_auc**: mean of the accuracies measured every ``eval_period`` seen training samples
  (the i-Blurry area under the accuracy curve with a constant sample step);
* **A_last**: accuracy at the end of the last task; **A_avg**: mean of the end-of-task
  accuracies;
* **F_last**: over the classes with a positive accuracy at some earlier task end, the mean
  of (best earlier end-of-task class accuracy − final class accuracy). As in the official
  code, a class whose accuracy was 0 at every earlier task end is left out.

These functions are shared by the Avalanche metric (:mod:`continual.metrics.online`) and the
competition harness, so both score identically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class EvaluationSchedule:
    """When to measure anytime accuracy: Si-Blurry's rule ``seen > next`` then ``next += period``.

    One evaluation per check at most, as in the official loop (a batch that jumps over two
    checkpoints triggers one evaluation and the next one is one period later).
    """

    period: int
    next_point: int = 0

    def __post_init__(self) -> None:
        if self.period < 1:
            raise ValueError(f"eval period must be >= 1 sample, got {self.period}")
        if self.next_point == 0:
            self.next_point = self.period

    def due(self, samples_seen: int) -> bool:
        """True (and advance) when an evaluation is due after ``samples_seen`` samples."""
        if samples_seen > self.next_point:
            self.next_point += self.period
            return True
        return False


def seen_class_accuracy(logits: Tensor, labels: Tensor, seen: Tensor) -> tuple[float, Tensor]:
    """Accuracy on the samples of seen classes with unseen-class logits masked.

    Args:
        logits: ``(N, C)`` scores.
        labels: ``(N,)`` true classes.
        seen: ``(C,)`` bool mask of the classes seen so far.

    Returns:
        ``(accuracy, per_class)`` where ``per_class`` is ``(C,)`` float64 with the accuracy of
        each seen class that has test samples and 0 elsewhere (as the official ``cls_acc``).
    """
    seen = seen.to(device=logits.device, dtype=torch.bool)
    labels = labels.to(logits.device).long()
    keep = seen[labels]
    if not bool(keep.any()):
        raise ValueError("no test sample belongs to a seen class")
    masked = logits[keep].float().masked_fill(~seen, float("-inf"))
    correct = (masked.argmax(dim=1) == labels[keep]).double()
    num_classes = seen.numel()
    hits = torch.bincount(labels[keep], weights=correct, minlength=num_classes)
    totals = torch.bincount(labels[keep], minlength=num_classes).double()
    per_class = torch.where(totals > 0, hits / totals.clamp_min(1), torch.zeros_like(hits))
    return float(correct.mean()), per_class.cpu()


def a_auc(accuracies: Sequence[float]) -> float:
    """Area under the anytime-accuracy curve with a constant sample step: their mean."""
    if len(accuracies) == 0:
        raise ValueError("A_auc needs at least one periodic accuracy")
    return float(np.mean(np.asarray(accuracies, dtype=np.float64)))


def a_last(task_end_accuracies: Sequence[float]) -> float:
    """Accuracy after the last task."""
    if len(task_end_accuracies) == 0:
        raise ValueError("A_last needs at least one task-end accuracy")
    return float(task_end_accuracies[-1])


def a_avg(task_end_accuracies: Sequence[float]) -> float:
    """Mean of the end-of-task accuracies."""
    if len(task_end_accuracies) == 0:
        raise ValueError("A_avg needs at least one task-end accuracy")
    return float(np.mean(np.asarray(task_end_accuracies, dtype=np.float64)))


def f_last(class_accuracies: np.ndarray | Sequence[Sequence[float]]) -> float:
    """Last forgetting from the ``(tasks, classes)`` end-of-task class accuracies.

    Returns 0.0 when fewer than two task ends were recorded or no class qualifies.
    """
    matrix = np.asarray(class_accuracies, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"class accuracies must be (tasks, classes), got shape {matrix.shape}")
    if matrix.shape[0] < 2:
        return 0.0
    best_before = matrix[:-1].max(axis=0)
    qualifies = best_before > 0
    if not qualifies.any():
        return 0.0
    return float(np.mean(best_before[qualifies] - matrix[-1][qualifies]))
