"""``rotta``: robust test-time adaptation with a category-balanced memory and a teacher-student
update (RoTTA)."""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from tta.hyperparams import hparam
from tta.layers.base import AdaptiveNorm, commit_layers
from tta.methods.affine import configure_trainable, norm_parameters
from tta.methods.base import OBJECTIVE, Method
from tta.methods.optim import LOW_PRECISION, build_optimizer, descend
from tta.methods.state import state
from tta.methods.strong_augment import RANGES, strong_augment
from tta.registry import register_method


@dataclasses.dataclass
class RoTTAHparams:
    #: Adam learning rate (official 1e-3)
    lr: float = hparam(1e-3, low=0.0, low_open=True)
    #: Adam beta_1 (beta_2 is 0.999), official 0.9
    beta: float = hparam(0.9, low=0.0, high=1.0, high_open=True, symbol="β₁")
    #: weight decay (official 0)
    weight_decay: float = hparam(0.0, low=0.0)
    #: nu, rate of the teacher's moving average of the student's parameters (official 0.001)
    nu: float = hparam(0.001, low=0.0, high=1.0, symbol="ν")
    #: N, capacity of the memory bank (official 64)
    memory_size: int = hparam(64, low=1, symbol="N")
    #: samples between two updates of the student (official 64, the memory size)
    update_frequency: int = hparam(64, low=1)
    #: lambda_t, weight of the timeliness (age) term of the eviction score (official 1)
    lambda_t: float = hparam(1.0, low=0.0, symbol="λ_t")
    #: lambda_u, weight of the uncertainty term of the eviction score (official 1)
    lambda_u: float = hparam(1.0, low=0.0, symbol="λ_u")
    #: augmentation of the student's input: "strong" (official), "soft" or "none"; the
    #: augmentation expects images in [0, 1] and draws from the wrapper's seeded generator
    augment: str = hparam("strong", choices=(*RANGES, "none"))


class TeacherStudent(nn.Module):
    """The adapted model of RoTTA: a student trained by gradient and a teacher that is its
    moving average. ``forward`` is the teacher's (the prediction)."""

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(x)


class CategoryBalancedMemory:
    """RoTTA's category-balanced sampling with timeliness and uncertainty (CSTU, paper §3.3).

    Capacity N, K classes, ``N / K`` places per class (a float, as in the official code).
    Each item stores a sample, its pseudo-label, its uncertainty ``u`` (the teacher's
    prediction entropy) and its age ``a`` (insertions since it entered). The eviction score
    is (paper Eq. 5)::

        score(a, u) = lambda_t / (1 + exp(-a / N)) + lambda_u u / ln K

    Adding a sample with pseudo-label y and uncertainty u (score of a new item: age 0):

    * if class y holds fewer than ``N / K`` items: store it when the bank is not full,
      otherwise the candidates for eviction are the items of the majority classes (those
      with the most items);
    * otherwise the candidates are the items of class y;
    * the candidate with the highest score is evicted (ties: the last one in class order,
      then insertion order, as the official ``>=`` scan) and the new sample stored, if that
      score exceeds the new sample's; otherwise the new sample is dropped;
    * then every stored item, the new one included, ages by one.

    The bank returns its items ordered by class, then insertion, with ages divided by N.

    This class keeps the metadata, on the host (saved as tensors by :meth:`state_dict`): the sequence of additions is sequential by
    definition (each decision depends on the previous one) and costs O(N) scalars per
    addition. The samples stay on their device (:class:`RoTTA` writes them with one indexed
    copy per batch segment).
    """

    def __init__(self, capacity: int, lambda_t: float, lambda_u: float) -> None:
        self.capacity = int(capacity)
        self.lambda_t = float(lambda_t)
        self.lambda_u = float(lambda_u)
        self.num_classes: int | None = None
        self.label = np.full(self.capacity, -1, dtype=np.int64)  # -1: empty slot
        self.uncertainty = np.zeros(self.capacity, dtype=np.float64)
        self.age = np.zeros(self.capacity, dtype=np.int64)
        self.order = np.zeros(self.capacity, dtype=np.int64)  # insertion counter, for the item order
        self.inserted = 0

    def score(self, age: np.ndarray | float, uncertainty: np.ndarray | float) -> np.ndarray:
        assert self.num_classes is not None
        timeliness = 1.0 / (1.0 + np.exp(-np.asarray(age, dtype=np.float64) / self.capacity))
        return self.lambda_t * timeliness + self.lambda_u * np.asarray(uncertainty) / math.log(self.num_classes)

    def add(self, label: int, uncertainty: float) -> int | None:
        """Add one item's metadata; return its slot, or None when it is not stored."""
        assert self.num_classes is not None, "set num_classes first"
        occupied = self.label >= 0
        new_score = self.score(0.0, uncertainty)
        slot: int | None
        if np.count_nonzero(self.label == label) < self.capacity / self.num_classes:
            if np.count_nonzero(occupied) < self.capacity:
                slot = int(np.flatnonzero(~occupied)[0])
                candidates = None
            else:
                counts = np.bincount(self.label[occupied], minlength=self.num_classes)
                candidates = occupied & (counts == counts.max())[np.maximum(self.label, 0)]
        else:
            candidates = self.label == label
        if candidates is not None:
            index = np.flatnonzero(candidates)
            index = index[np.lexsort((self.order[index], self.label[index]))]  # class, then insertion
            scores = self.score(self.age[index], self.uncertainty[index])
            best = scores.max()
            slot = int(index[np.flatnonzero(scores == best)[-1]]) if best > new_score else None
        if slot is not None:
            self.label[slot] = label
            self.uncertainty[slot] = uncertainty
            self.age[slot] = 0
            self.order[slot] = self.inserted
            self.inserted += 1
        self.age[self.label >= 0] += 1
        return slot

    def state_dict(self) -> dict[str, Any]:
        """The metadata as tensors and plain values (copies; a ``weights_only`` load reads them)."""
        return {
            "num_classes": self.num_classes,
            "label": torch.from_numpy(self.label.copy()),
            "uncertainty": torch.from_numpy(self.uncertainty.copy()),
            "age": torch.from_numpy(self.age.copy()),
            "order": torch.from_numpy(self.order.copy()),
            "inserted": self.inserted,
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.num_classes = saved["num_classes"]
        for name in ("label", "uncertainty", "age", "order"):
            setattr(self, name, saved[name].numpy().copy())
        self.inserted = int(saved["inserted"])

    def ordered(self) -> tuple[np.ndarray, np.ndarray]:
        """Slots of the stored items in class, then insertion order, and their ages / N."""
        index = np.flatnonzero(self.label >= 0)
        index = index[np.lexsort((self.order[index], self.label[index]))]
        return index, self.age[index] / self.capacity


def timeliness_weight(ages: torch.Tensor) -> torch.Tensor:
    """``exp(-a) / (1 + exp(-a))`` (paper Eq. 7, with a = age / N), as a sigmoid."""
    return torch.sigmoid(-ages)


def _master_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in LOW_PRECISION else dtype


def _set_frozen(layers: list[nn.Module], frozen: bool) -> None:
    for layer in layers:
        if hasattr(layer, "frozen"):
            layer.frozen = frozen  # type: ignore[attr-defined]


@register_method
class RoTTA(Method):
    """RoTTA (Yuan, Xie & Li, "Robust Test-Time Adaptation in Dynamic Scenarios", CVPR 2023,
    arXiv 2303.13899; official code BIT-DA/RoTTA, ``core/adapter/rotta.py``).

    Parts:

    * **Robust BN** (§3.2, Eq. 3): alone, ``rotta`` runs on ``rbn`` (every BatchNorm keeps a
      global moving average of test statistics, rate ``alpha`` = 0.05; see
      :class:`tta.layers.RobustBatchNorm`); other statistics methods compose
      (``"norm+rotta"``); GroupNorm/LayerNorm models run without one.
    * **Teacher and student**: the student is the converted model, trained on the affine
      parameters of its normalization layers with Adam; the teacher is a copy whose
      parameters follow ``theta_T <- (1 - nu) theta_T + nu theta_S`` after every update
      (Eq. 6). Each keeps its own robust-BN statistics (the official moving average covers
      parameters only).
    * **Memory** (§3.3, Eq. 5): :class:`CategoryBalancedMemory`, fed with every test sample,
      its teacher pseudo-label and entropy ``u = -sum_c p_c log(p_c + 1e-6)``.
    * **Update** every ``update_frequency`` samples: the student sees a strong augmentation
      of the memory batch (:mod:`tta.methods.strong_augment`), the teacher the memory batch
      itself, both with train-mode robust BN (statistics move, from the memory batch), and
      ``L = mean_i w(a_i) CE(p_T(x_i), p_S(aug(x_i)))`` with the time-aware weight
      ``w(a) = exp(-a) / (1 + exp(-a))`` of the normalized age (Eq. 7-8); one Adam step;
      then the teacher's moving average.

    Step on a batch x (the official ``forward_and_adapt``): the teacher predicts with its
    stored statistics (the official eval-mode forward; nothing moves) and that prediction is
    returned; then the samples enter the memory one by one, and whenever the running count
    of samples reaches a multiple of ``update_frequency`` an update runs (so with a batch
    size other than 64 updates fall mid-batch, as in the official code).

    Deviations: the model stays in eval mode (robust BN's train/eval behaviour is selected
    by its ``frozen`` flag; dropout stays off); a batch with NaN/Inf in its input or in the
    teacher's prediction changes no state at all, neither memory nor counters (the official
    code would store such samples, and a NaN score is never evicted), in line with the
    wrapper's non-finite guard; non-finite gradients are zeroed
    (:func:`tta.methods.optim.nonfinite_guard_`).
    The teacher average skips frozen parameters (the official code averages every parameter,
    which leaves the frozen ones equal up to rounding). On GroupNorm/LayerNorm models their
    affine parameters are trained, as in the mariodoebler port.

    Cost: one forward per batch plus, per ``update_frequency`` samples, one teacher forward,
    one student forward and backward on the memory batch. One host synchronisation per
    batch (pseudo-labels and entropies for the memory's decisions); since the memory and the
    counters live on the host, the wrapper's guard reads its finiteness flag once more at
    the end of a step that changed them (:class:`tta.methods.state.StateGuard`).
    """

    name = "rotta"
    role = OBJECTIVE
    Hparams = RoTTAHparams
    default_statistics = "rbn"

    optimizer = state(None)
    memory = state(lambda m: CategoryBalancedMemory(m.hparams.memory_size, m.hparams.lambda_t, m.hparams.lambda_u))
    #: the memory's samples, (N, *sample shape) once the first batch came
    bank = state(lambda m: torch.zeros(0))
    seen = state(0)
    num_updates = state(0)
    #: fp32 copies of the teacher's trained parameters: the moving average runs on them (a
    #: step of nu = 0.001 would round away in fp16/bf16) and is written to the teacher
    teacher_master = state(lambda m: [])

    # -- setup ------------------------------------------------------------------------------
    def convert(self, model: nn.Module) -> nn.Module:
        if isinstance(model, TeacherStudent):
            raise ValueError("the model is already wrapped by rotta")
        named = norm_parameters(model)
        self.params = configure_trainable(model, [p for _, p in named], self.name)
        teacher = copy.deepcopy(model)
        teacher.requires_grad_(False)
        trainable = {id(p) for p in self.params}
        by_name = dict(teacher.named_parameters())
        self.teacher_params = [by_name[n] for n, p in model.named_parameters() if id(p) in trainable]
        self.teacher_master = [p.detach().to(_master_dtype(p.dtype), copy=True) for p in self.teacher_params]
        hp = self.hparams
        self.optimizer = build_optimizer(self.params, "adam", hp.lr, beta=hp.beta, weight_decay=hp.weight_decay)
        wrapped = TeacherStudent(model, teacher)
        self._adaptive_layers = self._layers(wrapped)
        return wrapped

    def guarded_tensors(self) -> list[torch.Tensor]:
        """Besides the optimizer: the teacher's averaged parameters and the statistics layers'
        buffers, which an update mid-batch changes (it commits the robust statistics itself)."""
        buffers = [b for layer in self._adaptive_layers for b in layer.buffers()]
        return super().guarded_tensors() + self.teacher_params + buffers

    # -- step -------------------------------------------------------------------------------
    @staticmethod
    def _layers(model: nn.Module) -> list[AdaptiveNorm]:
        return [m for m in model.modules() if isinstance(m, AdaptiveNorm)]

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        layers = self._layers(model)
        _set_frozen(layers, True)
        try:
            with torch.no_grad():
                return model.teacher(x)  # type: ignore[operator]
        finally:
            _set_frozen(layers, False)

    def step(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        assert isinstance(model, TeacherStudent) and self.optimizer is not None, "convert() must run first"
        out = self.predict(model, x)
        layers = self._layers(model)
        for layer in layers:
            layer.discard()  # statistics layers without a frozen mode must not move on the prediction
        rows, _ = self._memory_rows(x, out)
        if rows is None:
            return out
        memory = self.memory
        pending: dict[int, int] = {}  # slot -> row of x, written at the next update or the end
        for i, (label, u) in enumerate(rows):
            slot = memory.add(int(label), u)
            if slot is not None:
                pending[slot] = i
            self.seen += 1
            if self.seen % self.hparams.update_frequency == 0:
                self._write(pending, x)
                pending = {}
                self._update(model, layers)
        self._write(pending, x)
        return out

    def _memory_rows(self, x: torch.Tensor, out: torch.Tensor) -> tuple[list[list[float]] | None, torch.Tensor]:
        """The memory's inputs for a batch: ``[pseudo-label, uncertainty]`` per sample, on the
        host (the step's one host synchronisation), and the pseudo-labels on the device; rows
        are None when the batch or its prediction holds NaN/Inf: then nothing may change (the
        official code would store such samples; a NaN score is never evicted)."""
        memory = self.memory
        if memory.num_classes is None:
            memory.num_classes = int(out.shape[1])
        elif memory.num_classes != out.shape[1]:
            raise ValueError(f"{self.name}'s memory was built for {memory.num_classes} classes, got {out.shape[1]}")
        with torch.no_grad():
            probs = torch.softmax(out.float(), dim=1)
            uncertainty = -(probs * torch.log(probs + 1e-6)).sum(1)
            finite = torch.isfinite(x).all() & torch.isfinite(uncertainty).all()
            predicted = probs.argmax(1)
            labels = torch.where(finite, predicted, -1).float()
            meta = torch.stack([labels, uncertainty], 1).cpu()
        rows = meta.tolist()
        if rows and rows[0][0] < 0:
            return None, predicted
        return rows, predicted

    def _write(self, slots: dict[int, int], x: torch.Tensor) -> None:
        """Copy ``x[slots[s]]`` into slot s of the bank for every s (one indexed copy)."""
        shape = (self.memory.capacity, *x.shape[1:])
        if self.bank.shape != shape:
            if self.bank.numel():
                raise ValueError(
                    f"rotta's memory holds samples of shape {tuple(self.bank.shape[1:])}, got a batch "
                    f"of {tuple(x.shape[1:])}; reset() before changing the input shape"
                )
            self.bank = torch.zeros(shape, dtype=x.dtype, device=x.device)
        if not slots:
            return
        target = torch.tensor(list(slots.keys()), dtype=torch.long).to(self.bank.device, non_blocking=True)
        source = torch.tensor(list(slots.values()), dtype=torch.long).to(x.device, non_blocking=True)
        self.bank.index_copy_(0, target, x.detach().index_select(0, source).to(self.bank))

    def _update(self, model: TeacherStudent, layers: list[AdaptiveNorm]) -> None:
        assert self.optimizer is not None
        index, ages = self.memory.ordered()
        if index.size:
            device = self.bank.device
            data = self.bank.index_select(0, torch.from_numpy(index).to(device, non_blocking=True))
            hp = self.hparams
            student_in = data if hp.augment == "none" else strong_augment(data, self.generator, RANGES[hp.augment])
            weight = timeliness_weight(torch.from_numpy(ages).float().to(device, non_blocking=True))
            with torch.no_grad():
                teacher_out = model.teacher(data)
            with torch.enable_grad():
                student_out = model.student(student_in)
                cross = -(torch.softmax(teacher_out.float(), 1) * torch.log_softmax(student_out.float(), 1)).sum(1)
                descend(self.optimizer, (cross * weight).mean())
            commit_layers(layers)  # one update per update_frequency samples, possibly several per batch
        self._average_teacher(self.hparams.nu)
        self.num_updates += 1

    def _average_teacher(self, rate: float | torch.Tensor) -> None:
        """``theta_T <- (1 - rate) theta_T + rate theta_S`` on the fp32 copies of the teacher's
        trained parameters, then written to the teacher. A float rate runs as one ``lerp``; a
        0-d tensor (computed on the device, PeTTA's adaptive rate) in the official form."""
        assert self.optimizer is not None
        if not self.teacher_master:
            return
        with torch.no_grad():
            students = [m.detach().to(t.dtype) for m, t in zip(self.optimizer.masters, self.teacher_master)]
            if isinstance(rate, torch.Tensor):
                rate = rate.to(self.teacher_master[0])
                torch._foreach_mul_(self.teacher_master, 1.0 - rate)
                torch._foreach_add_(self.teacher_master, torch._foreach_mul(students, rate))
            else:
                torch._foreach_lerp_(self.teacher_master, students, rate)
            torch._foreach_copy_([p.detach() for p in self.teacher_params], self.teacher_master)
