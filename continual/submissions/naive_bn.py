"""Reference submission: fine-tuning (Avalanche ``Naive``) with plain BatchNorm.

The lower bound of online class-incremental learning: no replay, so earlier classes are
forgotten. Run with ``python -m continual.harness submission=continual/submissions/naive_bn.py``.
"""

from __future__ import annotations

import warnings

import torch
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin

from continual.harness.contract import SubmissionContext
from continual.models import reduced_resnet18
from continual.plugin import NormalizationPlugin


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
            plugins=[NormalizationPlugin("bn")],
            evaluator=EvaluationPlugin(loggers=[]),
        )
