"""``cotta``: continual test-time adaptation with a mean teacher, augmentation-averaged
pseudo-labels and stochastic restoration (CoTTA)."""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from tta.hyperparams import hparam
from tta.methods.base import OBJECTIVE, Method
from tta.methods.optim import MasterOptimizer, OptimizerHparams, build_optimizer, descend
from tta.methods.roid import symmetric_cross_entropy
from tta.methods.state import state
from tta.methods.tribe import TriNet
from tta.methods.strong_augment import RANGES, strong_augment
from tta.registry import register_method

#: attribute names of the parameters CoTTA trains and restores (the official code selects
#: every parameter called ``weight`` or ``bias``, whatever its layer)
_TRAINED_NAMES = ("weight", "bias")


def teacher_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, symmetric: bool = False) -> torch.Tensor:
    """Per-sample consistency loss between the student's logits and the teacher's pseudo-label (paper
    §3, the student's update),
    in fp32, shape ``(N,)``; the teacher's side carries no gradient.

    * ``symmetric=False`` (paper, official CIFAR code): ``- sum_c q_c log p_c`` with
      ``p = softmax(student)``, ``q = softmax(teacher)``;
    * ``symmetric=True`` (official ImageNet code): ``0.5 (- sum_c q_c log p_c) + 0.5 (- sum_c p_c
      log q_c)`` (:func:`tta.methods.roid.symmetric_cross_entropy`)."""
    teacher = teacher.detach()
    if symmetric:
        return symmetric_cross_entropy(student, teacher)
    return -(torch.softmax(teacher.float(), 1) * torch.log_softmax(student.float(), 1)).sum(1)


def ema_(averages: list[torch.Tensor], values: list[torch.Tensor], momentum: float) -> None:
    """``a <- m a + (1 - m) v`` in place for every tensor (paper §3, weight-averaged teacher)."""
    if averages and momentum < 1.0:
        with torch.no_grad():
            torch._foreach_mul_(averages, momentum)
            torch._foreach_add_(averages, [v.to(a.dtype) for a, v in zip(averages, values)], alpha=1.0 - momentum)


def restore_masks(sizes: list[int], probability: float, generator: torch.Generator, device: torch.device) -> list[torch.Tensor]:
    """One Bernoulli(``probability``) mask per tensor of ``sizes`` elements (flat, bool),
    from a single uniform draw of ``sum(sizes)`` numbers on ``device`` split in order: on the
    CPU the same numbers as one ``rand`` per tensor in turn (the official loop)."""
    draws = torch.rand(sum(sizes), generator=generator, device=device)
    return list((draws < probability).split(sizes))


def stochastic_restore_(params: list[torch.Tensor], sources: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    """``theta <- M * theta_0 + (1 - M) * theta`` in place (paper §3, stochastic restoration), as a
    selection: an
    element whose mask is set takes its source value, the others keep theirs."""
    with torch.no_grad():
        for param, source, mask in zip(params, sources, masks):
            param.copy_(torch.where(mask.view(param.shape), source.to(param.dtype), param))


@dataclasses.dataclass
class CoTTAHparams(OptimizerHparams):
    #: gradient steps per batch (official 1)
    steps: int = hparam(1, low=1)
    #: momentum of the teacher's moving average theta' <- m theta' + (1 - m) theta (official
    #: CIFAR-10 0.999)
    momentum_teacher: float = hparam(0.999, low=0.0, high=1.0, symbol="α")
    #: probability that an element of a trained parameter is restored to its source value after
    #: every step (official CIFAR-10 0.01)
    restore_prob: float = hparam(0.01, low=0.0, high=1.0, symbol="p")
    #: augment the teacher's input when the source model's mean confidence on the batch is
    #: below this threshold (official CIFAR-10 0.92)
    threshold: float = hparam(0.92, low=0.0, high=1.0, symbol="p_th")
    #: augmented teacher forwards averaged when below the threshold (official 32); 0 never
    #: augments (inputs other than images)
    num_augmentations: int = hparam(32, low=0, symbol="N")
    #: ranges of the teacher's augmentation: "strong" (official CIFAR code) or "soft"
    augment: str = hparam("strong", choices=tuple(RANGES))
    #: symmetric cross-entropy between student and teacher (official ImageNet code) instead of
    #: the cross-entropy of the paper and the official CIFAR code
    symmetric: bool = False
    #: restore the wrap-time model, teacher and method state before every batch
    episodic: bool = False


class CoTTANet(TriNet):
    """CoTTA's three networks, in TRIBE's container: the student (the converted model,
    trained), the teacher (its moving average, with parameters of its own) and the anchor (a
    frozen copy of the source model). ``forward`` is the teacher's."""


def _write_back(optimizer: MasterOptimizer) -> None:
    """Copy separate fp32 masters into their fp16/bf16 parameters."""
    copies = [(p, m) for p, m in zip(optimizer.params, optimizer.masters) if p is not m]
    if copies:
        with torch.no_grad():
            torch._foreach_copy_([p.detach() for p, _ in copies], [m.detach() for _, m in copies])


@register_method
class CoTTA(Method):
    """CoTTA (Wang, Fink, Van Gool & Dai, "Continual Test-Time Domain Adaptation", CVPR 2022,
    arXiv 2203.13591; official code qinenergy/cotta ``cifar/cotta.py`` with the CIFAR-10
    configuration ``cfgs/cifar10/cotta.yaml``, and the port in mariodoebler/test-time-adaptation
    ``classification/methods/cotta.py``).

    Networks (:class:`CoTTANet`): the student ``f_theta`` (the converted model), the teacher
    ``f_theta'`` (a copy, its parameters a moving average of the student's) and the anchor
    ``f_theta0`` (a frozen copy of the source model). Alone, ``cotta`` runs on ``norm`` (every
    BatchNorm normalizes with the statistics of the batch it sees, in all three networks, as
    the official code configures them); GroupNorm/LayerNorm models run as they are.

    Trained: every parameter whose own name is ``weight`` or ``bias`` (the official code's
    choice: convolutions, linear layers and normalization layers alike), everything else is
    frozen; Adam with lr 1e-3, betas (0.9, 0.999) (official CIFAR-10).

    Step on a batch ``x`` (``steps`` times):

    1. student logits ``y = f_theta(x)`` (with gradient);
    2. the anchor's confidence ``c = mean_b max_c softmax(f_theta0(x_b))_c``;
    3. the teacher's prediction (paper §3, augmentation-averaged pseudo-labels): if
       ``c < p_th`` (``threshold``, 0.92), the mean of the teacher's *logits* on ``N``
       (``num_augmentations``, 32) augmented views of the batch, ``y' = (1/N) sum_i f_theta'(aug_i(x))``, each view one draw of the CoTTA
       augmentation for the whole batch (:func:`tta.methods.strong_augment.strong_augment`,
       "strong" ranges) and one forward of its own (batch statistics per view); otherwise
       ``y' = f_theta'(x)``;
    4. loss ``L = mean_b CE(y'_b, y_b)`` (:func:`teacher_cross_entropy`; symmetric with
       ``symmetric=True``), one optimizer step on ``theta``;
    5. teacher update ``theta' <- m theta' + (1 - m) theta`` (``momentum_teacher``
       0.999), on fp32 masters of the teacher's trained parameters (the parameters themselves
       in fp32 models);
    6. stochastic restore: for every element of every trained parameter, a
       Bernoulli(``restore_prob``) draw ``M``; ``theta <- M theta_0 + (1 - M) theta`` with the
       anchor's (source) value ``theta_0``.

    The returned prediction is the teacher's ``y'`` of step 3 (computed before the update, so
    ``no_adapt()`` returns exactly it: ``predict`` draws the same augmentations and then
    rewinds the generator).

    Where the paper and the official code differ, we follow the code:

    * the paper states the anchor's confidence test per input; the code takes one
      decision per batch on the batch-mean confidence;
    * the paper averages the augmented *predictions*; the code averages logits (the returned
      output, and the soft label ``softmax(y')``).

    CoTTA's loss is sometimes described as a symmetric cross-entropy: that is the official
    ImageNet code's (``symmetric=True``); the paper and the official CIFAR code use the plain
    cross-entropy from the teacher to the student, our default.

    Departures from the official code, of form rather than effect:

    * the augmented views are computed only when used (the official CIFAR code runs the 32
      augmented forwards on every batch and discards them above the threshold; the port skips
      them, as we do);
    * the teacher's moving average covers the trained parameters only (the official one runs
      over all parameters, which leaves the frozen ones equal up to rounding); the restore
      covers the same parameters as the official one (trained, named ``weight``/``bias``);
    * the model stays in eval mode (dropout off, as in the port; normalization ignores the
      mode); fp16/bf16 parameters train on fp32 masters; non-finite gradients are zeroed;
    * augmentations and restore masks draw from the wrapper's seeded generator (the masks
      from ``generator_on(device)``, so on CUDA from a CUDA generator), not the global RNG;
      the augmentation's affine resampling is the library's (see
      :mod:`tta.methods.strong_augment`).

    Cost: the student's forward and backward, the anchor's forward, and one teacher forward
    (``N`` when the anchor is unsure). One host synchronisation per step: the threshold
    decision, which chooses how many forwards run.
    """

    name = "cotta"
    role = OBJECTIVE
    Hparams = CoTTAHparams
    default_statistics = "norm"

    optimizer = state(None)
    #: the teacher's trained parameters with fp32 masters (separate copies for fp16/bf16
    #: parameters only): the moving average runs on the masters (a step of 0.001 would round
    #: away in fp16/bf16) and is written to the teacher. A :class:`MasterOptimizer` that never
    #: steps (the teacher takes no gradient): it keeps, saves, moves and guards the masters
    #: as the student's optimizer does
    teacher_masters = state(None)

    def convert(self, model: nn.Module) -> nn.Module:
        if isinstance(model, CoTTANet):
            raise ValueError("the model is already wrapped by cotta")
        named = [(n, p) for n, p in model.named_parameters() if n.rpartition(".")[2] in _TRAINED_NAMES]
        if not named:
            raise ValueError("method 'cotta' found no parameter named 'weight' or 'bias' to adapt")
        model.requires_grad_(False)
        for _, param in named:
            param.requires_grad_(True)
        self.params = [p for _, p in named]
        self.param_names = [n for n, _ in named]
        teacher = copy.deepcopy(model).requires_grad_(False)
        anchor = copy.deepcopy(model).requires_grad_(False)
        teachers, anchors = dict(teacher.named_parameters()), dict(anchor.named_parameters())
        self.anchor_params = [anchors[n] for n in self.param_names]
        self.teacher_masters = MasterOptimizer([teachers[n] for n in self.param_names], torch.optim.SGD, lr=0.0)
        hp = self.hparams
        self.optimizer = build_optimizer(
            self.params, hp.optimizer, hp.lr, beta=hp.beta, momentum=hp.sgd_momentum,
            weight_decay=hp.weight_decay, nesterov=hp.nesterov,
        )
        return CoTTANet(model, teacher, anchor)

    # -- step -------------------------------------------------------------------------------
    def _teacher_prediction(self, model: CoTTANet, x: torch.Tensor) -> torch.Tensor:
        """Step 3 of the class docstring, without gradient."""
        hp = self.hparams
        with torch.no_grad():
            if hp.num_augmentations > 0:
                confidence = torch.softmax(model.anchor(x).float(), 1).amax(1).mean(0)
                if bool(confidence < hp.threshold):  # the step's host synchronisation
                    if x.dim() != 4:
                        raise ValueError(
                            f"cotta augments images (N, C, H, W), got shape {tuple(x.shape)}; "
                            "pass num_augmentations=0 for other inputs"
                        )
                    ranges = RANGES[hp.augment]
                    views = [model.teacher(strong_augment(x, self.generator, ranges)) for _ in range(hp.num_augmentations)]
                    return torch.stack(views).mean(0)
            return model.teacher(x)

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        assert isinstance(model, CoTTANet), "convert() must run first"
        generator = self.generator
        saved = generator.get_state()
        try:
            return self._teacher_prediction(model, x)
        finally:
            generator.set_state(saved)

    def step(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        assert isinstance(model, CoTTANet) and self.optimizer is not None, "convert() must run first"
        hp = self.hparams
        optimizer = self.optimizer
        teacher_out = None
        for _ in range(int(hp.steps)):
            with torch.enable_grad():
                out = model.student(x)
                teacher_out = self._teacher_prediction(model, x)
                descend(optimizer, teacher_cross_entropy(out, teacher_out, hp.symmetric).mean(0))
            teacher = self.teacher_masters
            ema_(teacher.masters, optimizer.masters, hp.momentum_teacher)
            _write_back(teacher)
            if hp.restore_prob > 0.0:
                masters = optimizer.masters
                device = masters[0].device
                masks = restore_masks([m.numel() for m in masters], hp.restore_prob, self.generator_on(device), device)
                stochastic_restore_(masters, self.anchor_params, masks)
                _write_back(optimizer)
        return teacher_out  # type: ignore[return-value]
