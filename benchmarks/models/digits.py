"""A small CNN source model for the built-in digits dataset, trained once and cached."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.data.digits import load_digits
from benchmarks.models.cache import atomic_torch_save, cache_dir
from benchmarks.models.layers import norm_layer

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
    norm: str = "bn"
    width: int = 32
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    seed: int = 0
    size: int = 32

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:12]


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels per image (zero padding, then a per-sample crop)."""
    pad = 2
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
    cols = (dx[:, None] + torch.arange(w)).view(n, 1, 1, w).expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def train_digits_model(config: DigitsTrainConfig = DigitsTrainConfig(), *, progress: bool = False) -> tuple[DigitsCNN, float]:
    """Train a :class:`DigitsCNN` on the clean digits training split; returns (model, test acc)."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    train = load_digits("train", config.size)
    test = load_digits("test", config.size)
    x_train, y_train = train.to_tensor(), torch.from_numpy(train.labels)
    model = DigitsCNN(train.num_classes, config.width, config.norm)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay, nesterov=True)
    steps_per_epoch = -(-len(train) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.epochs * steps_per_epoch)
    epochs = range(config.epochs)
    if progress:
        from tqdm import tqdm

        epochs = tqdm(epochs, desc="training digits source model", leave=False)
    model.train()
    for _ in epochs:
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), config.batch_size):
            index = order[start : start + config.batch_size]
            inputs = _augment(x_train[index], generator)
            loss = F.cross_entropy(model(inputs), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(test.to_tensor()).argmax(1) == torch.from_numpy(test.labels)).float().mean().item()
    return model, accuracy


def digits_source_model(config: DigitsTrainConfig = DigitsTrainConfig(), *, progress: bool = False) -> DigitsCNN:
    """The cached digits source model for ``config``, trained on first use (~10-20 s on 2 cores)."""
    path = cache_dir() / "models" / f"digits_cnn_{config.norm}_{config.key()}.pt"
    model = DigitsCNN(10, config.width, config.norm)
    if path.exists():
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(checkpoint["state_dict"])
            return model.eval()
        except Exception as error:  # a corrupt cache entry is retrained, not fatal
            logger.warning("ignoring unreadable cached model %s (%s)", path, error)
    model, accuracy = train_digits_model(config, progress=progress)
    logger.info("trained digits source model: clean test accuracy %.3f", accuracy)
    atomic_torch_save({"state_dict": model.state_dict(), "config": asdict(config), "clean_accuracy": accuracy}, path)
    return model.eval()
