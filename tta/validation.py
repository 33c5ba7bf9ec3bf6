"""Checks on each incoming batch, run before any adaptation state can change."""

from __future__ import annotations

import torch
from torch import nn

_RANK_OF_FIRST_LAYER = {nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5}


def infer_input_ndim(model: nn.Module) -> int | None:
    """Rank of the model's input, read off its first convolution (None when unknown)."""
    for module in model.modules():
        for layer_type, ndim in _RANK_OF_FIRST_LAYER.items():
            if isinstance(module, layer_type):
                return ndim
        if isinstance(module, nn.Linear):
            return None
    return None


def model_dtype(model: nn.Module) -> torch.dtype | None:
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return None


def check_batch(
    x: object,
    *,
    input_ndim: int | None,
    dtype: torch.dtype | None,
    num_streams: int,
) -> torch.Tensor:
    """Raise ``TypeError``/``ValueError`` for a batch no adaptation step should see."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor batch, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"expected a floating-point batch, got {x.dtype}; convert images with x.float() / 255"
        )
    autocast = torch.is_autocast_enabled(x.device.type) if x.device.type in ("cuda", "cpu") else False
    if dtype is not None and x.dtype != dtype and not autocast:
        raise TypeError(f"batch dtype {x.dtype} does not match the model's parameter dtype {dtype}")
    if input_ndim is not None and x.dim() != input_ndim:
        raise ValueError(
            f"expected a batch of rank {input_ndim} (N, C, ...), got shape {tuple(x.shape)}"
        )
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"empty batch of shape {tuple(x.shape)}")
    if x.shape[0] % num_streams:
        raise ValueError(
            f"a batch of {x.shape[0]} samples cannot hold {num_streams} equal-size stream batches"
        )
    return x
