"""The set-up both reference submissions share: reduced ResNet-18, SGD, online Avalanche ``Naive``."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin

from continual.harness.contract import SubmissionContext
from continual.models import reduced_resnet18

#: width of the reduced ResNet-18 and SGD learning rate of the reference submissions.
WIDTH = 20
LEARNING_RATE = 0.03


def online_strategy(context: SubmissionContext, plugins: Sequence[Any], lr: float = LEARNING_RATE) -> Naive:
    """One pass of SGD (no momentum) over every experience the harness sends, with
    ``plugins`` (normalization, replay, ...). The harness evaluates, so no loggers."""
    model = reduced_resnet18(context.num_classes, nf=WIDTH, in_channels=context.input_shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no loggers": the harness does the evaluation
        return Naive(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=lr),
            criterion=torch.nn.CrossEntropyLoss(),
            train_mb_size=context.experience_size,
            train_epochs=1,
            eval_mb_size=256,
            device=context.device,
            plugins=list(plugins),
            evaluator=EvaluationPlugin(loggers=[]),
        )
