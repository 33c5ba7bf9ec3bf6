"""``eata`` / ``eta``: efficient anti-forgetting test-time adaptation (reliable and
non-redundant sample selection, with or without the Fisher regularizer)."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tta.hyperparams import hparam
from tta.layers.base import AdaptiveNorm
from tta.methods.affine import NormAffineObjective
from tta.methods.entropy import EntropyLossHparams, sample_entropy
from tta.methods.optim import OptimizerHparams, descend
from tta.methods.state import state
from tta.registry import register_method

logger = logging.getLogger("tta")

#: decay of the moving average of predictions (hard-coded 0.9 in the official code)
PROBS_DECAY = 0.9


def select_samples(
    logits: torch.Tensor, e0: float, d_margin: float, probs_avg: torch.Tensor, probs_set: torch.Tensor,
    loss: str = "entropy",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EATA's sample selection (paper Eqs. 3-5) on one batch; returns
    ``(entropies, reliable, selected)``, the entropies ``H(y_b)`` in fp32 (of the ``loss``:
    softmax entropy, or COME's entropy of the opinion) and two masks:

    * reliable: ``H(y_b) < E_0`` (Eq. 3);
    * non-redundant: ``|cos(softmax(y_b), m)| < eps`` (Eq. 5) against the moving average
      ``m`` of the predictions; while ``m`` is unset (``probs_set`` False) every reliable
      sample is non-redundant (official: the check needs a previous average);
    * selected = reliable and non-redundant.
    """
    ent = sample_entropy(logits, loss)
    reliable = ent < e0
    probs = torch.softmax(logits.float(), dim=1)
    if probs_avg.shape[0] == probs.shape[1]:
        cosine = F.cosine_similarity(probs_avg.unsqueeze(0), probs, dim=1)
        diverse = (cosine.abs() < d_margin) | ~probs_set
    else:  # the first batch: no average yet
        diverse = torch.ones_like(reliable)
    return ent, reliable, reliable & diverse


def update_probs_average(
    probs: torch.Tensor, selected: torch.Tensor, probs_avg: torch.Tensor, probs_set: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The moving average of predictions (Eq. 4) over the selected samples' ``probs``:
    the first non-empty selection sets ``m = mean_b p_b``; later ones
    ``m <- 0.9 m + 0.1 mean_b p_b``; an empty selection keeps ``m``. Decided on the device.
    Returns the new ``(m, set)``."""
    count = selected.sum()
    mean = (probs * selected.unsqueeze(1)).sum(0) / count.clamp_min(1)
    if probs_avg.shape != mean.shape:
        probs_avg, probs_set = torch.zeros_like(mean), torch.zeros((), dtype=torch.bool, device=mean.device)
    blended = torch.where(probs_set, PROBS_DECAY * probs_avg + (1.0 - PROBS_DECAY) * mean, mean)
    nonempty = count > 0
    return torch.where(nonempty, blended, probs_avg), probs_set | nonempty


def eata_loss(ent: torch.Tensor, selected: torch.Tensor, e0: float) -> torch.Tensor:
    """Weighted entropy of the selected samples (Eq. 6/8 without the regularizer):
    ``mean_{b selected} exp(E_0 - H(y_b)) H(y_b)``, the weight without gradient (official
    ``1 / exp(H - E_0)``). An empty selection gives 0 (its step is skipped anyway)."""
    coeff = 1.0 / torch.exp(ent.detach() - e0)
    return torch.where(selected, ent * coeff, 0.0).sum() / selected.sum().clamp_min(1)


def _batch_input(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict) and isinstance(batch.get("x", batch.get("image")), torch.Tensor):
        return batch.get("x", batch.get("image"))
    raise TypeError(
        "fisher_loader must yield tensors, (inputs, ...) tuples/lists or dicts with an 'x' or 'image' "
        f"tensor; got {type(batch).__name__}"
    )


def compute_fisher(
    model: nn.Module, params: list[nn.Parameter], loader: Iterable[Any]
) -> list[torch.Tensor]:
    """Diagonal Fisher information of ``params`` on source data (paper Eq. 9, official code):

    for every batch of ``loader``: ``L = CE(f(x), argmax f(x))`` (mean over the batch, the
    model's own predictions as labels), backward, accumulate ``grad^2``; divide the sum by
    the number of batches. Run as the adapted model normalizes (e.g. test-batch statistics
    under ``norm``), with statistics layers frozen (no state changes), as the official code
    computes it after configuring batch statistics. Returns fp32 tensors like ``params``."""
    layers = [m for m in model.modules() if isinstance(m, AdaptiveNorm)]
    adapting = [layer.adapting for layer in layers]
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    device = params[0].device
    batches = 0
    try:
        for layer in layers:
            layer.adapting = False
        for batch in loader:
            x = _batch_input(batch)
            x = x.to(device=device, dtype=params[0].dtype if x.is_floating_point() else None)
            with torch.enable_grad():
                out = model(x)
                loss = F.cross_entropy(out.float(), out.detach().argmax(1))
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            for acc, grad in zip(fisher, grads):
                if grad is not None:
                    acc.add_(grad.detach().float().square())
            batches += 1
    finally:
        for layer, flag in zip(layers, adapting):
            layer.adapting = flag
            layer.discard()
    if batches == 0:
        raise ValueError("fisher_loader yielded no batch")
    return [acc / batches for acc in fisher]


@dataclasses.dataclass
class ETAHparams(OptimizerHparams, EntropyLossHparams):
    #: Nesterov momentum for SGD (SGD only; the official EATA code uses none)
    nesterov: bool = False
    #: entropy margin E_0 (Eq. 3); None: 0.4 ln C for C classes (official 0.4 ln 1000)
    e0: float | None = hparam(None, low=0.0, low_open=True, symbol="E_0")
    #: redundancy margin epsilon of |cos| (Eq. 5): 0.4, the mariodoebler CIFAR-10-C config
    #: (with 10 classes the official ImageNet default 0.05 would reject nearly every sample)
    d_margin: float = hparam(0.4, low=0.0, low_open=True, symbol="ε")
    #: gradient steps per batch (official 1)
    steps: int = hparam(1, low=1)
    #: restore the wrap-time model and method state before every batch
    episodic: bool = False


@register_method
class ETA(NormAffineObjective):
    """ETA: EATA without the anti-forgetting regularizer (Niu et al., "Efficient Test-Time
    Model Adaptation without Forgetting", ICML 2022, arXiv 2204.02610; official code
    mr-eggplant/EATA ``eata.py``, run there with ``--algorithm eta``).

    Trainable: the affine parameters of every normalization layer (the official code has
    BatchNorm2d only; GroupNorm/LayerNorm as in the mariodoebler port); alone on a BatchNorm
    model it runs on ``norm`` (test-batch statistics, as the official code forces). Per batch,
    ``steps`` times:

    1. ``y = f_theta(x)`` (the returned prediction), ``H(y_b)``;
    2. selection (:func:`select_samples`): reliable ``H(y_b) < E_0`` (Eq. 3) and, once a
       moving average ``m`` of predictions exists, non-redundant
       ``|cos(softmax(y_b), m)| < eps`` (Eq. 5);
    3. ``m`` updated from the selected samples (:func:`update_probs_average`, Eq. 4);
    4. loss ``mean_{selected} exp(E_0 - H(y_b)) H(y_b)`` (:func:`eata_loss`, Eq. 6) plus, for
       EATA, ``beta sum_i F_i (theta_i - theta_i^0)^2`` (Eq. 8);
    5. one optimizer step, **skipped when no sample is selected** (official: no backward,
       no step, so momentum does not move either).

    Cost: one forward and one backward. One host synchronisation per step: whether the
    selection is empty, which decides whether the optimizer steps (an algorithmic decision;
    the official code makes it on the host too). The counters ``num_reliable`` and
    ``num_selected`` (samples after the first and both filters, official
    ``num_samples_update_1/2``) are device tensors.

    COME (``loss="come"``, the authors' ``EATA_COME``): ``H`` is COME's entropy of the opinion
    (:func:`tta.methods.entropy.opinion_entropy`) everywhere the method uses an entropy: the
    reliability filter (same ``E_0``), the weight ``exp(E_0 - H)`` and the loss; the
    redundancy filter and ``m`` stay on the softmax probabilities, as in the authors' code.

    Deviation: eval mode instead of the official ``model.train()`` (normalization uses batch
    statistics either way; dropout/stochastic depth stay off, as in the mariodoebler port).
    """

    name = "eta"
    Hparams = ETAHparams

    #: moving average of predictions (empty until the first batch gives C) and whether set
    probs_avg = state(lambda m: torch.zeros(0))
    probs_set = state(lambda m: torch.zeros((), dtype=torch.bool))
    num_reliable = state(lambda m: torch.zeros((), dtype=torch.long))
    num_selected = state(lambda m: torch.zeros((), dtype=torch.long))
    #: Fisher diagonals and anchor values of the trainable parameters (EATA); empty: none
    fisher = state(lambda m: [])
    anchors = state(lambda m: [])

    def e0_for(self, num_classes: int) -> float:
        return self.hparams.e0 if self.hparams.e0 is not None else 0.4 * math.log(num_classes)

    def regularizer(self) -> torch.Tensor | None:
        """``beta sum_i F_i (theta_i - theta_i^0)^2`` (Eq. 8), or None without a Fisher."""
        return None

    def step(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        optimizer = self.optimizer
        assert optimizer is not None, "convert() must run first"
        hp = self.hparams
        out = None
        for _ in range(int(hp.steps)):
            with torch.enable_grad():
                out = model(x)
                e0 = self.e0_for(out.shape[1])
                if self.probs_avg.device != out.device:
                    self.probs_avg, self.probs_set = self.probs_avg.to(out.device), self.probs_set.to(out.device)
                ent, reliable, selected = select_samples(out, e0, hp.d_margin, self.probs_avg, self.probs_set, hp.loss)
                loss = eata_loss(ent, selected, e0)
                penalty = self.regularizer()
                if penalty is not None:
                    loss = loss + penalty
            with torch.no_grad():
                probs = torch.softmax(out.detach().float(), dim=1)
                self.probs_avg, self.probs_set = update_probs_average(probs, selected, self.probs_avg, self.probs_set)
                count = selected.sum()
                self.num_reliable = self.num_reliable.to(out.device) + reliable.sum()
                self.num_selected = self.num_selected.to(out.device) + count
            if bool(count > 0):  # the step's host synchronisation: skip the update when empty
                descend(optimizer, loss)
        return out.detach()  # type: ignore[union-attr]


@dataclasses.dataclass
class EATAHparams(ETAHparams):
    #: trade-off beta of the Fisher regularizer (Eq. 8): 1, the mariodoebler CIFAR-10-C
    #: config; official ImageNet default 2000. 0 runs ETA.
    fisher_alpha: float = hparam(1.0, low=0.0, symbol="β")
    #: source data for the Fisher information: any iterable of batches (tensors, or tuples /
    #: lists whose first item is the input, e.g. a torch DataLoader; labels are ignored).
    #: Read once at wrap time; None runs ETA (with a warning). Official: 2,000 clean
    #: validation images at the test batch size.
    fisher_loader: Any = None


@register_method
class EATA(ETA):
    """EATA (Niu et al., ICML 2022, arXiv 2204.02610; official code mr-eggplant/EATA):
    :class:`ETA` plus the anti-forgetting regularizer ``beta sum_i F_i (theta_i -
    theta_i^0)^2`` (Eq. 8), with ``theta^0`` the wrap-time parameters and ``F`` the diagonal
    Fisher information of :func:`compute_fisher` on the user's source data.

    Pass the data at wrap time: ``tta.adapt(model, "eata", fisher_loader=loader)``; ``loader``
    is iterated once (any iterable of input batches or ``(inputs, labels)`` batches, on any
    device: batches move to the model's). Without it (or with ``fisher_alpha=0``) EATA is ETA,
    as in the mariodoebler port, and says so in a warning. The Fisher and the anchors are
    method state (saved with ``state_dict()``, kept by ``reset()``), so a restored wrapper
    needs no loader; the loader itself is not kept after wrapping.
    """

    name = "eata"
    Hparams = EATAHparams
    requires = "source data for the Fisher regularizer (fisher_loader=...); without it eata runs as eta"
    source_data_argument = "fisher_loader"

    def convert(self, model: nn.Module) -> nn.Module:
        model = super().convert(model)
        hp = self.hparams
        loader = self.take_source_data()
        if loader is None or hp.fisher_alpha == 0.0:
            logger.warning("eata: no fisher_loader (or fisher_alpha=0): running as ETA, without the Fisher regularizer")
            return model
        self.fisher = compute_fisher(model, self.params, loader)
        self.anchors = [p.detach().float().clone() for p in self.params]
        return model

    def regularizer(self) -> torch.Tensor | None:
        if not self.fisher:
            return None
        # on the parameters themselves: the fp32 masters of half-precision models receive
        # their gradients from the parameters (MasterOptimizer.step)
        total = sum((f * (p.float() - a).square()).sum() for f, p, a in zip(self.fisher, self.params, self.anchors))
        return self.hparams.fisher_alpha * total  # type: ignore[return-value]

