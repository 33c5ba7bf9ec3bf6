"""AdaB²N: adaptive balance of batch normalization for continual learning.

Lyu et al., "Overcoming Recency Bias of Normalization Statistics in Continual Learning:
Balance and Adaptation", NeurIPS 2023. Restated in docs/METHODS.md §6; behaviour follows the
official implementation (lvyilin/AdaB2N, ``models/utils/adab2n.py``), which produced the
published numbers. Written from the spec, not copied.

In continual training a mini-batch mixes samples of the current task with replayed samples
of earlier tasks, and plain BN statistics are dominated by the current task. AdaB²N

* (training stage) replaces the batch statistics by a **task-balanced weighted** version:
  task weights are the mean of a Dirichlet posterior whose prior concentration
  ``exp(w_t)`` is learnt and whose observations are the per-task sample counts
  ``n_t`` of the batch (§6 step 2);
* (testing stage) tracks the running statistics with a **modified momentum** η whose
  sequence interpolates between the cumulative average (κ = 0) and the usual EMA (κ = 1);
* adds a **regularizer** that pulls the batch statistics toward the running ones (§6 step 5);
  the training loop adds ``λ · Σ_layers loss`` from task ``ada_t0`` on.

Quirk kept from the official code: the per-sample weights ``ω_i = π_{t_i} / n_{t_i}`` sum to
``Σ_{t present} π_t``, which is **below one** when a task already seen has no sample in the
batch (its posterior mass ``exp(w_t) / Σ a`` is simply dropped, not renormalised). The
weighted mean and variance are then shrunk toward zero by that factor. This matters for
Naive training (no replay) and for replay batches that miss a task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class TaskBatchContext:
    """Which task each sample of the next training batch belongs to.

    Built once per batch and shared by every AdaB²N layer (§6 "Batch context").

    Attributes:
        sample_tasks: ``(B,)`` long, task index of every sample.
        counts: ``(K,)`` long, number of samples of each task ``0..K-1`` in the batch, where
            ``K`` is the number of tasks started so far (zeros for absent tasks).
    """

    sample_tasks: Tensor
    counts: Tensor

    @classmethod
    def from_sample_tasks(cls, sample_tasks: Tensor, num_started_tasks: int) -> "TaskBatchContext":
        """Count the samples per task.

        Args:
            sample_tasks: ``(B,)`` integer task index of every sample.
            num_started_tasks: ``K`` = finished tasks + 1 (the current one).

        Raises:
            ValueError: a task index is negative or ``>= K``.
        """
        sample_tasks = sample_tasks.long().reshape(-1)
        if num_started_tasks < 1:
            raise ValueError(f"num_started_tasks must be >= 1, got {num_started_tasks}")
        if sample_tasks.numel() and (
            int(sample_tasks.min()) < 0 or int(sample_tasks.max()) >= num_started_tasks
        ):
            raise ValueError(
                f"task indices must lie in [0, {num_started_tasks}), got "
                f"[{int(sample_tasks.min())}, {int(sample_tasks.max())}]"
            )
        counts = torch.bincount(sample_tasks, minlength=num_started_tasks)
        return cls(sample_tasks=sample_tasks, counts=counts)


def balanced_sample_weights(task_weight: Tensor, context: TaskBatchContext) -> Tensor:
    """Per-sample weights ``ω_i = π_{t_i} / n_{t_i}`` of §6 step 2.

    ``π`` is the Dirichlet posterior mean ``a_t / Σ a`` with ``a_t = exp(w_t) + n_t``
    over the ``K`` started tasks. Differentiable in ``task_weight``.

    Args:
        task_weight: ``(K,)`` log prior concentrations ``w`` (the first K entries).
        context: the batch's task assignment with ``K`` counts.
    """
    counts = context.counts.to(task_weight.dtype)
    concentration = task_weight.exp() + counts
    posterior = concentration / concentration.sum()
    # Every sample's own task is present, so its count is >= 1: no division by zero.
    return posterior[context.sample_tasks] / counts[context.sample_tasks]


def weighted_batch_stats(x: Tensor, sample_weights: Tensor) -> tuple[Tensor, Tensor]:
    """Channel mean and variance of ``x`` ``(B, C, H, W)`` as weighted sums over samples.

    ``μ = Σ_i ω_i mean_L(x_i)`` and ``σ² = Σ_i ω_i mean_L((x_i − μ)²)`` (§6 step 2): the
    variance is taken around the *weighted* mean, per sample over positions, then weighted.
    """
    weights = sample_weights.to(x.dtype)
    mean = weights @ x.mean(dim=(2, 3))
    deviation = (x - mean[None, :, None, None]).square().mean(dim=(2, 3))
    return mean, weights @ deviation


class AdaB2N(nn.BatchNorm2d):
    """BatchNorm2d with task-balanced batch statistics and a modified running momentum.

    Use :meth:`from_batch_norm` (or :func:`continual.convert.convert_norm`) to replace the
    BN layers of an existing model. Before each training forward the training loop sets a
    :class:`TaskBatchContext` (:meth:`set_task_context`); at the end of each task it calls
    :meth:`end_task`; it reads :attr:`regularization` after the forward.

    Args:
        num_features: channels C.
        num_tasks: maximum number of tasks T (size of the learnable prior ``task_weight``).
        kappa: κ ∈ [0, 1] of the modified momentum (1: plain EMA, 0: cumulative average).
        eps, momentum, affine: as in :class:`torch.nn.BatchNorm2d` (momentum must be a float).
        init_weight: initial log prior concentration (the official runs use 0).
    """

    def __init__(
        self,
        num_features: int,
        num_tasks: int,
        kappa: float = 1.0,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        init_weight: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if momentum is None or not 0.0 < float(momentum) <= 1.0:
            raise ValueError(f"AdaB2N needs a float momentum in (0, 1], got {momentum!r}")
        if not 0.0 <= float(kappa) <= 1.0:
            raise ValueError(f"kappa must lie in [0, 1], got {kappa}")
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        super().__init__(
            num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=True,
            device=device, dtype=dtype,
        )
        self.num_tasks = int(num_tasks)
        self.kappa = float(kappa)
        self.init_weight = float(init_weight)
        factory = {"device": device, "dtype": dtype}
        self.task_weight = nn.Parameter(torch.full((self.num_tasks,), self.init_weight, **factory))
        # Number of finished tasks (``cur_tasks`` in the official code); a buffer so that it
        # travels with state_dict() and .to(). Change it through end_task() or
        # load_state_dict(), which keep the host-side copy in sync.
        self.register_buffer("finished_tasks", torch.zeros((), dtype=torch.long, device=device))
        self.finished_tasks: Tensor
        self._finished_cache: int | None = None
        # η of the previous training batch for 0 < κ < 1 (None before the first one). The
        # official code keeps it as a Python float; it is saved here as extra state.
        self.last_eta: float | None = None
        self.context: TaskBatchContext | None = None
        self.regularization: Tensor | None = None

    @classmethod
    def from_batch_norm(
        cls, bn: nn.BatchNorm2d, num_tasks: int, kappa: float = 1.0, init_weight: float = 0.0
    ) -> "AdaB2N":
        """An AdaB²N layer that inherits ``bn``'s statistics, affine, eps, momentum and
        ``num_batches_tracked`` (κ = 0 counts batches from there, as the official code does)."""
        if not bn.track_running_stats or bn.running_mean is None:
            raise ValueError("AdaB2N replaces BatchNorm2d layers that track running statistics")
        reference = bn.running_mean
        param_dtype = bn.weight.dtype if bn.weight is not None else reference.dtype
        layer = cls(
            bn.num_features, num_tasks, kappa=kappa, eps=bn.eps, momentum=bn.momentum,
            affine=bn.affine, init_weight=init_weight, device=reference.device, dtype=param_dtype,
        )
        with torch.no_grad():
            layer.running_mean.copy_(bn.running_mean)
            layer.running_var.copy_(bn.running_var)
            layer.num_batches_tracked.copy_(bn.num_batches_tracked)
        if bn.affine:
            # Share the affine Parameters themselves: an optimizer built before the
            # conversion keeps training them (only ``task_weight`` is new).
            layer.weight, layer.bias = bn.weight, bn.bias
        layer.train(bn.training)
        return layer

    # ------------------------------------------------------------------ training-loop hooks
    def set_task_context(self, context: TaskBatchContext | None) -> None:
        """Task assignment of the next training forward (None: ordinary batch statistics).

        The context is used by exactly one training forward, then dropped.
        """
        self.context = context

    def end_task(self) -> None:
        """Mark the current task as finished (official ``end_task``)."""
        self.finished_tasks.add_(1)
        self._finished_cache = None

    @property
    def num_finished_tasks(self) -> int:
        # Cached on the host: reading the buffer would synchronise a GPU in every forward.
        if self._finished_cache is None:
            self._finished_cache = int(self.finished_tasks)
        return self._finished_cache

    @property
    def num_started_tasks(self) -> int:
        return self.num_finished_tasks + 1

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._finished_cache = None

    # ------------------------------------------------------------------ modified momentum
    def next_eta(self) -> float:
        """Advance and return the momentum η of the current training batch (§6).

        κ = 1: η = m. κ = 0: η = 1 / num_batches_tracked. Otherwise η_1 = m^κ and
        η_n = η_{n−1} / (η_{n−1} + (1 − m)^κ), converging to 1 − (1 − m)^κ. The sequence is
        global over training (not reset per task). Call after incrementing
        ``num_batches_tracked``.
        """
        m = float(self.momentum)
        if self.kappa == 1.0:
            return m
        if self.kappa == 0.0:
            return 1.0 / float(self.num_batches_tracked)
        if self.last_eta is None:
            self.last_eta = m**self.kappa
        else:
            self.last_eta = self.last_eta / (self.last_eta + (1.0 - m) ** self.kappa)
        return self.last_eta

    # ------------------------------------------------------------------ forward
    def _batch_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # The context describes one batch: consume it, so that a later training forward of a
        # different batch (e.g. a strategy that forwards replayed samples separately) falls
        # back to ordinary statistics instead of applying the wrong task counts.
        context, self.context = self.context, None
        if context is None or self.num_finished_tasks == 0:
            # First task, or no task information: ordinary biased batch statistics.
            var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
            return mean, var
        started = self.num_started_tasks
        if started > self.num_tasks:
            raise RuntimeError(
                f"AdaB2N was built for {self.num_tasks} tasks but task {started - 1} has started"
            )
        if context.sample_tasks.shape[0] != x.shape[0] or context.counts.shape[0] != started:
            raise ValueError(
                f"task context for {context.sample_tasks.shape[0]} samples and "
                f"{context.counts.shape[0]} tasks does not match a batch of {x.shape[0]} "
                f"samples with {started} started tasks"
            )
        weights = balanced_sample_weights(self.task_weight[:started], context)
        return weighted_batch_stats(x, weights)

    def _training_forward(self, x: Tensor) -> Tensor:
        self.num_batches_tracked.add_(1)
        eta = self.next_eta()
        compute = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        mean, var = self._batch_stats(compute)
        # γ (z − μ) / sqrt(σ² + ε) + β folded into one per-channel scale and shift: a single
        # fused pass over the activations instead of four.
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight
        shift = -mean * scale
        if self.affine:
            shift = shift + self.bias
        out = torch.addcmul(shift[None, :, None, None], compute, scale[None, :, None, None])
        with torch.no_grad():
            # §6 step 4: the (biased, weighted) batch variance enters the running variance.
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), eta)
            self.running_var.lerp_(var.detach().to(self.running_var.dtype), eta)
        # §6 step 5: against the *updated* running statistics, gradient through the batch ones.
        # The targets are copies, so a later forward's in-place update cannot invalidate the
        # graph of this regularizer before its backward.
        self.regularization = F.mse_loss(mean, self.running_mean.to(mean.dtype, copy=True)) + F.mse_loss(
            var, self.running_var.to(var.dtype, copy=True)
        )
        return out.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if self.training:
            return self._training_forward(x)
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> Any:
        return {"last_eta": self.last_eta}

    def set_extra_state(self, state: Any) -> None:
        last = state.get("last_eta") if isinstance(state, dict) else None
        self.last_eta = None if last is None or math.isnan(float(last)) else float(last)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_tasks={self.num_tasks}, kappa={self.kappa}"


def eta_sequence(momentum: float, kappa: float, length: int, start_batches: int = 0) -> list[float]:
    """The first ``length`` values of the modified momentum of a fresh layer (§6), for docs,
    plots and tests. ``start_batches`` is the wrapped BN's ``num_batches_tracked`` (κ = 0)."""
    layer = AdaB2N(1, 1, kappa=kappa, momentum=momentum)
    layer.num_batches_tracked.fill_(start_batches)
    values = []
    for _ in range(length):
        layer.num_batches_tracked.add_(1)
        values.append(layer.next_eta())
    return values
