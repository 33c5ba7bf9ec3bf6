"""Methods that train the affine parameters of the normalization layers: which parameters
those are, freezing everything else, and the base class of the objectives that train them
with the Adam/SGD optimizer of :class:`~tta.methods.optim.OptimizerHparams`.

TENT, SAR, EATA/ETA, ROID, RoTTA and TRIBE all adapt these parameters."""

from __future__ import annotations

import re
from typing import Iterable, Sequence

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tta.layers.base import AdaptiveNorm
from tta.methods.base import OBJECTIVE, Method
from tta.methods.optim import build_optimizer
from tta.methods.state import state


def is_norm_module(module: nn.Module) -> bool:
    """Normalization layers whose affine parameters these methods adapt: this library's
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


class NormAffineObjective(Method):
    """Base of the objectives that train the normalization affine parameters with the
    optimizer of :class:`~tta.methods.optim.OptimizerHparams` (TENT, ROID, EATA/ETA, DeYO):
    after :meth:`convert`, ``params`` / ``param_names`` are those parameters (minus the layers
    an ``exclude`` hyperparameter names, where the method has one) and ``optimizer`` trains
    them."""

    role = OBJECTIVE
    default_statistics = "norm"

    optimizer = state(None)

    def convert(self, model: nn.Module) -> nn.Module:
        named = norm_parameters(model, getattr(self.hparams, "exclude", ()))
        self.params = configure_trainable(model, [p for _, p in named], self.name)
        self.param_names = [n for n, _ in named]
        hp = self.hparams
        self.optimizer = build_optimizer(
            self.params, hp.optimizer, hp.lr, beta=hp.beta, momentum=hp.sgd_momentum,
            weight_decay=hp.weight_decay, nesterov=hp.nesterov,
        )
        return model
