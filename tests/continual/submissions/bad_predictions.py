"""Returns scores of the wrong shape (one column too many)."""

import warnings

import torch
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin

from continual.models import small_cnn


def make_strategy(context):
    model = small_cnn(context.num_classes, width=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Naive(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
            criterion=torch.nn.CrossEntropyLoss(), train_mb_size=context.experience_size,
            evaluator=EvaluationPlugin(loggers=[]),
        )


def predict(strategy, images):
    return torch.zeros(images.shape[0], 11)
