"""``tribe``: tri-net self-training with balanced normalization (TRIBE)."""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from tta.hyperparams import hparam
from tta.methods.affine import configure_trainable, norm_parameters
from tta.methods.base import OBJECTIVE, Method
from tta.methods.entropy import softmax_entropy
from tta.methods.optim import build_optimizer, descend
from tta.methods.state import state
from tta.methods.strong_augment import RANGES, strong_augment
from tta.registry import register_method


@dataclasses.dataclass
class TRIBEHparams:
    #: Adam learning rate (official default 1e-3)
    lr: float = hparam(1e-3, low=0.0, low_open=True)
    #: Adam beta_1 (beta_2 is 0.999), official 0.9
    beta: float = hparam(0.9, low=0.0, high=1.0, high_open=True, symbol="β₁")
    #: weight decay (official 0)
    weight_decay: float = hparam(0.0, low=0.0)
    #: H_0, entropy threshold as a fraction of ln K (official CIFAR-10 0.05, CIFAR-100 0.2,
    #: ImageNet 0.4)
    h0: float = hparam(0.05, low=0.0, low_open=True, symbol="H_0")
    #: lambda, weight of the anchor (source-network) regularizer (official 0.5)
    anchor_weight: float = hparam(0.5, low=0.0, symbol="λ")
    #: augmentation of the student's input: "strong" (official), "soft" or "none"; expects
    #: images in [0, 1], drawn from the wrapper's seeded generator
    augment: str = hparam("strong", choices=(*RANGES, "none"))


class TriNet(nn.Module):
    """TRIBE's three networks: the student, the teacher ("aux", sharing the student's
    parameters but keeping its own normalization statistics) and the anchor (a frozen copy
    of the source parameters with its own statistics). ``forward`` is the teacher's."""

    def __init__(self, student: nn.Module, teacher: nn.Module, anchor: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.anchor = anchor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(x)


def _label_layers(model: nn.Module, labels: torch.Tensor | None) -> None:
    for module in model.modules():
        if hasattr(module, "labels"):
            module.labels = labels  # type: ignore[attr-defined]


def _set_frozen(model: nn.Module, frozen: bool) -> None:
    for module in model.modules():
        if hasattr(module, "frozen"):
            module.frozen = frozen  # type: ignore[attr-defined]


def _tie_parameters(target: nn.Module, source: nn.Module) -> None:
    """Make every parameter of ``target`` the same object as ``source``'s of the same name."""
    for name, param in source.named_parameters():
        owner_name, _, attribute = name.rpartition(".")
        owner = target.get_submodule(owner_name) if owner_name else target
        setattr(owner, attribute, param)


@register_method
class TRIBE(Method):
    """TRIBE (Su, Xu & Jia, "Towards Real-World Test-Time Adaptation: Tri-Net Self-Training
    with Balanced Normalization", AAAI 2024, arXiv 2309.14949, §4.2; official code
    Gorilla-Lab-SCUT/TRIBE ``core/adapter/TRIBE.py``).

    Alone it runs on ``balanced_bn`` (:class:`tta.layers.BalancedBatchNorm` in every
    BatchNorm; hyperparameters ``eta``, ``gamma``, ``num_classes`` go there). Three networks
    (:class:`TriNet`): the student S and the teacher T share their parameters (the affine
    parameters of the normalization layers are trained, everything else is frozen) but keep
    separate balanced statistics; the anchor A is a copy of the source parameters with its own
    statistics, never optimized.

    Step on a batch x (official ``forward_and_adapt``):

    1. T predicts with its stored statistics, nothing moves: the returned prediction ``y``,
       and the pseudo-labels ``y^ = argmax y``;
    2. labelled forwards (each network's balanced statistics update with ``y^``, then it
       normalizes with the updated ones): ``t = T(x)``, ``s = S(aug(x))`` (strong
       augmentation, :mod:`tta.methods.strong_augment`), ``a = A(x)`` (detached);
    3. reliable samples ``M = {i : H(softmax t_i) < H_0 ln K}``;
    4. ``L = mean_{i in M} CE(s_i, argmax t_i) + lambda mean_{i in M, c} (t_ic - a_ic)^2``
       (paper Eqs. 10-12: self-training of the student from the teacher's hard labels, and
       the anchor loss keeping the shared parameters close to what the source network
       predicts); the gradient reaches the shared parameters through both s and t; one Adam
       step.

    Deviations: with no reliable sample (M empty) the loss is 0 (the official mean over an
    empty set is NaN and would turn every parameter into NaN); the model stays in eval mode
    (the layers' ``frozen`` flag selects the official eval behaviour; dropout stays off).

    The anchor keeps the student's ``requires_grad`` flags and runs with autograd on (its
    output detached), so that it takes the same arithmetic as the teacher: at the first step
    ``t == a`` bit for bit and the anchor term's gradient is exactly 0, as in the official code,
    where both run the same operators. With the fused inference kernels for the anchor, ``t - a``
    is rounding noise whose gradient Adam (which divides by its magnitude) turns into a step of
    about ``lr`` per parameter (docs/DIFFERENTIAL_TESTS.md).

    Cost: four forwards (one without gradient for the prediction; the anchor's, run first,
    records a graph that is freed at once) and one backward through two networks per batch.
    No host synchronisation.
    """

    name = "tribe"
    role = OBJECTIVE
    Hparams = TRIBEHparams
    default_statistics = "balanced_bn"

    optimizer = state(None)

    def convert(self, model: nn.Module) -> nn.Module:
        if isinstance(model, TriNet):
            raise ValueError("the model is already wrapped by tribe")
        named = norm_parameters(model)
        self.params = configure_trainable(model, [p for _, p in named], self.name)
        teacher = copy.deepcopy(model)
        _tie_parameters(teacher, model)
        anchor = copy.deepcopy(model)
        hp = self.hparams
        self.optimizer = build_optimizer(self.params, "adam", hp.lr, beta=hp.beta, weight_decay=hp.weight_decay)
        return TriNet(model, teacher, anchor)

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        teacher = model.teacher  # type: ignore[union-attr]
        _set_frozen(teacher, True)
        try:
            with torch.no_grad():
                return teacher(x)
        finally:
            _set_frozen(teacher, False)

    def step(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        assert isinstance(model, TriNet) and self.optimizer is not None, "convert() must run first"
        hp = self.hparams
        out = self.predict(model, x)
        labels = out.argmax(1)
        student_in = x if hp.augment == "none" else strong_augment(x, self.generator, RANGES[hp.augment])
        try:
            with torch.enable_grad():
                # with autograd, for the teacher's arithmetic; first, so that its graph is freed
                # before the teacher's and student's exist (the networks share no statistics)
                _label_layers(model.anchor, labels)
                anchor_out = model.anchor(x).detach()
                _label_layers(model.teacher, labels)
                teacher_out = model.teacher(x)
                _label_layers(model.student, labels)
                student_out = model.student(student_in)
                reliable = softmax_entropy(teacher_out) < hp.h0 * math.log(out.shape[1])
                count = reliable.sum().clamp_min(1)
                cross = F.cross_entropy(student_out.float(), teacher_out.argmax(1), reduction="none")
                self_training = torch.where(reliable, cross, 0.0).sum() / count
                squared = (teacher_out.float() - anchor_out.float()).square().sum(1)
                anchor_loss = torch.where(reliable, squared, 0.0).sum() / (count * out.shape[1])
                descend(self.optimizer, self_training + hp.anchor_weight * anchor_loss)
        finally:
            _label_layers(model, None)
        return out
