"""Continual learning through normalization layers (docs/CONTINUAL.md).

* :mod:`continual.layers` — AdaB²N (Lyu et al., NeurIPS 2023), a drop-in BatchNorm2d;
* :mod:`continual.convert` — install BN / AdaB²N / BCN + WS into any model;
* :mod:`continual.plugin` — the Avalanche plugin that installs and maintains them;
* :mod:`continual.scenarios` — Split digits, Split CIFAR-10, Si-Blurry and online streams;
* :mod:`continual.metrics` — A_auc, A_last, A_avg, F_last (functions and Avalanche metric);
* :mod:`continual.harness` — the competition harness (docs/COMPETITION.md).

Only the torch-level pieces are imported here; the Avalanche-facing modules are imported
explicitly (``from continual.plugin import NormalizationPlugin``).
"""

from continual.convert import (
    adab2n_layers,
    convert_norm,
    convert_to_adab2n,
    end_task,
    regularization_loss,
    set_task_context,
)
from continual.layers import AdaB2N, TaskBatchContext

__all__ = [
    "AdaB2N",
    "TaskBatchContext",
    "adab2n_layers",
    "convert_norm",
    "convert_to_adab2n",
    "end_task",
    "regularization_loss",
    "set_task_context",
]
