"""Shared pieces of the entropy-minimization methods (TENT, SAR): the entropy, the choice of
trainable normalization parameters, the optimizer, and a device-side guard against
non-finite gradients.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tta.layers.base import AdaptiveNorm
from tta.methods.base import OBJECTIVE, MasterOptimizer, Method, hparam


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy ``H(y) = -sum_c softmax(y)_c log_softmax(y)_c`` (spec §1), in fp32.

    One ``log_softmax`` and one ``exp``; the result has shape ``(N,)`` for logits ``(N, C)``.
    """
    log_p = torch.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(1)


def is_norm_module(module: nn.Module) -> bool:
    """Normalization layers whose affine parameters entropy methods adapt: this library's
    statistics layers (which replace BatchNorm), any remaining BatchNorm, GroupNorm and
    LayerNorm (and their subclasses, e.g. timm's ``LayerNorm2d``, ``GroupNorm1``), and
    :class:`tta.layers.BatchChannelNorm2d`."""
    from tta.layers.bcn import BatchChannelNorm2d

    return isinstance(module, (AdaptiveNorm, _BatchNorm, nn.GroupNorm, nn.LayerNorm, BatchChannelNorm2d))


def norm_parameters(model: nn.Module, exclude: Sequence[str] = ()) -> list[tuple[str, nn.Parameter]]:
    """``(qualified name, parameter)`` of the affine parameters of every normalization layer.

    A layer is skipped when any regular expression of ``exclude`` matches its qualified module
    name (``re.search``). The affine parameters are the layer's own parameters (``weight``,
    ``bias``; BCN's ``group_weight``/``group_bias`` too), never its children's.
    """
    patterns = [re.compile(rule) for rule in exclude]
    selected: list[tuple[str, nn.Parameter]] = []
    for module_name, module in model.named_modules():
        if not is_norm_module(module) or any(p.search(module_name) for p in patterns):
            continue
        for param_name, param in module.named_parameters(recurse=False):
            selected.append((f"{module_name}.{param_name}" if module_name else param_name, param))
    return selected


def configure_trainable(model: nn.Module, params: Iterable[nn.Parameter], method: str) -> list[nn.Parameter]:
    """Freeze every parameter of ``model`` except ``params`` (which get ``requires_grad``)."""
    params = list(params)
    if not params:
        raise ValueError(
            f"method {method!r} found no normalization parameters to adapt (BatchNorm, GroupNorm, "
            "LayerNorm or this library's statistics layers, minus the excluded names)"
        )
    model.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
    return params


def nonfinite_guard_(grads: Sequence[torch.Tensor], norms: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Zero all ``grads`` when any of them holds NaN/Inf; return their global L2 norm (0 then).

    Decided on the device (no host synchronisation): a batch with NaN/Inf somewhere in the
    forward (e.g. a NaN pixel under batch statistics) contributes no gradient instead of
    poisoning the adapted parameters for good (the wrapper's guard then also undoes the
    optimizer's momentum step, see :class:`tta.Adapted`). ``norms`` are the per-tensor norms
    when already computed.
    """
    if not grads:
        return torch.zeros(())
    if norms is None:
        # fp32 norms for half-precision gradients, whose squares overflow early
        low = grads[0].dtype in (torch.float16, torch.bfloat16)
        norms = torch._foreach_norm(list(grads), 2, dtype=torch.float32 if low else None)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    bad = ~torch.isfinite(total)
    for grad in grads:
        grad.masked_fill_(bad, 0.0)
    return total.masked_fill(bad, 0.0)


def present_grads(params: Sequence[nn.Parameter]) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
    """The parameters that received a gradient in the last backward, and those gradients."""
    with_grad = [p for p in params if p.grad is not None]
    return with_grad, [p.grad for p in with_grad]  # type: ignore[misc]


@dataclasses.dataclass
class OptimizerHparams:
    """The optimizer of the methods that train normalization affine parameters (TENT, ROID,
    EATA/ETA); each method's docstring gives its official values."""

    #: optimizer: "adam" (the CIFAR configs of the official code) or "sgd" (their ImageNet ones)
    optimizer: str = hparam("adam", choices=("adam", "sgd"))
    #: learning rate (official CIFAR-10-C configs: Adam 1e-3; ImageNet-C: SGD 2.5e-4 at batch 64)
    lr: float = hparam(1e-3, low=0.0, low_open=True)
    #: Adam beta_1 (beta_2 is 0.999), official 0.9
    beta: float = hparam(0.9, low=0.0, high=1.0, high_open=True)
    #: SGD momentum (SGD only; official 0.9)
    sgd_momentum: float = hparam(0.9, low=0.0, high=1.0, high_open=True)
    #: Nesterov momentum for SGD (SGD only; TENT's and ROID's official default True)
    nesterov: bool = True
    #: weight decay (official 0)
    weight_decay: float = hparam(0.0, low=0.0)


class NormAffineObjective(Method):
    """Base of the objectives that train the normalization affine parameters with the
    optimizer of :class:`OptimizerHparams` (TENT, ROID, EATA/ETA): after :meth:`convert`,
    ``params`` / ``param_names`` are those parameters and ``optimizer`` trains them.
    Subclasses register ``optimizer`` (and their own state) with ``register_state``."""

    role = OBJECTIVE
    default_statistics = "norm"

    def __init__(self, num_streams: int = 1, **hparams: Any) -> None:
        super().__init__(num_streams, **hparams)
        self.params: list[nn.Parameter] = []
        self.param_names: list[str] = []
        self.optimizer: MasterOptimizer | None = None

    def convert(self, model: nn.Module) -> nn.Module:
        named = norm_parameters(model)
        self.params = configure_trainable(model, [p for _, p in named], self.name)
        self.param_names = [n for n, _ in named]
        hp = self.hparams
        self.optimizer = build_optimizer(
            self.params, hp.optimizer, hp.lr, beta=hp.beta, momentum=hp.sgd_momentum,
            weight_decay=hp.weight_decay, nesterov=hp.nesterov,
        )
        return model


def build_optimizer(
    params: Sequence[nn.Parameter],
    name: str,
    lr: float,
    *,
    beta: float = 0.9,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> MasterOptimizer:
    """Adam (``betas = (beta, 0.999)``) or SGD (``momentum``, dampening 0, ``nesterov``), on
    fp32 master copies of half-precision parameters (:class:`tta.methods.base.MasterOptimizer`).

    On CUDA, Adam keeps its step count on the device (``capturable``), so that neither the
    step nor the non-finite guard synchronises with the host."""
    params = list(params)
    if name == "adam":
        return MasterOptimizer(params, torch.optim.Adam, lr=lr, betas=(beta, 0.999), weight_decay=weight_decay)
    if name == "sgd":
        return MasterOptimizer(
            params, torch.optim.SGD, lr=lr, momentum=momentum, dampening=0.0, weight_decay=weight_decay,
            nesterov=nesterov and momentum > 0,
        )
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {name!r}")


def optimizer_state(optimizer: MasterOptimizer | torch.optim.Optimizer | None) -> dict[str, Any] | None:
    """A detached deep copy of the optimizer state (later steps do not mutate it)."""
    return None if optimizer is None else copy.deepcopy(optimizer.state_dict())


def load_optimizer_state(optimizer: MasterOptimizer | torch.optim.Optimizer | None, state: dict[str, Any] | None) -> None:
    """Load a deep copy, so the caller's dict never aliases the live optimizer state."""
    if optimizer is not None and state is not None:
        optimizer.load_state_dict(copy.deepcopy(state))
