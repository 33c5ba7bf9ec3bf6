"""Score validated predictions against the labels only the harness holds (ALGORITHMS.md §9.5)."""

from __future__ import annotations

import numpy as np
import torch

from continual.harness.task import CompetitionTask, Segment
from continual.metrics.functional import a_auc, a_avg, a_last, f_last, seen_class_accuracy


def score(task: CompetitionTask, segments: list[Segment], predictions: dict[int, np.ndarray]) -> dict[str, float | None]:
    """A_auc, A_last, A_avg and F_last of one run.

    Every evaluation point is scored on the test samples of the classes seen in training up
    to that point, with the scores of unseen classes masked. Anytime points are those after
    every ``eval_period`` samples; task-end points close each task.

    Raises:
        ValueError: an evaluation point has no predictions.
    """
    labels = torch.from_numpy(task.test_labels)
    seen = np.zeros(task.num_classes, dtype=bool)
    anytime, task_end, class_acc = [], [], []
    evaluation = 0
    for segment in segments:
        seen[np.unique(task.train_labels[segment.start : segment.end])] = True
        if not segment.evaluates:
            continue
        if evaluation not in predictions:
            raise ValueError(f"no predictions for evaluation {evaluation}")
        accuracy, per_class = seen_class_accuracy(
            torch.from_numpy(predictions[evaluation]), labels, torch.from_numpy(seen.copy())
        )
        if segment.periodic_eval:
            anytime.append(accuracy)
        if segment.last_in_task:
            task_end.append(accuracy)
            class_acc.append(per_class.numpy())
        evaluation += 1
    return {
        "A_auc": a_auc(anytime) if anytime else None,
        "A_last": a_last(task_end),
        "A_avg": a_avg(task_end),
        "F_last": f_last(np.stack(class_acc)),
        "num_anytime_evaluations": len(anytime),
    }
