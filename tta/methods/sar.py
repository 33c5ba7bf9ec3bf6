"""``sar``: sharpness-aware and reliable entropy minimization with model recovery."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from tta.hyperparams import hparam
from tta.layers.base import AdaptiveNorm
from tta.methods.affine import configure_trainable, norm_parameters
from tta.methods.base import OBJECTIVE, Method
from tta.methods.entropy import EntropyLossHparams, sample_entropy
from tta.methods.optim import build_optimizer, load_optimizer_state, nonfinite_guard_, optimizer_state, present_grads
from tta.methods.state import state
from tta.registry import register_method
from tta.surgery import find_norm_layers

#: official exclusion for ResNets (torchvision/timm, BN or GN): the last stage
SAR_EXCLUDE_RESNET: tuple[str, ...] = (r"layer4",)
#: official exclusion for ViT-Base/16 (12 blocks): the last three blocks and the final norm
#: (the official rules are substrings "blocks.9/10/11", "norm." and the exact name "norm")
SAR_EXCLUDE_VIT_BASE: tuple[str, ...] = (r"blocks\.9", r"blocks\.10", r"blocks\.11", r"norm\.", r"^norm$")
#: the official ``collect_params`` applies both families' rules to every model
SAR_EXCLUDE_OFFICIAL: tuple[str, ...] = SAR_EXCLUDE_RESNET + SAR_EXCLUDE_VIT_BASE

#: the official code's recovery threshold, hard-coded in its adapt function
_OFFICIAL_E_M = 0.2


@dataclasses.dataclass
class SARHparams(EntropyLossHparams):
    #: learning rate of the base SGD; None: official rule for the model family and the batch
    #: size of the first batch (see :func:`sar_learning_rate`)
    lr: float | None = hparam(None, low=0.0, low_open=True)
    #: SAM radius rho (official 0.05)
    rho: float = hparam(0.05, low=0.0, symbol="ρ")
    #: adaptive SAM (scale the perturbation by |theta|); official False
    adaptive: bool = False
    #: entropy threshold E_0 of the reliable-sample filter; None: 0.4 ln C (C = classes)
    e0: float | None = hparam(None, low=0.0, low_open=True, symbol="E_0")
    #: recovery threshold e_m on the moving average of the second loss (official 0.2)
    e_m: float = hparam(0.2, symbol="e_m")
    #: decay of that moving average (official 0.9: ema <- 0.9 ema + 0.1 loss)
    ema_decay: float = hparam(0.9, low=0.0, high=1.0, high_open=True)
    #: SGD momentum of the base optimizer (official 0.9, no Nesterov, no weight decay)
    sgd_momentum: float = hparam(0.9, low=0.0, high=1.0, high_open=True)
    #: regular expressions of module names whose affine parameters stay frozen (re.search);
    #: default: the official rules for ResNets (``layer4``) and ViT-Base (last 3 blocks, final norm)
    exclude: tuple[str, ...] = SAR_EXCLUDE_OFFICIAL
    #: reproduce the official code's quirks: recovery threshold hard-coded to 0.2 (``e_m`` is
    #: ignored), the loss average kept, not cleared, and the SGD momentum buffers kept, not
    #: reset, after a recovery
    faithful: bool = False
    #: restore the wrap-time model and optimizer state before every batch
    episodic: bool = False


def sar_model_family(model: nn.Module) -> str:
    """``"vit"`` for transformer-like models (LayerNorm and no BatchNorm/GroupNorm/statistics
    layer), ``"resnet"`` otherwise; selects the official learning-rate rule."""
    has_ln = any(isinstance(m, nn.LayerNorm) for m in model.modules())
    has_conv_norm = bool(find_norm_layers(model)) or any(
        isinstance(m, (nn.GroupNorm, AdaptiveNorm)) for m in model.modules()
    )
    return "vit" if has_ln and not has_conv_norm else "resnet"


def sar_learning_rate(family: str, batch_size: int) -> float:
    """The official SAR learning rule (mr-eggplant/SAR main.py) for batch size ``bs``:

    * ResNet-50 (BN or GN): ``0.00025`` if ``bs >= 32``, else ``0.00025 * bs / 32``;
    * ViT-Base/16: ``0.001 * bs / 64``;
    * doubled at ``bs = 1`` (the official "bs1" setting for SAR).
    """
    if family == "vit":
        lr = 0.001 / 64 * batch_size
    else:
        lr = 0.00025 if batch_size >= 32 else 0.00025 / 64 * batch_size * 2
    if batch_size == 1:
        lr *= 2
    return lr


@register_method
class SAR(Method):
    """SAR (Niu et al., "Towards Stable Test-Time Adaptation in Dynamic Wild World", ICLR 2023,
    arXiv 2302.12400; docs/METHODS.md §3). Per batch x, with parameters theta:

    1. forward ``y = f_theta(x)`` (the returned prediction), entropies ``e_b = H(y_b)``;
    2. reliable filter (paper Eq. 2): ``S1 = {b : e_b < E_0}``, ``E_0 = 0.4 ln C``;
       ``L1 = mean_{S1} e_b``; backward;
    3. SAM (Eq. 4, first-order solution of the inner maximization):
       ``eps = rho g / (||g|| + 1e-12)``, g the gradient of all trainable parameters;
       save theta; ``theta <- theta + eps``;
    4. second forward at ``theta + eps``; ``S2 = {b in S1 : e'_b < E_0}``;
       ``L2 = mean_{S2} e'_b``;
    5. ``ema <- L2`` (first) or ``0.9 ema + 0.1 L2`` when S2 is not empty (the moving average
       of the recovery scheme); backward of L2; restore theta exactly (the saved copy, not
       ``theta - eps``); SGD step with the gradient taken at ``theta + eps``;
    6. model recovery: ``ema < e_m`` -> restore the wrap-time parameters, statistics and
       optimizer state, clear the average.

    An empty S1 or S2 gives a zero gradient (as the official code's mean over an empty set
    does); SGD momentum still moves the parameters, as in the official code.

    Trainable parameters: affine parameters of every normalization layer (BatchNorm via the
    statistics layers, GroupNorm, LayerNorm) except those whose module name matches
    ``exclude`` (official: ``layer4`` of ResNets, ``blocks.9-11`` and the final ``norm`` of
    ViT-Base; name rules that select nothing on models named otherwise, so pass your own).

    Learning rate: ``lr=None`` applies :func:`sar_learning_rate` to the family
    (:func:`sar_model_family`) and the size of the first batch.

    Official-code quirks (``faithful=True`` reproduces them; the default corrects them):

    * the recovery threshold is hard-coded to 0.2 (the ``e_m`` argument is unused);
    * after a recovery the moving average is not cleared (the reset's ``ema = None`` is
      overwritten by the low value), so recoveries tend to repeat on consecutive batches.
      The corrected behaviour clears it (as the mariodoebler port does);
    * a recovery restores the optimizer through the SAM wrapper, which leaves the base SGD's
      momentum buffers as they are (docs/METHODS.md §3): with ``faithful=True`` they
      survive the recovery, by default they are reset with everything else, so that the state
      after a recovery is exactly the wrap-time state.

    Composition: alone on a BatchNorm model SAR runs on ``norm`` (batch statistics, as the
    official code forces); ``"unmix_tns+sar"`` etc. run it on other statistics layers. SAR
    forwards twice per batch, and stateful statistics layers see both forwards; they update
    once per step, from the first (prediction) forward, and the second forward normalizes
    with the same pre-update statistics (see :class:`tta.layers.base.AdaptiveNorm`); the
    official UnMix-TNS code would update its components twice. A recovery also drops the
    statistics update staged by the step, so the state after it is exactly the initial one,
    as the official full-state reset gives.

    Cost: two forward and two backward passes per batch, nothing recomputed (the first
    forward's output is the prediction; the gradient norm for SAM also serves the
    non-finite guard). One host-device synchronisation per batch: the recovery decision
    (``ema < e_m``), which decides whether state is reset. The empty-set and NaN checks run on
    the device (``torch.where``).

    COME (``loss="come"``, the authors' ``SAR_COME``): both entropies, the two reliable filters
    (same ``E_0``), both losses and so the recovery's moving average are COME's entropy of the
    opinion (:func:`tta.methods.entropy.opinion_entropy`); everything else is unchanged.

    Deviation: eval mode instead of the official ``model.train()`` (normalization uses batch
    statistics regardless; dropout/stochastic depth stay off, as in the mariodoebler port).
    """

    name = "sar"
    role = OBJECTIVE
    Hparams = SARHparams
    default_statistics = "norm"

    optimizer = state(None)
    #: whether the learning rate is set (False until the first batch when ``lr`` is None)
    _lr_resolved = state(lambda m: m.hparams.lr is not None)
    #: the moving average of the second loss, 0-d float32, valid where ``_ema_set``; created
    #: here (moved to the model's device in convert) so that no state tensor appears in a step
    _ema = state(lambda m: torch.zeros(()))
    _ema_set = state(lambda m: torch.zeros((), dtype=torch.bool))
    num_recoveries = state(0)

    # -- setup ------------------------------------------------------------------------------
    def convert(self, model: nn.Module) -> nn.Module:
        named = norm_parameters(model, self.hparams.exclude)
        self.params = configure_trainable(model, [p for _, p in named], self.name)
        self.param_names = [n for n, _ in named]
        self.family = sar_model_family(model)
        self.optimizer = build_optimizer(
            self.params, "sgd", self.hparams.lr or 0.0, momentum=self.hparams.sgd_momentum
        )  # type: ignore[assignment]
        # Recovery restores everything a step can change: the trainable parameters and the
        # buffers (statistics layers' state); frozen parameters never change. Looked up by
        # name at recovery time, so moving the model to another device keeps working.
        trainable = {id(p) for p in self.params}
        self._recovery_state = {
            ("param", n): p.detach().clone() for n, p in model.named_parameters() if id(p) in trainable
        }
        self._recovery_state.update({("buffer", n): b.detach().clone() for n, b in model.named_buffers()})
        self._recovery_optimizer = optimizer_state(self.optimizer)
        if self.params:
            device = self.params[0].device
            self._ema, self._ema_set = self._ema.to(device), self._ema_set.to(device)
        return model

    def e0_for(self, num_classes: int) -> float:
        return self.hparams.e0 if self.hparams.e0 is not None else 0.4 * math.log(num_classes)

    def _resolve_lr(self, batch_size: int) -> None:
        lr = sar_learning_rate(self.family, batch_size)
        for group in self.optimizer.param_groups:  # type: ignore[union-attr]
            group["lr"] = lr
        self._lr_resolved = True

    # -- step -------------------------------------------------------------------------------
    def step(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        optimizer = self.optimizer
        assert optimizer is not None, "convert() must run first"
        hp = self.hparams
        if not self._lr_resolved:
            self._resolve_lr(x.shape[0])
        params = self.params
        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            # forward 1 at theta: the prediction; reliable filter S1
            out = model(x)
            e0 = self.e0_for(out.shape[1])
            ent = sample_entropy(out, hp.loss)
            reliable = ent < e0  # NaN entropies are never reliable
            count = reliable.sum()
            loss = torch.where(reliable, ent, 0.0).sum() / count.clamp_min(1)
            loss.backward()  # backward 1

            # SAM first step: theta <- theta + rho g / (||g|| + 1e-12)
            perturbed, grads = present_grads(params)
            with torch.no_grad():
                if hp.adaptive:
                    scaled = torch._foreach_mul(grads, [p.abs() for p in perturbed]) if grads else []
                    norm = nonfinite_guard_(grads, torch._foreach_norm(scaled) if scaled else None)
                else:
                    norm = nonfinite_guard_(grads)
                saved = torch._foreach_clone([p.detach() for p in perturbed]) if perturbed else []
                if perturbed:
                    scale = hp.rho / (norm + 1e-12)  # norm is 0 when the guard zeroed the grads
                    if hp.adaptive:  # eps = rho |theta|^2 g / || |theta| g ||
                        steps = torch._foreach_mul(grads, torch._foreach_mul(saved, saved))
                        torch._foreach_mul_(steps, scale)
                    else:
                        steps = torch._foreach_mul(grads, scale)
                    torch._foreach_add_(perturbed, steps)
            optimizer.zero_grad(set_to_none=True)

            # forward 2 at theta + eps, on S1 only; second filter S2
            ent2 = sample_entropy(model(x), hp.loss)
            reliable2 = reliable & (ent2 < e0)
            count2 = reliable2.sum()
            loss2 = torch.where(reliable2, ent2, 0.0).sum() / count2.clamp_min(1)
            loss2.backward()  # backward 2

        with torch.no_grad():
            valid = (count2 > 0) & torch.isfinite(loss2)
            self._update_ema(loss2.detach(), valid)
            _, grads2 = present_grads(params)
            nonfinite_guard_(grads2)
            if perturbed:  # SAM second step: restore theta exactly, then the base step
                torch._foreach_copy_([p.detach() for p in perturbed], saved)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # model recovery. The one host synchronisation of the step: whether to reset is a
        # decision on the moving average (algorithmic; official code does the same with .item())
        # A batch with NaN/Inf in its output never recovers: the wrapper undoes its step anyway
        # (tta.Adapted), and a recovery it then undid would still be counted.
        threshold = _OFFICIAL_E_M if hp.faithful else hp.e_m
        if bool(self._ema_set & (self._ema < threshold) & torch.isfinite(out).all()):
            self._recover(model)
        return out.detach()

    def _update_ema(self, loss: torch.Tensor, valid: torch.Tensor) -> None:
        if self._ema.device != loss.device:
            self._ema, self._ema_set = self._ema.to(loss.device), self._ema_set.to(loss.device)
        decay = self.hparams.ema_decay
        averaged = torch.where(self._ema_set, decay * self._ema + (1.0 - decay) * loss, loss)
        self._ema = torch.where(valid, averaged, self._ema)
        self._ema_set = self._ema_set | valid

    def _recover(self, model: nn.Module) -> None:
        """Restore the wrap-time parameters, buffers and optimizer state (keeping the lr)."""
        with torch.no_grad():
            for (kind, name), initial in self._recovery_state.items():
                current = model.get_parameter(name) if kind == "param" else model.get_buffer(name)
                current.copy_(initial)
        optimizer = self.optimizer
        assert optimizer is not None
        lrs = [group["lr"] for group in optimizer.param_groups]
        # Official: the optimizer is restored through the SAM wrapper's load_state_dict, which
        # restores the wrapper's own state and not the wrapped SGD's, so the momentum buffers
        # survive the recovery (mr-eggplant/SAR sar.py reset, sam.py load_state_dict).
        kept = {master: dict(state) for master, state in optimizer.state.items()} if self.hparams.faithful else {}
        load_optimizer_state(optimizer, self._recovery_optimizer)
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        for master, entry in kept.items():
            optimizer.state[master] = entry
        for layer in model.modules():
            if isinstance(layer, AdaptiveNorm):
                layer.discard()  # drop this step's staged statistics update too
        if not self.hparams.faithful:
            self._ema_set = torch.zeros_like(self._ema_set)
        self.num_recoveries += 1
