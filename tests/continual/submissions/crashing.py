"""Crashes in the middle of training: raises when its third experience starts."""

import warnings

import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin

from continual.models import small_cnn


class Bomb(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.count = 0

    def before_training_exp(self, strategy, **kwargs):
        self.count += 1
        if self.count == 3:
            raise RuntimeError("boom in experience 3")


def make_strategy(context):
    model = small_cnn(context.num_classes, width=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Naive(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
            criterion=torch.nn.CrossEntropyLoss(), train_mb_size=context.experience_size,
            plugins=[Bomb()], evaluator=EvaluationPlugin(loggers=[]),
        )
