"""Install a normalization scheme into any model: plain BN, AdaB²N or BCN + WS.

The BN-layer surgery itself is :func:`tta.surgery.replace_modules`; this module only decides
what replaces what and offers the AdaB²N training-loop helpers (task context, end of task,
regularizer) that act on every AdaB²N layer of a model.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from continual.layers.adab2n import AdaB2N, TaskBatchContext
from tta.surgery import replace_modules

NormKind = Literal["bn", "adab2n", "bcn_ws"]
NORM_KINDS: tuple[str, ...] = ("bn", "adab2n", "bcn_ws")


def _is_plain_bn2d(_: str, module: nn.Module) -> bool:
    # AdaB²N subclasses BatchNorm2d; converting twice must be a no-op, not a re-wrap.
    return isinstance(module, nn.BatchNorm2d) and not isinstance(module, AdaB2N)


def convert_to_adab2n(
    model: nn.Module, num_tasks: int, kappa: float = 1.0, init_weight: float = 0.0
) -> list[str]:
    """Replace every ``BatchNorm2d`` of ``model`` (in place) by :class:`AdaB2N`.

    Like the official ``replace_bn``, the new layers inherit the statistics, affine
    parameters and batch counter of the layers they replace. Returns the replaced names.

    Raises:
        ValueError: the model has no BatchNorm2d layer.
    """
    replaced = replace_modules(
        model,
        _is_plain_bn2d,
        lambda _, bn: AdaB2N.from_batch_norm(bn, num_tasks, kappa=kappa, init_weight=init_weight),
    )
    if not replaced and not adab2n_layers(model):
        raise ValueError("AdaB2N replaces BatchNorm2d layers, but the model has none")
    return replaced


def convert_norm(model: nn.Module, norm: NormKind, **options: Any) -> nn.Module:
    """Install the normalization ``norm`` into ``model`` (in place) and return it.

    * ``"bn"``: keep the model's BatchNorm layers (the baseline); checks there is one.
    * ``"adab2n"``: :func:`convert_to_adab2n`; options ``num_tasks`` (required), ``kappa``,
      ``init_weight``.
    * ``"bcn_ws"``: batch-channel normalization with weight-standardised convolutions through
      :func:`tta.layers.bcn.convert_to_bcn_ws` (Qiao et al., arXiv 1903.10520; docs/METHODS.md
      §7); options are passed on.
    """
    if norm == "bn":
        if options:
            raise TypeError(f"norm 'bn' takes no options, got {sorted(options)}")
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise ValueError("norm 'bn' keeps the model's BatchNorm layers, but the model has none")
        return model
    if norm == "adab2n":
        if "num_tasks" not in options:
            raise TypeError("norm 'adab2n' needs num_tasks (the size of the task prior)")
        convert_to_adab2n(model, **options)
        return model
    if norm == "bcn_ws":
        try:
            from tta.layers.bcn import convert_to_bcn_ws
        except ImportError as error:  # the layer lives in the tta package
            raise RuntimeError(
                "norm 'bcn_ws' needs tta.layers.bcn.convert_to_bcn_ws, which is not available"
            ) from error
        converted = convert_to_bcn_ws(model, **options)
        return model if converted is None else converted
    raise ValueError(f"unknown norm {norm!r}; choose one of {NORM_KINDS}")


def adab2n_layers(model: nn.Module) -> list[AdaB2N]:
    """The AdaB²N layers of ``model`` in module order."""
    return [module for module in model.modules() if isinstance(module, AdaB2N)]


def set_task_context(model: nn.Module, context: TaskBatchContext | None) -> None:
    """Give every AdaB²N layer the task assignment of the next training batch."""
    for layer in adab2n_layers(model):
        layer.set_task_context(context)


def end_task(model: nn.Module) -> None:
    """Mark the current task as finished in every AdaB²N layer."""
    for layer in adab2n_layers(model):
        layer.end_task()


def regularization_loss(model: nn.Module) -> Tensor:
    """``Σ_layers loss`` of the last training forward (§6 step 5), unscaled by λ.

    Raises:
        RuntimeError: no AdaB²N layer has run a training forward yet.
    """
    terms = [layer.regularization for layer in adab2n_layers(model)]
    if not terms or any(term is None for term in terms):
        raise RuntimeError("no AdaB2N regularizer available: run a training forward first")
    return torch.stack([term for term in terms if term is not None]).sum()
