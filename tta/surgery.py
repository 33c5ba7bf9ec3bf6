"""Find and replace normalization layers anywhere in a model.

Supported source layers: ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, torchvision's
``FrozenBatchNorm2d``, and timm's ``BatchNormAct2d``, ``SyncBatchNormAct`` and
``FrozenBatchNormAct2d`` (whose drop/activation are kept after the replacement).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tta.layers.base import NormAct, SourceNormState

SUPPORTED_NORM_TYPES = (
    "torch.nn.BatchNorm1d",
    "torch.nn.BatchNorm2d",
    "torch.nn.BatchNorm3d",
    "torch.nn.SyncBatchNorm",
    "torchvision.ops.FrozenBatchNorm2d",
    "timm.layers.BatchNormAct2d",
    "timm.layers.SyncBatchNormAct",
    "timm.layers.FrozenBatchNormAct2d",
)
_DEFAULT_MOMENTUM = 0.1


def _frozen_types() -> tuple[type, ...]:
    types: list[type] = []
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d as TvFrozen

        types.append(TvFrozen)
    except ImportError:  # torchvision is optional for the core
        pass
    try:
        from timm.layers.norm_act import FrozenBatchNorm2d as TimmFrozen
        from timm.layers.norm_act import FrozenBatchNormAct2d

        types.extend([TimmFrozen, FrozenBatchNormAct2d])
    except ImportError:
        pass
    return tuple(dict.fromkeys(types))


def _is_fused_act(module: nn.Module) -> bool:
    # timm's *Act2d layers apply `drop` then `act` after normalizing.
    return "Act" in type(module).__name__ and hasattr(module, "act") and hasattr(module, "drop")


def is_batch_norm(module: nn.Module) -> bool:
    """True for every BatchNorm flavour this library can replace."""
    return isinstance(module, _BatchNorm) or isinstance(module, _frozen_types())


def is_group_or_layer_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.GroupNorm, nn.LayerNorm))


def find_norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Qualified names and modules of the replaceable BatchNorm layers, in module order."""
    return [(name, module) for name, module in model.named_modules() if is_batch_norm(module)]


def source_state(module: nn.Module) -> SourceNormState:
    """What a replacement inherits from a BatchNorm layer: statistics, affine, eps, momentum."""
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        raise ValueError(f"{type(module).__name__} is not initialized yet; run one forward first")
    if isinstance(module, nn.BatchNorm1d):
        kind = "1d"
    elif isinstance(module, nn.BatchNorm3d):
        kind = "3d"
    else:
        kind = "2d"
    momentum = getattr(module, "momentum", None)
    if momentum is None:
        # cumulative-average BN (momentum=None) or frozen BN: fall back to PyTorch's default
        momentum = _DEFAULT_MOMENTUM
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    running_mean = getattr(module, "running_mean", None)
    running_var = getattr(module, "running_var", None)
    return SourceNormState(
        num_features=int(running_mean.numel() if running_mean is not None else module.num_features),
        eps=float(module.eps),
        momentum=float(momentum),
        weight=weight.detach() if isinstance(weight, torch.Tensor) else None,
        bias=bias.detach() if isinstance(bias, torch.Tensor) else None,
        running_mean=running_mean.detach() if running_mean is not None else None,
        running_var=running_var.detach() if running_var is not None else None,
        source_type=f"{type(module).__module__}.{type(module).__qualname__}",
        input_kind=kind,
    )


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def replace_modules(
    model: nn.Module,
    predicate: Callable[[str, nn.Module], bool],
    factory: Callable[[str, nn.Module], nn.Module],
) -> list[str]:
    """Replace every submodule for which ``predicate(name, module)`` holds by
    ``factory(name, module)``, in ``named_modules`` order. Returns the replaced names.

    Children of a replaced module are not visited. The root module itself is never replaced.
    """
    targets: list[tuple[str, nn.Module]] = []
    skip_prefixes: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in skip_prefixes):
            continue
        if predicate(name, module):
            targets.append((name, module))
            skip_prefixes.append(name + ".")
    for name, module in targets:
        _set_submodule(model, name, factory(name, module))
    return [name for name, _ in targets]


def replace_norm_layers(
    model: nn.Module, factory: Callable[[str, SourceNormState], nn.Module]
) -> list[str]:
    """Replace every supported BatchNorm layer by ``factory(name, source_state(layer))``.

    The replacement lands on the source layer's device and dtype (for parameters; statistic
    buffers stay float32). A timm fused norm+activation keeps its drop and activation.

    Raises:
        ValueError: the model has no supported normalization layer.
    """

    def build(name: str, module: nn.Module) -> nn.Module:
        state = source_state(module)
        new = factory(name, state)
        device = state.running_mean.device if state.running_mean is not None else None
        if device is not None:
            new = new.to(device)
        if _is_fused_act(module):
            new = NormAct(new, module.drop, module.act)
        return new

    replaced = replace_modules(model, lambda _, module: is_batch_norm(module), build)
    if not replaced:
        raise ValueError(
            "the model has no supported normalization layer; statistics methods replace "
            f"{', '.join(SUPPORTED_NORM_TYPES)}"
        )
    return replaced


def iter_adaptive_layers(model: nn.Module) -> Iterator[nn.Module]:
    from tta.layers.base import AdaptiveNorm

    return (module for module in model.modules() if isinstance(module, AdaptiveNorm))
