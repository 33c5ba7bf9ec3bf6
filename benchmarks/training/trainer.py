"""Supervised training of a source classifier on uint8 image arrays.

One recipe for every built-in source model: mini-batch SGD (Nesterov) or AdamW with a
one-cycle learning-rate schedule (Smith & Topin 2019), the standard CIFAR crop/flip
augmentation, optional label smoothing and bf16/fp16 autocast with fp32 master weights.
The data stay uint8 on the training device and are converted one batch at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.data.base import ImageArrays
from benchmarks.training.augment import PADDING_MODES, random_crop_flip

logger = logging.getLogger(__name__)

_AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "sgd"  # "sgd" (Nesterov momentum) or "adamw"
    lr: float = 0.2  # peak of the one-cycle schedule
    # AdamW's beta1. SGD's momentum is cycled by the one-cycle schedule instead (OneCycleLR's
    # defaults: 0.95 -> 0.85 while the lr rises, back to 0.95 as it decays)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.15  # share of the steps spent rising to the peak
    label_smoothing: float = 0.0
    crop_padding: int = 4
    flip: bool = True  # random horizontal flips (off for digits)
    padding_mode: str = "reflect"  # of the random crop: "reflect" (CIFAR) or "zeros" (digits)
    amp: str = "bf16"  # "none", "bf16" or "fp16" (fp16 only on CUDA)
    channels_last: bool = True
    eval_every: int = 5  # epochs between test evaluations (the last epoch is always evaluated)
    eval_batch_size: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("epochs, batch_size and eval_batch_size must be >= 1")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {self.padding_mode!r}")
        if self.amp not in _AMP_DTYPES:
            raise ValueError(f"amp must be one of {sorted(_AMP_DTYPES)}, got {self.amp!r}")
        if not 0.0 < self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in (0, 1), got {self.warmup_fraction}")
        if self.lr <= 0 or self.weight_decay < 0 or not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("need lr > 0, weight_decay >= 0 and label_smoothing in [0, 1)")


@dataclasses.dataclass
class TrainResult:
    clean_accuracy: float
    history: list[dict[str, float]]
    seconds: float


def _as_input(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    x = images.float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _uint8_tensor(data: ImageArrays, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if data.images.ndim != 4 or data.images.shape[-1] not in (1, 3):
        raise ValueError(f"expected (N, H, W, C) images, got shape {data.images.shape}")
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2).contiguous().to(device)
    return images, torch.from_numpy(data.labels).to(device)


def _autocast(device: torch.device, amp: str) -> torch.autocast:
    dtype = _AMP_DTYPES[amp]
    if dtype is torch.float16 and device.type != "cuda":
        raise ValueError("amp='fp16' needs a CUDA device; use 'bf16' on the CPU")
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    data: ImageArrays,
    *,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
    amp: str = "none",
    channels_last: bool = True,
) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on uint8 ``(N, H, W, C)`` arrays."""
    device = torch.device(device)
    images, labels = _uint8_tensor(data, device)
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    try:
        for start in range(0, len(labels), batch_size):
            with _autocast(device, amp):
                logits = model(_as_input(images[start : start + batch_size], channels_last))
            correct += (logits.argmax(1) == labels[start : start + batch_size]).sum()
    finally:
        model.train(was_training)
    return correct.item() / max(1, len(labels))


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=True
        )
    # AdamW: no decay on norm scales, biases and embeddings' 1-D parameters (the ViT convention)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.momentum, 0.999))


def train_classifier(
    model: nn.Module,
    train: ImageArrays,
    test: ImageArrays,
    config: TrainConfig,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``train``; returns its accuracy on ``test`` and a history.

    ``history`` has one entry per epoch: mean training loss and accuracy (on augmented
    batches), the learning rate at the epoch's end, seconds so far and, every
    ``config.eval_every`` epochs and at the end, ``test_accuracy``.
    """
    device = torch.device(device)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    images, labels = _uint8_tensor(train, device)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = _optimizer(model, config)
    steps_per_epoch = -(-len(labels) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[group["lr"] for group in optimizer.param_groups],
        total_steps=config.epochs * steps_per_epoch,
        pct_start=config.warmup_fraction,
        cycle_momentum=config.optimizer == "sgd",
    )
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    epochs = range(config.epochs)
    bar = None
    if progress:
        from tqdm import tqdm

        epochs = bar = tqdm(epochs, desc=f"training {type(model).__name__}", unit="epoch")
    for epoch in epochs:
        model.train()
        order = torch.randperm(len(labels), generator=generator).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        for start in range(0, len(labels), config.batch_size):
            index = order[start : start + config.batch_size]
            augmented = random_crop_flip(
                images[index], config.crop_padding, generator, flip=config.flip, padding_mode=config.padding_mode
            )
            inputs = _as_input(augmented, config.channels_last)
            targets = labels[index]
            with _autocast(device, config.amp):
                logits = model(inputs)
                loss = F.cross_entropy(logits.float(), targets, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += loss.detach() * len(index)
            correct += (logits.argmax(1) == targets).sum()
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum.item() / len(labels),
            "train_accuracy": correct.item() / len(labels),
            "lr": optimizer.param_groups[0]["lr"],
        }
        if not torch.isfinite(torch.tensor(record["train_loss"])):
            raise FloatingPointError(f"training diverged at epoch {epoch + 1} (loss {record['train_loss']})")
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            record["test_accuracy"] = evaluate_accuracy(
                model, test, batch_size=config.eval_batch_size, device=device, amp=config.amp,
                channels_last=config.channels_last,
            )
        record["seconds"] = time.perf_counter() - started
        history.append(record)
        # A progress line per epoch: the only sign of life when no terminal shows the bar.
        logger.info(
            "%s epoch %d/%d: %s", type(model).__name__, epoch + 1, config.epochs,
            ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch"),
        )
        if bar is not None:
            bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k in ("train_loss", "test_accuracy")})
        if on_epoch is not None:
            on_epoch(record)
    model.eval()
    # the reported accuracy is taken in fp32, as the benchmarks run the model
    accuracy = evaluate_accuracy(model, test, batch_size=config.eval_batch_size, device=device, channels_last=config.channels_last)
    return TrainResult(accuracy, history, time.perf_counter() - started)
