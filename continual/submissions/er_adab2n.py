"""Reference submission: online experience replay with AdaB²N normalization.

ER (Avalanche ``Naive`` + a reservoir ``ReplayPlugin``: every incoming batch is concatenated
with a replayed mini-batch) on a reduced ResNet-18 whose BatchNorm layers the
``NormalizationPlugin`` turns into AdaB²N (Lyu et al., NeurIPS 2023). Run with
``python -m continual.harness submission=continual/submissions/er_adab2n.py``.
"""

from __future__ import annotations

import warnings

import torch
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin

from continual.harness.contract import SubmissionContext
from continual.models import reduced_resnet18
from continual.plugin import NormalizationPlugin
from continual.replay import ReservoirReplayPlugin

MEMORY_SIZE = 200
REPLAY_BATCH = 10


def make_strategy(context: SubmissionContext) -> Naive:
    model = reduced_resnet18(context.num_classes, nf=20, in_channels=context.input_shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no loggers": the harness does the evaluation
        return Naive(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.03),
            criterion=torch.nn.CrossEntropyLoss(),
            train_mb_size=context.experience_size,
            train_epochs=1,
            eval_mb_size=256,
            device=context.device,
            plugins=[
                NormalizationPlugin("adab2n", num_tasks=context.num_tasks, kappa=0.4, lambd=0.1),
                ReservoirReplayPlugin(MEMORY_SIZE, context.experience_size, REPLAY_BATCH),
            ],
            evaluator=EvaluationPlugin(loggers=[]),
        )
