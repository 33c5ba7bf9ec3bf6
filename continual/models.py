"""Backbones of the online continual-learning literature, sized for CPUs.

``reduced_resnet18`` is the CIFAR-style ResNet-18 (3x3 stem, no max-pool, BasicBlocks
[2, 2, 2, 2]) with ``nf`` base channels: nf = 64 is the mammoth backbone of the AdaB²N
experiments (Lyu et al., NeurIPS 2023; docs/METHODS.md §6), nf = 20 the "reduced ResNet-18"
of GEM / online CL papers. ``small_cnn`` is a 4-block CNN for tests and quick demos. Every
normalization layer is ``nn.BatchNorm2d`` so that :func:`continual.convert.convert_norm`
can swap it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stride-1 stem, four stages, global average pool, linear head."""

    def __init__(self, num_blocks: tuple[int, ...], num_classes: int, nf: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, nf, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        stages, in_planes = [], nf
        for index, blocks in enumerate(num_blocks):
            planes = nf * 2**index
            stride = 1 if index == 0 else 2
            layers = []
            for block in range(blocks):
                layers.append(BasicBlock(in_planes, planes, stride if block == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.classifier = nn.Linear(in_planes, num_classes)

    def features(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def reduced_resnet18(num_classes: int = 10, nf: int = 20, in_channels: int = 3) -> ResNet:
    """ResNet-18 with ``nf`` base channels (20: "reduced", ~1.1 M parameters; 64: full)."""
    return ResNet((2, 2, 2, 2), num_classes, nf, in_channels)


def small_cnn(num_classes: int = 10, width: int = 16, in_channels: int = 3) -> nn.Sequential:
    """Four conv-BN-ReLU blocks (two downsampling) and a linear head; fast on a CPU."""
    w = width
    return nn.Sequential(
        nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
        nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
        nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, num_classes),
    )
