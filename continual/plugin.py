"""Avalanche plugin that installs and maintains a normalization scheme across experiences.

``NormalizationPlugin("adab2n", num_tasks=5, kappa=0.4, lambd=0.1)`` added to any Avalanche
strategy that forwards one (replay-augmented) batch per step — ``Naive``, ``Replay``,
``Naive`` + ``ReplayPlugin`` — turns its model's BatchNorm2d layers into AdaB²N (Lyu et al.,
NeurIPS 2023; docs/METHODS.md §6) and then, like the official ER-ACE / DER++ loops:

* before every training forward, gives the layers the task of every sample in the batch
  (the task in which the sample's class was first seen, or ``class_to_task``), so that the
  batch statistics are balanced across tasks;
* adds ``λ · Σ_layers loss`` to the strategy's loss from task ``ada_t0`` on, on
  replay-augmented steps (``regularize_on="replay"``, the official behaviour) or on every
  step (``"always"``);
* calls the layers' ``end_task`` when a task ends (the last sub-experience of an online
  stream, or every experience of a task-level stream).

``"bn"`` keeps the model's BatchNorm layers (the baseline) and ``"bcn_ws"`` installs
batch-channel normalization with weight standardisation through the ``tta`` layers.

Strategies that forward replayed samples in a separate call (Avalanche's ``ER_ACE``) run,
but only their first forward per step is balanced: AdaB²N needs the joint batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from avalanche.benchmarks.utils.data_loader import ReplayDataLoader
from avalanche.core import SupervisedPlugin
from torch import Tensor

from continual.boundaries import require_task_end
from continual.convert import NORM_KINDS, NormKind, convert_norm, end_task, regularization_loss, set_task_context
from continual.layers.adab2n import TaskBatchContext


class ClassTaskMap:
    """Task index of every class: the task during which it was first seen (batched lookup).

    Reproduces the official ``label // classes_per_task`` on ordered class-incremental
    streams and also covers shuffled class orders and blurry streams, where a class may
    reappear in later tasks (it keeps its first task). A fixed mapping (dict, or a function
    of the label tensor) replaces the first-seen rule.
    """

    def __init__(self, fixed: Mapping[int, int] | Callable[[Tensor], Tensor] | None = None) -> None:
        self._function = fixed if callable(fixed) else None
        self._frozen = isinstance(fixed, Mapping)
        self._table = torch.full((0,), -1, dtype=torch.long)
        if isinstance(fixed, Mapping) and fixed:
            self._grow(max(fixed) + 1)
            self._table[torch.tensor(list(fixed.keys()))] = torch.tensor(list(fixed.values()))

    def _grow(self, size: int) -> None:
        if size > self._table.numel():
            grown = torch.full((size,), -1, dtype=torch.long)
            grown[: self._table.numel()] = self._table
            self._table = grown

    def assign(self, labels: Tensor, current_task: int) -> Tensor:
        """Task of every label; classes not seen before are assigned to ``current_task``."""
        labels = labels.long()
        if self._function is not None:
            return self._function(labels).long()
        if labels.numel():
            self._grow(int(labels.max()) + 1)
        tasks = self._table.to(labels.device)[labels]
        unseen = tasks < 0
        if bool(unseen.any()):
            if self._frozen:
                raise KeyError(f"classes {labels[unseen].unique().tolist()} are missing from class_to_task")
            self._table[labels[unseen].cpu()] = current_task
            tasks = torch.where(unseen, torch.full_like(tasks, current_task), tasks)
        return tasks

    def state_dict(self) -> dict[str, Any]:
        return {"table": self._table.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._table = state["table"].clone()


class NormalizationPlugin(SupervisedPlugin):
    """Install ``norm`` into the strategy's model and keep it up to date while training.

    Args:
        norm: ``"bn"``, ``"adab2n"`` or ``"bcn_ws"``.
        num_tasks: number of tasks T of the stream (AdaB²N's task prior has T entries).
        kappa: AdaB²N's κ of the modified momentum (1: plain EMA; official grid 0.1-1).
        lambd: AdaB²N's regularizer weight λ (official grid 0.01-10 on Split CIFAR).
        ada_t0: first task (0-based) whose steps get the regularizer.
        regularize_on: ``"replay"``: only steps whose batch is replay-augmented (Avalanche's
            ``ReplayDataLoader`` is active), as the official code; ``"always"``: every step.
        init_weight: initial log prior concentration of the task weights.
        class_to_task: fixed class-to-task mapping (dict, or a function of the label tensor,
            e.g. ``lambda y: y // 2`` as the official code); default: first-seen task.
        **norm_options: passed to the BCN + WS converter for ``"bcn_ws"``.
    """

    def __init__(
        self,
        norm: NormKind = "adab2n",
        *,
        num_tasks: int | None = None,
        kappa: float = 0.4,
        lambd: float = 0.1,
        ada_t0: int = 0,
        regularize_on: Literal["replay", "always"] = "replay",
        init_weight: float = 0.0,
        class_to_task: Mapping[int, int] | Callable[[Tensor], Tensor] | None = None,
        **norm_options: Any,
    ) -> None:
        super().__init__()
        if norm not in NORM_KINDS:
            raise ValueError(f"unknown norm {norm!r}; choose one of {NORM_KINDS}")
        if norm == "adab2n" and (num_tasks is None or num_tasks < 1):
            raise ValueError("norm 'adab2n' needs num_tasks >= 1")
        if regularize_on not in ("replay", "always"):
            raise ValueError(f"regularize_on must be 'replay' or 'always', got {regularize_on!r}")
        if norm != "bcn_ws" and norm_options:
            raise TypeError(f"unexpected options for norm {norm!r}: {sorted(norm_options)}")
        self.norm = norm
        self.num_tasks = num_tasks
        self.kappa = kappa
        self.lambd = lambd
        self.ada_t0 = ada_t0
        self.regularize_on = regularize_on
        self.init_weight = init_weight
        self.norm_options = norm_options
        self.classes = ClassTaskMap(class_to_task)
        self.current_task = 0
        self.installed = False
        self._last_penalty: Tensor | None = None

    @property
    def last_regularization(self) -> float | None:
        """Unscaled regularizer of the last regularised step (None before the first)."""
        return None if self._last_penalty is None else float(self._last_penalty)

    # ------------------------------------------------------------------ installation
    def install(self, model: torch.nn.Module) -> torch.nn.Module:
        """Convert ``model`` in place (idempotent for one plugin instance)."""
        if self.installed:
            return model
        if self.norm == "adab2n":
            model = convert_norm(
                model, "adab2n", num_tasks=self.num_tasks, kappa=self.kappa, init_weight=self.init_weight
            )
        else:
            model = convert_norm(model, self.norm, **self.norm_options)
        self.installed = True
        return model

    def before_training(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        # Runs before Avalanche's first make_optimizer of this train() call, which then
        # registers the new parameters (AdaB²N's task prior, BCN's group affine).
        strategy.model = self.install(strategy.model).to(strategy.device)

    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        if self.norm == "adab2n":
            require_task_end(strategy.experience)  # fail early on boundary-agnostic streams

    # ------------------------------------------------------------------ per step
    def before_forward(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        if self.norm != "adab2n":
            return
        tasks = self.classes.assign(strategy.mb_y, self.current_task)
        context = TaskBatchContext.from_sample_tasks(tasks, self.current_task + 1)
        set_task_context(strategy.model, context)

    def before_backward(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        if self.norm != "adab2n" or self.lambd == 0 or self.current_task < self.ada_t0:
            return
        if self.regularize_on == "replay" and not isinstance(strategy.dataloader, ReplayDataLoader):
            return
        penalty = regularization_loss(strategy.model)
        self._last_penalty = penalty.detach()  # read lazily: no device sync per step
        strategy.loss = strategy.loss + self.lambd * penalty

    # ------------------------------------------------------------------ task boundaries
    def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        if self.norm != "adab2n" or not require_task_end(strategy.experience):
            return
        end_task(strategy.model)
        self.current_task += 1

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plugin state for checkpoints (the layers' state is in the model's state_dict)."""
        return {"current_task": self.current_task, "classes": self.classes.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # Installation is not restored: converting an already converted model is a no-op.
        self.current_task = int(state["current_task"])
        self.classes.load_state_dict(state["classes"])
