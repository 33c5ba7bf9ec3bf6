"""Small models shared by the tta tests."""

from __future__ import annotations

import torch
from torch import nn


def small_bn_cnn(num_classes: int = 4, width: int = 6, seed: int = 0) -> nn.Module:
    """conv-BN-ReLU x2, pooling, linear; BN statistics set to non-trivial source values."""
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, num_classes),
    )
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.3)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
    return model.eval()


def batches(n: int, batch_size: int = 8, shape=(3, 8, 8), seed: int = 1, shift: float = 0.5) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch_size, *shape, generator=generator) * 1.5 + shift for _ in range(n)]
