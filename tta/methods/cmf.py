"""``cmf``: continual momentum filtering, ROID's objective with a Kalman-style filter between
the source and the target parameters (CMF)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from tta.hyperparams import hparam
from tta.methods.optim import OptimizerHparams, descend
from tta.methods.roid import ROID, prior_correction
from tta.methods.state import state
from tta.registry import register_method

#: the official process noise is ``Q * (trainable parameters / 38400)``: the noise variance is
#: set per 38400 trained values (a reference parameter count of the authors' code)
_REFERENCE_PARAMS = 38400
#: the official bounds of the filter gain: beta is raised to 0.89 at least, and set to 1 (no
#: correction) from 0.9999 on
_BETA_MIN = 0.89
_BETA_ONE = 0.9999


def filter_gain(variance: float, alpha: float, q: float) -> tuple[float, float]:
    """One step of the scalar filter (the paper's Kalman "predict" and "update"), on host floats:

    * predict: ``P <- alpha^2 P + q`` (the hidden state ``h <- alpha h + (1 - alpha) theta_src``
      is a random walk towards the source with process noise ``q``);
    * update with observation noise ``r = 1 - q``: ``beta = r / (P + r)`` (``1 - beta`` is the
      Kalman gain), bounded as in the official code (``beta = max(beta, 0.89)``; ``beta = 1``
      when ``beta >= 0.9999``), then ``P <- beta P``.

    Returns ``(beta, new P)``. Neither depends on the data: the sequence of gains is fixed by
    ``alpha``, ``q`` and the number of steps taken."""
    variance = alpha**2 * variance + q
    r = 1.0 - q
    beta = r / (variance + r)
    beta = beta if beta > _BETA_MIN else _BETA_MIN
    beta = beta if beta < _BETA_ONE else 1.0
    return beta, beta * variance


def momentum_filter_(
    params: list[torch.Tensor],
    hidden: list[torch.Tensor],
    source: list[torch.Tensor],
    alpha: float,
    beta: float,
    gamma: float,
) -> None:
    """The parameter part of one filter step, in place (the official ``"lp"`` order):

    1. predict the hidden parameters: ``h <- alpha h + (1 - alpha) theta_src``;
    2. correct them with the adapted ones: ``h <- beta h + (1 - beta) theta``;
    3. pull the adapted ones towards them: ``theta <- gamma theta + (1 - gamma) h``.

    A momentum of 1 leaves its target as it is (as the official ``ema_update_model``)."""
    if not params:
        return
    with torch.no_grad():
        for momentum, target, other in ((alpha, hidden, source), (beta, hidden, params), (gamma, params, hidden)):
            if momentum < 1.0:
                torch._foreach_mul_(target, momentum)
                torch._foreach_add_(target, other, alpha=1.0 - momentum)


@dataclasses.dataclass
class CMFHparams(OptimizerHparams):
    #: gradient steps per batch (official 1)
    steps: int = hparam(1, low=1)
    #: certainty and diversity weighting of ROID's loss (official True)
    weighting: bool = True
    #: prior correction of the returned output (official True)
    prior_correction: bool = True
    #: ROID's consistency loss on an augmented view (official True; needs image batches in
    #: [0, 1] and torchvision)
    consistency: bool = True
    #: momentum of the moving average of mean predictions (official 0.9)
    momentum_probs: float = hparam(0.9, low=0.0, high=1.0)
    #: temperature T of the weights exp(d c / T) (official 1/3)
    temperature: float = hparam(1.0 / 3.0, low=0.0, low_open=True, symbol="T")
    #: alpha, the hidden parameters' momentum towards the source in the predict step (official
    #: 0.99)
    alpha: float = hparam(0.99, low=0.0, high=1.0, symbol="α")
    #: gamma, the adapted parameters' momentum towards the hidden ones (official 0.99)
    gamma: float = hparam(0.99, low=0.0, high=1.0, symbol="γ")
    #: Q, process noise per 38400 trained values (official 0.005); q = Q * #params / 38400
    q: float = hparam(0.005, low=0.0, symbol="Q")
    #: restore the wrap-time model and method state before every batch
    episodic: bool = False


@register_method
class CMF(ROID):
    """CMF (Lee & Chang, "Continual Momentum Filtering on Parameter Space for Online Test-time
    Adaptation", ICLR 2024, OpenReview BllUWdpIOA; official code in
    mariodoebler/test-time-adaptation ``classification/methods/cmf.py`` with the defaults of its
    ``conf.py``).

    Objective and prediction: ROID's (:class:`tta.methods.roid.ROID`, whose loss the official CMF
    class repeats): the normalization affine parameters ``theta`` (on ``norm`` alone) are trained
    with the certainty- and diversity-weighted soft likelihood ratio plus the weighted symmetric
    cross-entropy against one augmented view, and the returned output is the pre-update
    forward with the prior correction. Where ROID then ensembles ``theta`` with the source
    parameters, CMF runs a filter over parameter space after every optimizer step.

    The filter (:func:`filter_gain`, :func:`momentum_filter_`) keeps hidden
    parameters ``h`` (initially the source ``theta_src``) and a scalar variance ``P`` (initially
    0), with ``q = Q * |theta| / 38400`` (``|theta|`` the number of trained values) and
    ``r = 1 - q``:

    1. predict: ``h <- alpha h + (1 - alpha) theta_src`` and ``P <- alpha^2 P + q``: without
       evidence the hidden model drifts back to the source, and grows less certain;
    2. update, with ``theta`` (just trained) as the noisy observation of ``h``:
       ``beta = r / (P + r)`` bounded to ``[0.89, 0.9999)`` (1 above), ``P <- beta P``,
       ``h <- beta h + (1 - beta) theta``;
    3. parameter ensemble: ``theta <- gamma theta + (1 - gamma) h``.

    ``alpha`` 0.99, ``gamma`` 0.99, ``Q`` 0.005, as in the official configuration. The gains
    depend on nothing but the step count, and are computed on the host.

    Where the official code and the paper differ, we follow the code: the bounds on ``beta``
    and the scaling of ``q`` by the parameter count appear in the code only. The official
    option ``CMF.TYPE`` ("lp", the default, or "op": ensemble with the predicted rather than the
    corrected hidden model) is not offered: in the official code the predicted and corrected
    hidden models are one object, updated in place, so both settings run the same update.

    Departures from the official code, of form rather than effect (besides ROID's, listed
    there): the hidden model is kept for the trained parameters only, in fp32 (the official
    one is a full copy of the network whose other parameters never reach the adapted model);
    the variance ``P`` is a host float, so a step's guard reads its finiteness flag once
    (:class:`tta.methods.state.StateGuard`).

    Cost: ROID's (two forwards and one backward) plus three fused updates of the trained
    parameters. Host synchronisations: ROID's (one with ``consistency``) and the guard's read.
    """

    name = "cmf"
    Hparams = CMFHparams

    #: fp32 hidden parameters h of the filter (one per trained parameter)
    hidden_params = state(lambda m: [])
    #: the filter's variance P
    hidden_var = state(0.0)

    def convert(self, model: nn.Module) -> nn.Module:
        model = super().convert(model)
        self.hidden_params = [p.clone() for p in self.source_params]
        self.process_noise = float(self.hparams.q) * sum(p.numel() for p in self.params) / _REFERENCE_PARAMS
        if self.process_noise >= 1.0:
            raise ValueError(
                f"cmf's process noise q = Q * {sum(p.numel() for p in self.params)} / {_REFERENCE_PARAMS} = "
                f"{self.process_noise:.4g} must be below 1 (the observation noise is 1 - q); lower q"
            )
        return model

    def step(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        optimizer = self.optimizer
        assert optimizer is not None, "convert() must run first"
        hp = self.hparams
        out = None
        with torch.enable_grad():
            for _ in range(int(hp.steps)):
                out = model(x)
                descend(optimizer, self._loss(model, x, out))
                beta, self.hidden_var = filter_gain(self.hidden_var, hp.alpha, self.process_noise)
                # the filter runs on the fp32 masters (the parameters themselves for fp32
                # models), written back into half-precision parameters
                momentum_filter_(optimizer.masters, self.hidden_params, self.source_params, hp.alpha, beta, hp.gamma)
                with torch.no_grad():
                    copies = [(p, m) for p, m in zip(optimizer.params, optimizer.masters) if p is not m]
                    if copies:
                        torch._foreach_copy_([p for p, _ in copies], [m for _, m in copies])
        out = out.detach()  # type: ignore[union-attr]
        return prior_correction(out) if hp.prior_correction else out
