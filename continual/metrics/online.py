"""Si-Blurry online accuracy metrics in Avalanche's metric system (docs/METHODS.md §9.5).

``OnlineAccuracyMetrics`` is a ``PluginMetric``: add it to an ``EvaluationPlugin``. While the
strategy trains it counts the training samples of every experience; every ``eval_period``
samples it measures the accuracy on the test samples of the classes seen so far (the anytime
accuracy curve behind A_auc), and at the end of every task it measures again and reports
A_auc, A_last, A_avg and F_last. The measurement is its own evaluation loop (model in eval
mode, no gradient, no strategy callbacks), so it changes neither the strategy nor the model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricValue
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from continual.boundaries import task_end
from continual.metrics.functional import (
    EvaluationSchedule,
    a_auc,
    a_avg,
    a_last,
    f_last,
    seen_class_accuracy,
)


def _dataset_targets(dataset: Dataset) -> Tensor:
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise ValueError("the test dataset needs a `targets` attribute")
    return torch.as_tensor(list(targets) if not isinstance(targets, (Tensor, np.ndarray)) else targets).long()


def _experience_classes(experience: Any) -> Tensor:
    return torch.as_tensor(sorted(int(c) for c in experience.dataset.targets.uniques), dtype=torch.long)


class OnlineAccuracyMetrics(PluginMetric[dict]):
    """Anytime accuracy (A_auc), A_last, A_avg and F_last of an online training run.

    Args:
        test_data: a dataset yielding ``(x, y, ...)`` with a ``targets`` attribute (e.g. an
            Avalanche test stream's concatenated dataset, see :meth:`from_stream`).
        num_classes: number of classes C of the model's output.
        eval_period: seen training samples between two anytime evaluations (Si-Blurry: 1000).
        eval_mb_size: evaluation batch size.
        anytime: measure the periodic accuracies (disable to report only task-end metrics).

    Emitted metric names: ``Top1_Acc_Anytime`` (x = seen samples) and, at every task end,
    ``A_auc``, ``A_last``, ``A_avg``, ``F_last`` (x = number of finished tasks).
    """

    def __init__(
        self,
        test_data: Dataset,
        num_classes: int,
        eval_period: int = 1000,
        eval_mb_size: int = 256,
        anytime: bool = True,
    ) -> None:
        super().__init__()
        self.test_data = test_data
        self.test_targets = _dataset_targets(test_data)
        self.num_classes = int(num_classes)
        self.eval_period = int(eval_period)
        self.eval_mb_size = int(eval_mb_size)
        self.anytime = anytime
        self.reset()

    @classmethod
    def from_stream(cls, test_stream: Any, num_classes: int, **kwargs: Any) -> "OnlineAccuracyMetrics":
        """Measure on the union of the experiences of an Avalanche test stream."""
        datasets = [experience.dataset for experience in test_stream]
        data = datasets[0]
        for other in datasets[1:]:
            data = data.concat(other)
        return cls(data, num_classes, **kwargs)

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        self.samples_seen = 0
        self.seen = torch.zeros(self.num_classes, dtype=torch.bool)
        self.schedule = EvaluationSchedule(self.eval_period)
        self.curve: list[tuple[int, float]] = []
        self.task_accuracies: list[float] = []
        self.class_accuracies: list[np.ndarray] = []

    def result(self) -> dict[str, float]:
        """The current values (the anytime curve is in :attr:`curve`)."""
        out: dict[str, float] = {}
        if self.curve:
            out["A_auc"] = a_auc([acc for _, acc in self.curve])
        if self.task_accuracies:
            out["A_last"] = a_last(self.task_accuracies)
            out["A_avg"] = a_avg(self.task_accuracies)
            out["F_last"] = f_last(np.stack(self.class_accuracies))
        return out

    # ------------------------------------------------------------------ measurement
    @torch.no_grad()
    def measure(self, model: torch.nn.Module, device: torch.device | str) -> tuple[float, np.ndarray]:
        """Accuracy and per-class accuracy on the test samples of the seen classes."""
        index = torch.nonzero(self.seen[self.test_targets]).flatten().tolist()
        loader = DataLoader(Subset(self.test_data, index), batch_size=self.eval_mb_size, shuffle=False)
        was_training = model.training
        model.eval()
        try:
            logits = torch.cat([model(batch[0].to(device)).float().cpu() for batch in loader])
        finally:
            model.train(was_training)
        accuracy, per_class = seen_class_accuracy(logits, self.test_targets[index], self.seen)
        return accuracy, per_class.numpy()

    # ------------------------------------------------------------------ callbacks
    # Values accumulate across train() calls (an online loop may call train() once per
    # sub-experience); call reset() to start a new run.
    def after_training_exp(self, strategy: Any) -> list[MetricValue]:
        experience = strategy.experience
        self.samples_seen += len(experience.dataset)
        self.seen[_experience_classes(experience)] = True
        values: list[MetricValue] = []
        if self.anytime and self.schedule.due(self.samples_seen):
            accuracy, _ = self.measure(strategy.model, strategy.device)
            self.curve.append((self.samples_seen, accuracy))
            values.append(MetricValue(self, "Top1_Acc_Anytime", accuracy, self.samples_seen))
        if task_end(experience):
            accuracy, per_class = self.measure(strategy.model, strategy.device)
            self.task_accuracies.append(accuracy)
            self.class_accuracies.append(per_class)
            finished = len(self.task_accuracies)
            for name, value in self.result().items():
                values.append(MetricValue(self, name, value, finished))
        return values

    def __str__(self) -> str:
        return "OnlineAccuracyMetrics"


def online_accuracy_metrics(test_stream: Any, num_classes: int, **kwargs: Any) -> list[PluginMetric]:
    """``[OnlineAccuracyMetrics]`` over ``test_stream``, for ``EvaluationPlugin(*metrics, ...)``."""
    return [OnlineAccuracyMetrics.from_stream(test_stream, num_classes, **kwargs)]
