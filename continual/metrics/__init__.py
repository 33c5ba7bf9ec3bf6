"""Online continual-learning metrics: A_auc, A_last, A_avg, F_last (Si-Blurry, docs/METHODS.md §9.5)."""

from continual.metrics.functional import (
    EvaluationSchedule,
    a_auc,
    a_avg,
    a_last,
    f_last,
    seen_class_accuracy,
)

__all__ = [
    "EvaluationSchedule",
    "a_auc",
    "a_avg",
    "a_last",
    "f_last",
    "seen_class_accuracy",
]
