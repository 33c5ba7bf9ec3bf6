"""Reference submission: fine-tuning (Avalanche ``Naive``) with plain BatchNorm.

The lower bound of online class-incremental learning: no replay, so earlier classes are
forgotten. Run with ``python -m continual.harness submission=continual/submissions/naive_bn.py``.
"""

from __future__ import annotations

from avalanche.training import Naive

from continual.harness.contract import SubmissionContext
from continual.plugin import NormalizationPlugin
from continual.submissions.common import online_strategy


def make_strategy(context: SubmissionContext) -> Naive:
    return online_strategy(context, [NormalizationPlugin("bn")])
