"""Reference submission: online experience replay with AdaB²N normalization.

ER (Avalanche ``Naive`` + a reservoir ``ReplayPlugin``: every incoming batch is concatenated
with a replayed mini-batch) on a reduced ResNet-18 whose BatchNorm layers the
``NormalizationPlugin`` turns into AdaB²N (Lyu et al., NeurIPS 2023). Run with
``python -m continual.harness submission=continual/submissions/er_adab2n.py``.

It declares a search space for the two-phase (tuning → evaluation) protocol; the values
arrive as ``context.hparams`` (docs/COMPETITION.md), the defaults below otherwise.
"""

from __future__ import annotations

from avalanche.training import Naive

from continual.harness.contract import SubmissionContext
from continual.plugin import NormalizationPlugin
from continual.replay import ReservoirReplayPlugin
from continual.submissions.common import LEARNING_RATE, online_strategy

MEMORY_SIZE = 200
REPLAY_BATCH = 10
#: Hydra sweep syntax, read by the harness without running this file.
SEARCH_SPACE = {"kappa": "0.2,0.8", "lambd": "0.03,0.3"}


def make_strategy(context: SubmissionContext) -> Naive:
    hparams = {"lr": LEARNING_RATE, "kappa": 0.4, "lambd": 0.1, **context.hparams}
    return online_strategy(
        context,
        [
            NormalizationPlugin("adab2n", num_tasks=context.num_tasks, kappa=hparams["kappa"], lambd=hparams["lambd"]),
            ReservoirReplayPlugin(MEMORY_SIZE, context.experience_size, REPLAY_BATCH),
        ],
        lr=hparams["lr"],
    )
