"""``tent``: test entropy minimization over normalization affine parameters."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from tta.hyperparams import hparam
from tta.methods.affine import NormAffineObjective
from tta.methods.entropy import EntropyLossHparams, sample_entropy
from tta.methods.optim import OptimizerHparams, descend
from tta.registry import register_method


@dataclasses.dataclass
class TentHparams(OptimizerHparams, EntropyLossHparams):
    #: gradient steps per batch (official 1)
    steps: int = hparam(1, low=1)
    #: restore the wrap-time model and optimizer state before every batch
    episodic: bool = False


@register_method
class Tent(NormAffineObjective):
    """TENT (Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization",
    ICLR 2021, arXiv 2006.10726; docs/METHODS.md §2).

    * Normalization: alone, ``tent`` runs on ``norm`` (test-batch statistics, no running
      statistics kept: the paper's §3 "normalization statistics") on BatchNorm models, and
      directly on GroupNorm/LayerNorm models; compose it with any statistics method
      (``"unmix_tns+tent"``, ``"alpha_bn+tent"``, ``"bcn+tent"``).
    * Parameters: the affine parameters (gamma, beta; paper §3 "transformation parameters")
      of every normalization layer, including GroupNorm/LayerNorm as the mariodoebler port
      does (the official code has BatchNorm2d only); everything else is frozen.
    * Objective per batch: ``L = mean_b H(y_b)`` with ``H(y) = -sum_c p(y_c) log p(y_c)``
      (paper Eq. 1); with ``loss="come"``, COME's entropy of the opinion instead
      (:func:`tta.methods.entropy.opinion_entropy`, the authors' ``Tent_COME``). One optimizer step per iteration, ``steps`` iterations; the returned
      prediction is the output of the (last) forward, computed *before* that iteration's
      update (official behaviour; with ``steps = 1`` it is the pre-update prediction and
      ``no_adapt()`` returns exactly it).
    * Episodic: the wrapper restores model and optimizer state before every batch.

    Deviation: the model stays in eval mode (the official code calls ``model.train()``).
    Normalization ignores the mode (it always uses the batch, as the official code forces);
    only dropout/stochastic depth differ, which the mariodoebler port also keeps off.

    Robustness: a batch whose forward contains NaN/Inf contributes a zero gradient (checked on
    the device, see :func:`tta.methods.optim.nonfinite_guard_`), and the wrapper's guard
    puts parameters and Adam/SGD state back as they were (:class:`tta.Adapted`). No host
    synchronisation in the step.

    Half precision: the optimizer runs on fp32 master copies with fp32 state
    (:class:`tta.methods.optim.MasterOptimizer`); fp16 Adam state would underflow.
    """

    name = "tent"
    Hparams = TentHparams

    def step(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        assert self.optimizer is not None, "convert() must run first"
        out = None
        with torch.enable_grad():
            for _ in range(int(self.hparams.steps)):
                out = model(x)
                descend(self.optimizer, sample_entropy(out, self.hparams.loss).mean())
        return out.detach()  # type: ignore[union-attr]
