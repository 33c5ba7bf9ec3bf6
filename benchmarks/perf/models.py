"""The models of the performance table: a CIFAR ResNet, ResNet-50 and a ViT.

Weights are random (speed does not depend on them); BatchNorm running statistics are
calibrated on a few random batches so statistics methods see realistic source statistics.
On the CPU the ImageNet models run at reduced resolution (2 cores cannot push ResNet-50 at
224x224 and batch 256 through a sweep): ResNet-50 at 64x64 and a ViT-Tiny with 4x4 patches
on 32x32 inputs (64 tokens, the CIFAR-ViT setting). On CUDA they run at 224x224 (16x16
patches). Both resolutions can be overridden from the command line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from benchmarks.models.cifar_resnet import cifar_resnet


@dataclass(frozen=True)
class ModelSpec:
    """How to build one benchmark model, and its input size per device type."""

    name: str
    label: str
    build: Callable[[int], nn.Module]  # input resolution -> model
    cpu_size: int
    cuda_size: int
    has_batch_norm: bool

    def size(self, device: torch.device, override: int | None = None) -> int:
        if override:
            return override
        return self.cuda_size if device.type == "cuda" else self.cpu_size


def _timm(name: str, **kwargs: object) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, **kwargs)


def _resnet50(size: int) -> nn.Module:
    return _timm("resnet50", num_classes=1000)


def _vit(size: int) -> nn.Module:
    # ViT-Tiny (192 wide, 12 blocks, 3 heads); 16x16 patches at 224 px, 4x4 patches below.
    patch = 16 if size >= 112 else 4
    return _timm("vit_tiny_patch16_224", img_size=size, patch_size=patch, num_classes=1000)


def _cifar_resnet(size: int) -> nn.Module:
    return cifar_resnet(depth=26, num_classes=10)


MODELS: dict[str, ModelSpec] = {
    "cifar_resnet26": ModelSpec("cifar_resnet26", "CIFAR ResNet-26", _cifar_resnet, 32, 32, True),
    "resnet50": ModelSpec("resnet50", "ResNet-50 (timm)", _resnet50, 64, 224, True),
    "vit_tiny": ModelSpec("vit_tiny", "ViT-Tiny (timm, no BN)", _vit, 32, 224, False),
}


@torch.no_grad()
def calibrate_batch_norm(model: nn.Module, size: int, batches: int = 2, batch_size: int = 16, seed: int = 0) -> None:
    """Set BatchNorm running statistics to the cumulative statistics of random batches."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    saved = [(m, m.momentum) for m in norms]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # cumulative average
    model.train()
    for _ in range(batches):
        x = torch.rand(batch_size, 3, size, size, generator=generator).to(device)
        model(x)
    for module, momentum in saved:
        module.momentum = momentum
    model.eval()


def build_model(name: str, device: torch.device, size: int, seed: int = 0) -> nn.Module:
    """A benchmark model in eval mode on ``device`` with calibrated BN statistics."""
    try:
        spec = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}") from None
    torch.manual_seed(seed)
    model = spec.build(size).to(device).eval()
    calibrate_batch_norm(model, size, seed=seed)
    return model
