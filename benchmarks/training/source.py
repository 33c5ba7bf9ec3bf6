"""The ``train_source`` job: data + architecture + recipe from a config, checkpoint out.

Used by ``scripts/train_source.py`` (Hydra); callable directly with any mapping that has the
keys of ``conf/train_source.yaml``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.data.base import ImageArrays
from benchmarks.training.checkpoint import CheckpointDecision, save_if_better
from benchmarks.training.trainer import TrainConfig, TrainResult, train_classifier

logger = logging.getLogger(__name__)

DATA_SOURCES = ("cifar10_jpeg", "cifar10", "digits")


def load_training_data(source: str, root: str | None = None) -> tuple[ImageArrays, ImageArrays]:
    """(train, test) clean splits of a data source as uint8 ``ImageArrays``."""
    if source == "cifar10_jpeg":
        from benchmarks.data import cifar10_jpeg

        return cifar10_jpeg("train", shared_dir=root), cifar10_jpeg("test", shared_dir=root)
    if source == "cifar10":
        from benchmarks.data import load_cifar

        if root is None:
            raise ValueError("data.root (a torchvision CIFAR-10 root) is required for data.source=cifar10")
        return load_cifar("cifar10", root, train=True), load_cifar("cifar10", root, train=False)
    if source == "digits":
        from benchmarks.data import load_digits

        return load_digits("train", size=32), load_digits("test", size=32)
    raise ValueError(f"data.source must be one of {DATA_SOURCES}, got {source!r}")


def _limit(data: ImageArrays, limit: int | None, seed: int) -> ImageArrays:
    """A fixed random subset (the JPEG folders are sorted by class, so never the first N)."""
    if limit is None or limit >= len(data):
        return data
    if limit < 1:
        raise ValueError(f"data limits must be >= 1, got {limit}")
    keep = np.sort(np.random.default_rng(seed).permutation(len(data))[:limit])
    return data.subset(keep)


class AlreadyTrained(RuntimeError):
    """The repository already holds this model's weights (weights/MANIFEST.json)."""


def train_source(cfg: Mapping[str, Any]) -> tuple[TrainResult, CheckpointDecision]:
    """Train the configured source model and save it (see :func:`save_if_better`).

    Raises:
        AlreadyTrained: ``weights/`` holds this model (same name, trained on the same full
            data source) and ``force`` is not set (a model is trained once, then committed
            and reused everywhere; smoke runs on other or limited data are not refused).
    """
    from benchmarks.app.models import resolve_factory
    from benchmarks.models.weights import committed_path, manifest

    model_cfg = cfg["source_model"]
    data_cfg = cfg.get("data") or {}
    committed = committed_path(str(model_cfg["name"]))
    entry = manifest()["models"].get(str(model_cfg["name"]), {})
    same_data = (
        (entry.get("training", {}).get("data") or {}).get("source") == data_cfg.get("source", "cifar10_jpeg")
        and data_cfg.get("limit_train") is None and data_cfg.get("limit_test") is None
    )
    if committed is not None and same_data and not cfg.get("force"):
        raise AlreadyTrained(
            f"{committed} is committed (weights/MANIFEST.json): every result uses it; pass force=true only "
            "to train a replacement on purpose"
        )
    data_cfg = cfg["data"]
    train_config = TrainConfig(**dict(model_cfg.get("train") or {}))
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    train, test = load_training_data(data_cfg["source"], data_cfg.get("root"))
    train = _limit(train, data_cfg.get("limit_train"), train_config.seed)
    test = _limit(test, data_cfg.get("limit_test"), train_config.seed)
    torch.manual_seed(train_config.seed)
    kwargs = dict(model_cfg.get("kwargs") or {})
    model = resolve_factory(model_cfg["arch"])(num_classes=train.num_classes, **kwargs)
    logger.info(
        "training %s (%s, %d parameters) on %d %s images, testing on %d",
        model_cfg["name"], model_cfg["arch"], sum(p.numel() for p in model.parameters()),
        len(train), data_cfg["source"], len(test),
    )
    result = train_classifier(model, train, test, train_config, device=cfg.get("device", "cpu"), progress=bool(cfg.get("progress", True)))
    record = {
        "name": model_cfg["name"],
        "arch": model_cfg["arch"],
        "kwargs": kwargs,
        "num_classes": train.num_classes,
        "classes": list(train.classes),
        "train": dataclasses.asdict(train_config),
        "data": {"source": data_cfg["source"], "n_train": len(train), "n_test": len(test)},
        "device": str(cfg.get("device", "cpu")),
        "threads": torch.get_num_threads(),
        "seconds": result.seconds,
    }
    model.to("cpu", memory_format=torch.contiguous_format)
    decision = save_if_better(
        Path(cfg["output"]), model.state_dict(), result.clean_accuracy, record, result.history, force=bool(cfg.get("force"))
    )
    logger.info(decision.message)
    return result, decision
