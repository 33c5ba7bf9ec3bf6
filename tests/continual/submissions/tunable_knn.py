"""A tunable, fast submission (no network training): ``mode=knn`` predicts the label of the
nearest training sample seen so far (raw pixels), ``mode=constant`` predicts nothing useful.
Prints ``HPARAMS <json>`` so the test can see which values each run received."""

import json

import torch

SEARCH_SPACE = {"mode": ["constant", "knn"]}


class Memory:
    def __init__(self, hparams):
        self.hparams = hparams
        self.images, self.labels = [], []

    def train(self, experience):
        for image, label, *_ in experience.dataset:
            self.images.append(image.flatten())
            self.labels.append(int(label))


def make_strategy(context):
    print("HPARAMS " + json.dumps(context.hparams, sort_keys=True), flush=True)
    return Memory(context.hparams)


def predict(strategy, images):
    scores = torch.zeros(images.shape[0], 10)
    if strategy.hparams.get("mode") == "knn" and strategy.labels:
        distances = torch.cdist(images.flatten(1), torch.stack(strategy.images))
        scores[torch.arange(len(images)), torch.tensor(strategy.labels)[distances.argmin(1)]] = 1.0
    return scores
