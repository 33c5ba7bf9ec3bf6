"""Where tasks end in an Avalanche stream."""

from __future__ import annotations

from typing import Any

from avalanche.benchmarks.scenarios.online import OnlineCLExperience


def task_end(experience: Any) -> bool | None:
    """Whether ``experience`` is the last one of its task.

    Online sub-experiences answer through ``is_last_subexp`` when the stream grants access to
    task boundaries; ``None`` means the stream hides them. Any other experience is a whole
    task.
    """
    if isinstance(experience, OnlineCLExperience):
        if not experience.access_task_boundaries:
            return None
        return bool(experience.is_last_subexp)
    return True


def require_task_end(experience: Any) -> bool:
    """:func:`task_end`, raising when the stream hides task boundaries."""
    answer = task_end(experience)
    if answer is None:
        raise ValueError(
            "task boundaries are needed: build the online stream with access_task_boundaries=True "
            "(continual.scenarios.online_stream does)"
        )
    return answer
