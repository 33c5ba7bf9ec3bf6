"""Shared test setup: no model hub, two threads, a private model cache, the seed, and the
small models and batches the tests share."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

# No test may reach a model hub: fail at once instead of retrying for ~46 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, torch.get_num_threads()))
# Trained test models (the digits CNN) are cached in a folder of the system's temporary
# directory, never in the user's ~/.cache/tta; it outlives a run so the next one reuses them.
os.environ["TTA_CACHE_DIR"] = os.environ.get("TTA_TEST_CACHE_DIR") or str(
    Path(tempfile.gettempdir()) / f"tta-test-cache-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread is faster and immune to a busy shared machine (OpenMP
    threads spin-wait on each other; use with ``pytestmark = pytest.mark.usefixtures(...)``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shared_data_dir() -> Path:
    return Path(os.environ.get("TTA_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    from tests import official

    official.current_item = item


# -- small models shared by the tests --------------------------------------------------------
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


def small_gn_cnn(num_classes: int = 4, width: int = 8, seed: int = 0) -> nn.Module:
    """:func:`small_bn_cnn` with GroupNorm (2 groups) in place of BatchNorm."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.GroupNorm(2, width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1),
        nn.GroupNorm(2, width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, num_classes),
    )
    return model.eval()


def small_bcn_cnn(num_classes: int = 4, width: int = 8, seed: int = 0) -> nn.Module:
    """:func:`small_bn_cnn` converted to batch-channel normalization and weight standardization."""
    from tta.layers.bcn import convert_to_bcn_ws

    return convert_to_bcn_ws(small_bn_cnn(num_classes, width, seed), num_groups=4, estimated_stats=True).eval()


def bn_net(width: int = 16, seed: int = 0) -> nn.Module:
    """conv-BN-ReLU x2 and a BatchNorm1d head with non-trivial source statistics; 16x16 maps
    keep the statistics kernels' fast paths on (tests of the hot path)."""
    generator = torch.Generator().manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(width), nn.Linear(width, 5),
    )
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.3)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return net.eval()


def label_readout(num_classes: int = 4) -> nn.Module:
    """BN over K channels, pooling, identity head: a sample's prediction is its channel with the
    largest normalized mean, so a test chooses the labels a label-aware method sees."""
    head = nn.Linear(num_classes, num_classes, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(num_classes))
    return nn.Sequential(nn.BatchNorm2d(num_classes), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).eval()


def labelled_batch(labels: list[int], num_classes: int = 4, seed: int = 0) -> torch.Tensor:
    """Inputs for :func:`label_readout` that it predicts as ``labels``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(len(labels), num_classes, 2, 2, generator=generator) * 0.1
    x[torch.arange(len(labels)), torch.tensor(labels)] += 3.0
    return x
