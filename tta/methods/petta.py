"""``petta``: persistent test-time adaptation (PeTTA): RoTTA's memory, robust BN and mean
teacher, steered by a sensed divergence of the model from the source feature statistics."""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tta.features import logits_and_features
from tta.hyperparams import hparam
from tta.layers.base import AdaptiveNorm, commit_layers
from tta.methods.eata import _batch_input
from tta.methods.optim import descend
from tta.methods.rotta import RoTTA, TeacherStudent, _set_frozen
from tta.methods.state import state
from tta.methods.strong_augment import RANGES, strong_augment
from tta.registry import register_method

logger = logging.getLogger("tta")

#: the official source pass stops after the batch that brings it past this many samples
SOURCE_SAMPLE_LIMIT = 100_000
#: added to the source variances in the divergence (official)
VARIANCE_EPS = 1e-6


@dataclasses.dataclass
class PeTTAHparams:
    #: Adam learning rate (official CIFAR-10-C config 1e-3)
    lr: float = hparam(1e-3, low=0.0, low_open=True)
    #: Adam beta_1 (beta_2 is 0.999), official 0.9
    beta: float = hparam(0.9, low=0.0, high=1.0, high_open=True, symbol="β₁")
    #: weight decay (official 0)
    weight_decay: float = hparam(0.0, low=0.0)
    #: N, capacity of RoTTA's category-balanced memory (official 64)
    memory_size: int = hparam(64, low=1, symbol="N")
    #: lambda_t, weight of the timeliness term of the memory's eviction score (official 1)
    lambda_t: float = hparam(1.0, low=0.0, symbol="λ_t")
    #: lambda_u, weight of the uncertainty term of the memory's eviction score (official 1)
    lambda_u: float = hparam(1.0, low=0.0, symbol="λ_u")
    #: alpha_0, base rate of the teacher's moving average of the student (official 0.001)
    alpha_0: float = hparam(0.001, low=0.0, high=1.0, symbol="α₀")
    #: lambda_0, base weight of the parameter regularizer R(theta) (official CIFAR-10-C 10)
    lambda_0: float = hparam(10.0, low=0.0, symbol="λ₀")
    #: R(theta), distance of the trained parameters from the source ones: "cosine"
    #: (official), "l2" or "none"
    regularizer: str = hparam("cosine", choices=("cosine", "l2", "none"))
    #: scale lambda_0 by the sensed divergence gamma (official True)
    adaptive_lambda: bool = True
    #: scale alpha_0 by 1 - gamma (official True)
    adaptive_alpha: bool = True
    #: self-training loss: "sce" (symmetric cross-entropy of teacher, student and augmented
    #: student, the official default) or "ce" (RoTTA's teacher-to-augmented cross-entropy)
    loss: str = hparam("sce", choices=("sce", "ce"))
    #: weight of the anchor loss, cross-entropy of the source model's prediction to the
    #: augmented student's (official 1)
    anchor_weight: float = hparam(1.0, low=0.0)
    #: rate of the moving average of the class prototypes of test features (official 0.05)
    prototype_rate: float = hparam(0.05, low=0.0, high=1.0)
    #: augmentation of the student's input: "strong" (official), "soft" or "none"; expects
    #: images in [0, 1] and draws from the wrapper's seeded generator
    augment: str = hparam("strong", choices=(*RANGES, "none"))
    #: qualified name of the classifier layer whose input are the features; None: found
    #: automatically (see :mod:`tta.features`)
    feature_layer: str | None = None
    #: source data for the source feature statistics: any iterable of batches (tensors, or
    #: tuples / lists whose first item is the input, e.g. a torch DataLoader; labels are
    #: ignored). Read once at wrap time; required while adaptive_lambda or adaptive_alpha is on.
    #: Official: the source test split (CIFAR-10 test set for CIFAR-10-C).
    source_loader: Any = None


# -- the pieces, on small tensors -----------------------------------------------------------
def source_feature_statistics(
    model: nn.Module, loader: Iterable[Any], layer: str | None = None, limit: int = SOURCE_SAMPLE_LIMIT
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class mean and variance of the source features, ``(K, D)`` each, and the sample
    count per class ``(K,)`` (fp32, fp32, int64, on the CPU).

    The features are the inputs of the classifier layer (:func:`tta.features.logits_and_features`)
    and the classes the model's own predictions (the official code groups by pseudo-label,
    not by ground truth). The variance is the unbiased one (the diagonal of the official
    ``torch.cov``); a class with fewer than two samples gets NaN. Batches are read until the
    count first exceeds ``limit`` (official 100,000). Run the model as it should be seen
    (:class:`PeTTA` freezes its statistics layers first). Accumulated in fp64, one pass."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    sums = squares = counts = None
    total = 0
    with torch.no_grad():
        for batch in loader:
            x = _batch_input(batch)
            x = x.to(device=device, dtype=dtype if x.is_floating_point() else None)
            logits, features = logits_and_features(model, x, layer)
            labels = logits.argmax(1).cpu()
            features = features.detach().double().cpu()
            if sums is None:
                num_classes, dim = logits.shape[1], features.shape[1]
                sums = torch.zeros(num_classes, dim, dtype=torch.float64)
                squares = torch.zeros(num_classes, dim, dtype=torch.float64)
                counts = torch.zeros(num_classes, dtype=torch.int64)
            sums.index_add_(0, labels, features)
            squares.index_add_(0, labels, features.square())
            counts += torch.bincount(labels, minlength=counts.shape[0])
            total += features.shape[0]
            if total > limit:
                break
    if sums is None or counts is None or squares is None:
        raise ValueError("petta: source_loader yielded no batch")
    n = counts.double().unsqueeze(1)
    mean = sums / n
    var = (squares - n * mean.square()) / (n - 1)
    var = torch.where(n > 1, var.clamp_min(0.0), torch.nan)
    return mean.float(), var.float(), counts


def feature_divergence(
    prototypes: torch.Tensor, source_mean: torch.Tensor, source_var: torch.Tensor, classes: torch.Tensor
) -> torch.Tensor:
    """``D = mean_{y in classes} mean_d (mu_hat_{y,d} - mu_{y,d})^2 / (var_{y,d} + 1e-6)``, a
    0-d tensor: the squared gap of the test prototypes to the source means in units of the
    source variances (a Mahalanobis distance with diagonal covariance, divided by the
    dimension). ``classes``: ``(K,)`` bool, the classes averaged over; none gives 0."""
    per_class = ((prototypes - source_mean).square() / (source_var + VARIANCE_EPS)).mean(1)
    per_class = torch.where(classes, per_class, 0.0)
    return per_class.sum() / classes.sum().clamp_min(1)


def divergence_sensing(divergence: torch.Tensor) -> torch.Tensor:
    """``gamma = 1 - exp(-D)`` in [0, 1): 0 when the prototypes sit on the source means."""
    return 1.0 - torch.exp(-divergence)


def adaptive_coefficients(
    gamma: torch.Tensor, lambda_0: float, alpha_0: float, adaptive_lambda: bool = True, adaptive_alpha: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lambda, alpha) = (gamma lambda_0, (1 - gamma) alpha_0)``; either stays at its base value
    when its adaptive flag is off. The more the model diverged, the stronger the pull to the
    source parameters and the slower the teacher follows the student."""
    lam = gamma * lambda_0 if adaptive_lambda else torch.full_like(gamma, lambda_0)
    alpha = (1.0 - gamma) * alpha_0 if adaptive_alpha else torch.full_like(gamma, alpha_0)
    return lam, alpha


def update_prototypes(
    prototypes: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, rate: float
) -> torch.Tensor:
    """``mu_hat_y <- (1 - rate) mu_hat_y + rate mean{f_i : label_i = y}`` for every class y of
    the batch; the other classes keep theirs. ``features (B, D)``, ``labels (B,)``."""
    num_classes = prototypes.shape[0]
    counts = torch.bincount(labels, minlength=num_classes)
    sums = torch.zeros_like(prototypes).index_add_(0, labels, features.to(prototypes.dtype))
    means = sums / counts.clamp_min(1).unsqueeze(1).to(prototypes.dtype)
    moved = (1.0 - rate) * prototypes + rate * means
    return torch.where((counts > 0).unsqueeze(1), moved, prototypes)


def parameter_regularizer(params: list[torch.Tensor], anchors: list[torch.Tensor], kind: str) -> torch.Tensor:
    """R(theta), the mean over the trained tensors of

    * ``"cosine"``: ``-cos(theta_i, theta_i^0)`` (along the first axis, as the official
      ``cosine_similarity(p[None], p0[None])``, averaged over any further axes);
    * ``"l2"``: ``||theta_i - theta_i^0||^2``;
    * ``"none"``: 0. In fp32."""
    if kind == "none" or not params:
        device = params[0].device if params else None
        return torch.zeros((), device=device)
    terms = []
    for p, a in zip(params, anchors):
        p, a = p.float(), a.detach().float()
        if kind == "cosine":
            if p.dim() == 0:
                p, a = p.reshape(1), a.reshape(1)
            terms.append(-F.cosine_similarity(p[None], a[None]).mean())
        elif kind == "l2":
            terms.append((p - a).square().sum())
        else:
            raise ValueError(f"unknown regularizer {kind!r}")
    return torch.stack(terms).mean()


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``-sum_c softmax(target)_c log_softmax(logits)_c`` per sample (fp32)."""
    return -(torch.softmax(target.float(), 1) * torch.log_softmax(logits.float(), 1)).sum(1)


def self_training_loss(plain: torch.Tensor, augmented: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The official "sce" loss per sample: the symmetric cross-entropy of the teacher's
    prediction with the student's on the memory batch and with the student's on its
    augmentation, ``(CE(t, s) + CE(s, t) + CE(t, s_aug) + CE(s_aug, t)) / 4`` (gradients flow
    through both sides of each student term)."""
    return 0.25 * (
        soft_cross_entropy(plain, teacher)
        + soft_cross_entropy(teacher, plain)
        + soft_cross_entropy(augmented, teacher)
        + soft_cross_entropy(teacher, augmented)
    )


class PeTTAModel(TeacherStudent):
    """The adapted model of PeTTA: RoTTA's student and teacher, plus ``anchor``, a frozen
    copy of the source model (its robust-BN statistics still move, as in the official code).
    ``forward`` is the teacher's (the prediction)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, anchor: nn.Module) -> None:
        super().__init__(student, teacher)
        self.anchor = anchor


@register_method
class PeTTA(RoTTA):
    """PeTTA (Hoang, Vo & Do, "Persistent Test-time Adaptation in Recurring Testing Scenarios",
    NeurIPS 2024, arXiv 2311.18193; official code hthieu166/petta, ``src/adapter/petta.py``,
    ``src/utils/petta_memory.py``, CIFAR-10-C defaults from
    ``configs/adapter/petta/cifar10c/petta_cifar10c_default.yaml`` and ``src/configs/defaults.py``).

    PeTTA keeps RoTTA's machinery (:class:`~tta.methods.rotta.RoTTA`, reused here): robust BN
    (alone ``petta`` runs on ``rbn``, rate ``alpha`` = 0.05), the category-balanced memory of
    capacity N fed with the teacher's pseudo-labels and entropies, a student trained by Adam
    on the normalization layers' affine parameters, and a teacher that is its moving average.
    On top it senses how far the model drifted from the source (Alg. 1 of the paper) and
    turns that into two coefficients:

    * **Source statistics** (wrap time): per class y, the mean ``mu_y`` and the diagonal
      variance ``sigma^2_y`` of the source model's penultimate features (the classifier's
      input), classes by the model's own prediction (:func:`source_feature_statistics`, from
      ``source_loader``). The test prototypes ``mu_hat_y`` start at ``mu_y`` (Alg. 1 line 1).
    * **Sensing** (each batch, before its prototypes move; lines 5-9): over the set Y of
      pseudo-labels of the batch,
      ``D = mean_{y in Y} mean_d (mu_hat_{y,d} - mu_{y,d})^2 / (sigma^2_{y,d} + 1e-6)``
      (:func:`feature_divergence`) and ``gamma = 1 - exp(-D)`` (:func:`divergence_sensing`).
    * **Prototypes** (line 10): ``mu_hat_y <- 0.95 mu_hat_y + 0.05 mean`` of the teacher's
      features of the batch's samples predicted y (:func:`update_prototypes`).
    * **Coefficients** (lines 12-13): ``lambda = gamma lambda_0`` and ``alpha = (1 - gamma)
      alpha_0`` (:func:`adaptive_coefficients`; lambda_0 = 10, alpha_0 = 0.001).
    * **Objective** (line 15) on the memory batch m (class order, as RoTTA's), with the
      teacher's prediction ``t`` (robust BN in train mode), the student's ``s`` on m and
      ``s_aug`` on a strong augmentation of m, the source model's ``a`` on m:
      ``L = mean_i L_cls + lambda R(theta) + w_AL mean_i CE(a, s_aug)`` where ``L_cls`` is
      :func:`self_training_loss` ("sce", default) or ``CE(t, s_aug)`` ("ce"), R is
      :func:`parameter_regularizer` against the source parameters (cosine by default) and
      ``CE(p, q) = -sum softmax(p) log_softmax(q)`` (the anchor loss, w_AL = 1). One Adam step.
    * **Teacher** (line 16, the mean-teacher update, Eq. 3):
      ``theta_T <- (1 - alpha) theta_T + alpha theta_S``.

    Step on a batch x (the official ``forward_and_adapt``): the teacher predicts x with its
    stored statistics (the official eval-mode forward) and that prediction is returned; the
    samples enter the memory one by one; then **one update per batch**, whatever the batch
    size (the official code reads RoTTA's ``UPDATE_FREQUENCY`` but never uses it). Within
    the update, as in the official code, the statistics of robust BN move in train-mode
    forwards: the teacher's and the source model's once (on m), the student's twice (on m,
    then on its augmentation, each forward normalizing with the statistics the previous one
    left).

    Where the official code differs from the paper, this follows the code: the divergence
    averages the variance-scaled squared gaps over the feature dimensions and the classes
    before the exponential (the paper writes a per-class Mahalanobis distance with the
    covariance matrix and averages after the exponential); the self-training loss is the
    symmetric "sce" loss of the official defaults, without RoTTA's timeliness weights; the
    source statistics come from the source model's pseudo-labels; the source model of the
    anchor loss runs with train-mode robust BN, so its statistics adapt too.

    Deviations: a class with fewer than two source samples (no variance; the official code
    would turn the divergence, the loss and then every parameter into NaN) is left out of the
    divergence, with a warning at wrap time; the source statistics are accumulated in fp64 in
    one pass and computed only while the sensing is on (``adaptive_lambda`` or
    ``adaptive_alpha``); otherwise as RoTTA: the model stays in eval mode, a batch with
    NaN/Inf changes no state, non-finite gradients are zeroed, the teacher average skips
    frozen parameters (the official one averages them too, leaving them equal up to rounding).

    Pass the source data at wrap time: ``tta.adapt(model, "petta", source_loader=loader)``;
    it is read once and not kept; the statistics, prototypes and coefficients are method state
    (``state_dict()``). Without it the wrap fails, unless both adaptive flags are off.

    Cost: one forward per batch plus, per batch, four forwards (teacher, source model,
    student twice) and one backward on the memory batch; one host synchronisation per batch
    (the memory's decisions), as RoTTA.
    """

    name = "petta"
    Hparams = PeTTAHparams
    requires = "source data for the divergence sensing (source_loader=...)"
    source_data_argument = "source_loader"

    #: per-class mean and variance of the source features (K, D), and which classes have them
    source_mean = state(lambda m: torch.zeros(0))
    source_var = state(lambda m: torch.zeros(0))
    source_valid = state(lambda m: torch.zeros(0, dtype=torch.bool))
    #: mu_hat, the moving class prototypes of the teacher's test features (K, D)
    prototypes = state(lambda m: torch.zeros(0))
    #: gamma of the last update, and the teacher's rate alpha it gave
    gamma = state(lambda m: torch.zeros(()))
    alpha = state(lambda m: torch.tensor(float(m.hparams.alpha_0)))

    # -- setup ------------------------------------------------------------------------------
    def convert(self, model: nn.Module) -> nn.Module:
        hp = self.hparams
        loader = self.take_source_data()
        sensing = hp.adaptive_lambda or hp.adaptive_alpha
        if sensing and loader is None:
            raise ValueError(
                "petta needs source data for its divergence sensing: tta.adapt(model, 'petta', "
                "source_loader=...) with an iterable of input batches or (inputs, labels) batches of "
                "the source distribution; or turn the sensing off (adaptive_lambda=False, adaptive_alpha=False)"
            )
        wrapped = super().convert(model)
        assert isinstance(wrapped, TeacherStudent)
        anchor = copy.deepcopy(wrapped.student)
        anchor.requires_grad_(False)
        trainable = {id(p) for p in self.params}
        by_name = dict(anchor.named_parameters())
        self.anchor_params = [by_name[n] for n, p in wrapped.student.named_parameters() if id(p) in trainable]
        petta_model = PeTTAModel(wrapped.student, wrapped.teacher, anchor)
        self._adaptive_layers = self._layers(petta_model)
        self._student_layers = self._layers(petta_model.student)
        device = next((p.device for p in petta_model.parameters()), torch.device("cpu"))
        self.gamma = self.gamma.to(device)
        self.alpha = self.alpha.to(device)
        if sensing:
            assert loader is not None
            self._read_source(petta_model.student, loader, device)
        return petta_model

    def _read_source(self, student: nn.Module, loader: Iterable[Any], device: torch.device) -> None:
        layers = self._layers(student)
        adapting = [layer.adapting for layer in layers]
        _set_frozen(layers, True)  # the official eval-mode forward: the source statistics
        try:
            for layer in layers:
                layer.adapting = False
            mean, var, counts = source_feature_statistics(student, loader, self.hparams.feature_layer)
        finally:
            _set_frozen(layers, False)
            for layer, flag in zip(layers, adapting):
                layer.adapting = flag
                layer.discard()
        valid = counts > 1
        if not bool(valid.all()):
            missing = torch.nonzero(~valid).flatten().tolist()
            logger.warning(
                "petta: the source data gives fewer than two samples predicted as class(es) %s; they are "
                "left out of the divergence sensing", missing[:20],
            )
        self.source_mean = torch.where(valid.unsqueeze(1), mean, 0.0).to(device)
        self.source_var = torch.where(valid.unsqueeze(1), var, 1.0).to(device)
        self.source_valid = valid.to(device)
        self.prototypes = self.source_mean.clone()

    # -- step -------------------------------------------------------------------------------
    def _teacher_forward(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layers = self._layers(model)
        _set_frozen(layers, True)
        try:
            with torch.no_grad():
                return logits_and_features(model.teacher, x, self.hparams.feature_layer)  # type: ignore[arg-type]
        finally:
            _set_frozen(layers, False)

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self._teacher_forward(model, x)[0]

    def step(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        assert isinstance(model, PeTTAModel) and self.optimizer is not None, "convert() must run first"
        out, features = self._teacher_forward(model, x)
        layers = self._layers(model)
        for layer in layers:
            layer.discard()  # statistics layers without a frozen mode must not move on the prediction
        rows, labels = self._memory_rows(x, out)
        if rows is None:
            return out
        if self.source_mean.numel() and self.source_mean.shape[0] != out.shape[1]:
            raise ValueError(f"petta's source statistics have {self.source_mean.shape[0]} classes, the model {out.shape[1]}")
        memory = self.memory
        pending: dict[int, int] = {}
        for i, (label, u) in enumerate(rows):
            slot = memory.add(int(label), u)
            if slot is not None:
                pending[slot] = i
            self.seen += 1
        self._write(pending, x)
        self._adapt(model, layers, features, labels, x.dtype)
        return out

    def _sense(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Alg. 1 lines 5-13: gamma from the prototypes so far, then the prototypes move; sets
        ``gamma`` and ``alpha``, returns lambda (0-d tensors on the features' device)."""
        hp = self.hparams
        device = features.device
        gamma = torch.zeros((), device=device)
        if hp.adaptive_lambda or hp.adaptive_alpha:
            present = torch.bincount(labels, minlength=self.prototypes.shape[0]) > 0
            divergence = feature_divergence(self.prototypes, self.source_mean, self.source_var, present & self.source_valid)
            gamma = divergence_sensing(divergence)
            self.prototypes = update_prototypes(self.prototypes, features.detach().float(), labels, hp.prototype_rate)
        lam, alpha = adaptive_coefficients(gamma, hp.lambda_0, hp.alpha_0, hp.adaptive_lambda, hp.adaptive_alpha)
        self.gamma, self.alpha = gamma, alpha
        return lam

    def _adapt(
        self, model: PeTTAModel, layers: list[AdaptiveNorm], features: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype
    ) -> None:
        assert self.optimizer is not None
        hp = self.hparams
        index, _ = self.memory.ordered()
        if not index.size:
            return
        device = self.bank.device
        data = self.bank.index_select(0, torch.from_numpy(index).to(device, non_blocking=True))
        data = data.to(dtype)  # the bank keeps the dtype of its first batch; the model may have moved since
        lam = self._sense(features, labels)
        with torch.no_grad():
            teacher_out = model.teacher(data)  # train-mode robust BN: the teacher's statistics move
        with torch.enable_grad():
            plain_out = model.student(data)
            commit_layers(self._student_layers)  # the augmented forward sees the moved statistics
            with torch.no_grad():
                anchor_out = model.anchor(data)
            student_in = data if hp.augment == "none" else strong_augment(data, self.generator, RANGES[hp.augment])
            augmented_out = model.student(student_in)
            if hp.loss == "sce":
                cls_loss = self_training_loss(plain_out, augmented_out, teacher_out).mean()
            else:
                cls_loss = soft_cross_entropy(augmented_out, teacher_out).mean()
            reg_loss = parameter_regularizer(self.params, self.anchor_params, hp.regularizer)
            anchor_loss = soft_cross_entropy(augmented_out, anchor_out).mean()
            descend(self.optimizer, cls_loss + lam.to(reg_loss.device) * reg_loss + hp.anchor_weight * anchor_loss)
        commit_layers(layers)
        self._average_teacher(self.alpha)
        self.num_updates += 1

