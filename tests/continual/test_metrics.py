"""A_auc, A_last, A_avg and F_last (docs/METHODS.md §9.5) as functions and as an Avalanche metric."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from continual.metrics import EvaluationSchedule, a_auc, a_avg, a_last, f_last, seen_class_accuracy


def test_seen_class_accuracy_masks_unseen_classes_and_skips_their_samples() -> None:
    logits = torch.tensor(
        [
            [0.0, 1.0, 5.0],  # true 1: class 2 is unseen, so the masked argmax is 1 -> correct
            [2.0, 1.0, 0.0],  # true 1: predicts 0 -> wrong
            [3.0, 0.0, 0.0],  # true 0 -> correct
            [0.0, 0.0, 9.0],  # true 2: unseen class, not counted
        ]
    )
    labels = torch.tensor([1, 1, 0, 2])
    accuracy, per_class = seen_class_accuracy(logits, labels, torch.tensor([True, True, False]))
    assert accuracy == pytest.approx(2 / 3)
    assert per_class.tolist() == pytest.approx([1.0, 0.5, 0.0])


def test_summary_metrics_on_crafted_values() -> None:
    assert a_auc([0.2, 0.4, 0.9]) == pytest.approx(0.5)
    assert a_last([0.8, 0.5, 0.6]) == pytest.approx(0.6)
    assert a_avg([0.8, 0.5, 0.6]) == pytest.approx(19 / 30)
    class_acc = np.array(
        [
            [0.9, 0.7, 0.0, 0.0],  # after task 0: classes 0, 1 seen
            [0.6, 0.8, 0.5, 0.0],  # after task 1
            [0.5, 0.2, 0.6, 0.9],  # after task 2 (final)
        ]
    )
    # Classes 0..2 had positive accuracy before the last task: (0.9-0.5 + 0.8-0.2 + 0.5-0.6) / 3.
    assert f_last(class_acc) == pytest.approx((0.4 + 0.6 - 0.1) / 3)
    assert f_last(class_acc[:1]) == 0.0
    with pytest.raises(ValueError):
        a_auc([])


def test_evaluation_schedule_follows_si_blurry_rule() -> None:
    schedule = EvaluationSchedule(25)
    fired = [seen for seen in range(10, 130, 10) if schedule.due(seen)]
    # seen > next (strict), then next += period once: 30 (>25), 60 (>50), 80 (>75), 110 (>100).
    assert fired == [30, 60, 80, 110]


class CurveModel(nn.Module):
    """Trains nothing; at evaluation it is right on exactly the test samples whose index is
    below ``threshold(seen)`` (index and label are written into the image), so its accuracy
    curve over the stream is known in closed form. The threshold drops in the second task,
    which makes the model forget."""

    @staticmethod
    def threshold(seen: int) -> int:
        return seen // 2 if seen <= 40 else seen // 2 - 30

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(1, num_classes)
        self.num_classes = num_classes
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen += x.shape[0]
            return self.head(torch.zeros(x.shape[0], 1))
        label = (x[:, 0, 0, 0] * 255).round().long()
        index = (x[:, 1, 0, 0] * 255).round().long()
        wrong = (label == 0).long()  # class 1 for label 0, else class 0: always seen
        target = torch.where(index < self.threshold(self.seen), label, wrong)
        return nn.functional.one_hot(target, self.num_classes).float()


def _encoded_images(labels: np.ndarray) -> np.ndarray:
    images = np.zeros((len(labels), 2, 2, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = labels
    images[:, 0, 0, 1] = np.arange(len(labels))
    return images


def test_online_metric_a_auc_equals_definition_on_crafted_curve() -> None:
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    from benchmarks.data.base import ImageArrays
    from continual.metrics.online import OnlineAccuracyMetrics
    from continual.scenarios import class_incremental, online_stream

    train_labels = np.repeat(np.arange(4), 20)  # 2 tasks x 2 classes x 20 samples = 80
    test_labels = np.tile(np.arange(4), 5)  # interleaved, so indices mix classes
    classes = tuple("abcd")
    scenario = class_incremental(
        ImageArrays(_encoded_images(train_labels), train_labels, classes),
        ImageArrays(_encoded_images(test_labels), test_labels, classes),
        n_experiences=2,
    )
    metric = OnlineAccuracyMetrics.from_stream(scenario.test_stream, num_classes=4, eval_period=25)
    model = CurveModel(4)
    strategy = Naive(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), criterion=nn.CrossEntropyLoss(),
        train_mb_size=10, evaluator=EvaluationPlugin(metric, loggers=[]),
    )
    strategy.train(online_stream(scenario.train_stream, 10, seed=0))

    def accuracy(seen: int, seen_classes: set[int]) -> float:
        # Test index i has label i % 4; right iff i < threshold(seen).
        indices = [i for i in range(20) if i % 4 in seen_classes]
        return sum(i < CurveModel.threshold(seen) for i in indices) / len(indices)

    # Checkpoints of the rule "seen > next, next += 25" with 10-sample experiences.
    checkpoints = [(30, {0, 1}), (60, {0, 1, 2, 3}), (80, {0, 1, 2, 3})]
    expected_curve = [accuracy(seen, cls) for seen, cls in checkpoints]
    assert [seen for seen, _ in metric.curve] == [30, 60, 80]
    assert [acc for _, acc in metric.curve] == pytest.approx(expected_curve)
    task_end = [accuracy(40, {0, 1}), accuracy(80, {0, 1, 2, 3})]
    result = metric.result()
    assert result["A_auc"] == pytest.approx(sum(expected_curve) / 3)
    assert result["A_last"] == pytest.approx(task_end[1])
    assert result["A_avg"] == pytest.approx(sum(task_end) / 2)
    assert expected_curve == pytest.approx([0.8, 0.0, 0.5])  # thresholds 15, 0, 10
    # Class accuracies: after task 0 (seen 40, right iff i < 20) classes 0 and 1 are all right;
    # at the end (seen 80, i < 10) class c is right on {c, c+4, c+8} < 10: 3/5, 3/5, 2/5, 2/5.
    # Only classes 0 and 1 were right before: F_last = ((1 - 0.6) + (1 - 0.6)) / 2.
    assert result["F_last"] == pytest.approx(0.4)
    logged = strategy.evaluator.get_all_metrics()
    assert logged["A_auc"][1][-1] == pytest.approx(result["A_auc"])
    assert logged["Top1_Acc_Anytime"][0] == [30, 60, 80]
