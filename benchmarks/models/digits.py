"""A small CNN source model for the built-in digits dataset, trained once and cached."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from benchmarks.data.digits import load_digits
from benchmarks.files import atomic_torch_save
from benchmarks.models.cache import cache_dir
from benchmarks.models.layers import norm_layer
from benchmarks.training.trainer import TrainConfig, train_classifier

logger = logging.getLogger(__name__)


class DigitsCNN(nn.Module):
    """Four conv-norm-ReLU blocks (32x32 -> 4x4), global pooling and a linear head.

    ``forward_features`` / ``forward_head(pre_logits=True)`` follow timm's convention so
    feature-based methods (LAME) read the penultimate features without hooks.
    """

    def __init__(self, num_classes: int = 10, width: int = 32, norm: str = "bn") -> None:
        super().__init__()
        channels = [3, width, width, 2 * width, 4 * width]
        blocks: list[nn.Module] = []
        for index, (cin, cout) in enumerate(zip(channels[:-1], channels[1:])):
            stride = 1 if index == 0 else 2
            blocks += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), norm_layer(norm, cout), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(channels[-1], num_classes)
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@dataclass(frozen=True)
class DigitsTrainConfig:
    """The digits source model's options (the ``model.kwargs`` of the ``digits`` preset).

    Training is the shared recipe of :func:`benchmarks.training.train_classifier`;
    :meth:`train_config` fills in the digits-specific part (shifts of up to 2 pixels with
    zero padding, no flips, fp32).
    """

    norm: str = "bn"
    width: int = 32
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    seed: int = 0
    size: int = 32

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs, batch_size=self.batch_size, optimizer="sgd", lr=self.lr, weight_decay=self.weight_decay,
            warmup_fraction=0.3, crop_padding=2, flip=False, padding_mode="zeros", amp="none", channels_last=False,
            eval_every=10, seed=self.seed,
        )

    def key(self) -> str:
        # The full recipe is part of the key: a change of the shared trainer's settings
        # retrains instead of reusing a model trained another way.
        blob = json.dumps({**asdict(self), "recipe": asdict(self.train_config())}, sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:12]


def train_digits_model(config: DigitsTrainConfig = DigitsTrainConfig(), *, progress: bool = False) -> tuple[DigitsCNN, float]:
    """Train a :class:`DigitsCNN` on the clean digits training split; returns (model, test acc).

    ``progress``: a tqdm bar; a log line per epoch is written either way (logger
    ``benchmarks.training.trainer``, level INFO).
    """
    train = load_digits("train", config.size)
    test = load_digits("test", config.size)
    torch.manual_seed(config.seed)
    model = DigitsCNN(train.num_classes, config.width, config.norm)
    result = train_classifier(model, train, test, config.train_config(), progress=progress)
    return model.eval(), result.clean_accuracy


def digits_cache_file(config: DigitsTrainConfig = DigitsTrainConfig()) -> Path:
    """Where :func:`digits_source_model` caches the model trained with ``config``."""
    return cache_dir() / "models" / f"digits_cnn_{config.norm}_{config.key()}.pt"


def digits_source_model(config: DigitsTrainConfig = DigitsTrainConfig(), *, progress: bool = False) -> DigitsCNN:
    """The cached digits source model for ``config``, trained on first use (30 epochs: about
    40 s of CPU on one thread)."""
    path = digits_cache_file(config)
    model = DigitsCNN(10, config.width, config.norm)
    if path.exists():
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(checkpoint["state_dict"])
            return model.eval()
        except Exception as error:  # a corrupt cache entry is retrained, not fatal
            logger.warning("ignoring unreadable cached model %s (%s)", path, error)
    logger.info("training the digits source model (first use; %d epochs), cached as %s", config.epochs, path)
    model, accuracy = train_digits_model(config, progress=progress)
    logger.info("trained digits source model: clean test accuracy %.3f", accuracy)
    atomic_torch_save({"state_dict": model.state_dict(), "config": asdict(config), "clean_accuracy": accuracy}, path)
    return model.eval()
