"""``adanpc``: a non-parametric (k-nearest-neighbour) classifier over a memory of source
features that grows with confidently predicted test samples (AdaNPC)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tta.features import find_classifier, logits_and_features
from tta.hyperparams import hparam
from tta.layers.base import AdaptiveNorm
from tta.methods.base import OUTPUT, Method
from tta.methods.lame import FeatureLayerError
from tta.methods.optim import conversion_target
from tta.methods.state import state
from tta.registry import register_method

#: added to every class score before the clamp to 1 (official ``pred_scores + 1e-5``)
SCORE_EPS = 1e-5


@dataclasses.dataclass
class AdaNPCHparams:
    #: k: neighbours that vote (official test-time default 100; fewer when the memory is smaller)
    k: int = hparam(100, low=1, symbol="k")
    #: temperature of the softmax over the k cosine similarities (official default 0.1)
    temperature: float = hparam(0.1, low=0.0, low_open=True, symbol="τ")
    #: a test sample joins the memory, with its predicted label, when the largest entry of
    #: softmax(vote scores) is >= beta (official rule and default 0.1; above 1: never)
    beta: float = hparam(0.1, low=0.0, symbol="β")
    #: keep at most this many test entries (oldest dropped first); None: unbounded (official)
    max_test_memory: int | None = hparam(None, low=1)
    #: qualified name of the classifier layer whose input are the features; None: found
    #: automatically (see :mod:`tta.features`)
    feature_layer: str | None = None
    #: labelled source data for the initial memory (required): any iterable of ``(inputs,
    #: labels)`` batches (tuples/lists, or dicts with "x"/"image" and "y"/"label"), e.g. a
    #: torch DataLoader over the training set. Read once at wrap time, not kept.
    source_loader: Any = None


def _inputs_and_labels(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, (list, tuple)) and len(batch) >= 2 and all(isinstance(b, torch.Tensor) for b in batch[:2]):
        return batch[0], batch[1]
    if isinstance(batch, dict):
        x = batch.get("x", batch.get("image"))
        y = batch.get("y", batch.get("label"))
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            return x, y
    raise TypeError(
        "adanpc: source_loader must yield labelled batches: (inputs, labels) tuples/lists or dicts with "
        f"'x'/'image' and 'y'/'label' tensors; got {type(batch).__name__}"
    )


@contextlib.contextmanager
def frozen_statistics(model: nn.Module) -> Iterator[None]:
    """Statistics layers normalize as they would but keep no update (source data must not
    move a composed statistics method's state)."""
    layers = [m for m in model.modules() if isinstance(m, AdaptiveNorm)]
    adapting = [layer.adapting for layer in layers]
    try:
        for layer in layers:
            layer.adapting = False
        yield
    finally:
        for layer, flag in zip(layers, adapting):
            layer.adapting = flag
            layer.discard()


def knn_vote(
    features: torch.Tensor,
    memory: torch.Tensor | Sequence[torch.Tensor],
    labels: torch.Tensor | Sequence[torch.Tensor],
    num_classes: int,
    k: int,
    temperature: float,
) -> torch.Tensor:
    """Class scores ``(N, C)`` of a temperature-weighted vote of the k nearest memory entries.

    ``features`` ``(N, D)`` are L2-normalized here; ``memory`` ``(M, D)`` is already
    normalized; ``labels`` ``(M,)``. With ``s_ij`` the cosine similarity of sample i and entry
    j and ``K_i`` the ``min(k, M)`` largest, ``w_ij = softmax_{j in K_i}(s_ij / tau)`` and
    ``score_ic = sum_{j in K_i, y_j = c} w_ij``; returned ``min(score + 1e-5, 1)`` (the
    official guard against log 0). ``memory`` and ``labels`` may be given in consecutive
    chunks (the source entries, then the test entries): the similarities are computed per
    chunk, so the large source part is never copied."""
    chunks = [memory] if isinstance(memory, torch.Tensor) else list(memory)
    labels = labels if isinstance(labels, torch.Tensor) else torch.cat(list(labels))
    normalized = F.normalize(features.float(), dim=1)
    sims = torch.cat([normalized @ chunk.T for chunk in chunks], dim=1) if len(chunks) > 1 else normalized @ chunks[0].T
    top, index = sims.topk(min(int(k), sims.shape[1]), dim=1)
    weights = torch.softmax(top / temperature, dim=1)
    votes = torch.zeros(features.shape[0], num_classes, device=features.device, dtype=weights.dtype)
    votes.scatter_add_(1, labels[index], weights)
    return (votes + SCORE_EPS).clamp(max=1.0)


def confident(scores: torch.Tensor, beta: float) -> torch.Tensor:
    """Which samples join the memory: ``max_c softmax(scores)_c >= beta`` (the official rule
    applies a softmax to the vote scores, which are already in [0, 1])."""
    return torch.softmax(scores, dim=1).amax(1) >= beta


@register_method
class AdaNPC(Method):
    """AdaNPC (Zhang et al., "AdaNPC: Exploring Non-Parametric Classifier for Test-Time
    Adaptation", ICML 2023, arXiv 2304.12566; official code yfzhang114/AdaNPC,
    ``domainbed/adapt_algorithms.py`` ``AdaNPC`` and ``domainbed/knn.py`` ``MomentumQueue``).
    See docs/METHODS.md §10.7.

    The model is frozen; its linear head is replaced by a k-nearest-neighbour classifier on
    the penultimate features f (the input of the classifier layer, :mod:`tta.features`):

    1. wrap time: the memory holds ``(f(x)/||f(x)||, y)`` for every labelled source sample of
       ``source_loader`` (the official run stores the source domains' features with their true
       labels), computed as the wrapped model normalizes, statistics frozen;
    2. per batch: scores by :func:`knn_vote` against the memory as it stands before the batch
       (cosine similarity, the k nearest, softmax of similarity / temperature, weights summed
       per label); returned ``log(scores)`` (so ``softmax(output)`` is the normalized vote and
       the argmax the vote's);
    3. then every sample whose ``max softmax(scores) >= beta`` (:func:`confident`) is appended,
       normalized, with its predicted label ``argmax scores``.

    Source entries are configuration (fixed after wrapping, saved with ``state_dict()``); the
    test entries are declared state (guarded, restored by ``reset()``). One host
    synchronisation per step: how many samples join (the memory's size depends on it, as in
    the official code); on a step where the memory grew, the guard reads its finiteness flag
    too (as for any growing bank, :class:`tta.methods.state.StateGuard`). Cost: the model's
    forward plus one ``(N, D) x (D, M)`` product and a top-k over the M entries.

    Deviations: the official memory starts with one random, unnormalized row labelled 0 (a
    placeholder of ``MomentumQueue(..., queue_size=1)``) that stays in the memory and can vote;
    it is left out. ``k`` is capped at the memory size (official: an error). ``max_test_memory``
    (default None, official) can bound the test entries.
    """

    name = "adanpc"
    role = OUTPUT
    Hparams = AdaNPCHparams
    requires = "labelled source data for the initial kNN memory (source_loader=...)"
    source_data_argument = "source_loader"

    #: test entries: normalized features (fp32) and their predicted labels
    memory = state(lambda m: torch.zeros(0, 0))
    memory_labels = state(lambda m: torch.zeros(0, dtype=torch.long))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.source_features = torch.zeros(0, 0)
        self.source_labels = torch.zeros(0, dtype=torch.long)
        self.num_classes = 0

    # -- conversion -------------------------------------------------------------------------
    def convert(self, model: nn.Module) -> nn.Module:
        loader = self.take_source_data()
        self._layer = self._find_layer(model)
        if loader is None:
            raise ValueError(
                "method 'adanpc' needs labelled source data for its kNN memory: "
                "tta.adapt(model, 'adanpc', source_loader=<iterable of (inputs, labels) batches>)"
            )
        features, labels, num_classes = self._encode(model, loader)
        self.source_features, self.source_labels, self.num_classes = features, labels, num_classes
        self.memory = features.new_zeros(0, features.shape[1])
        self.memory_labels = labels.new_zeros(0)
        return model

    def _find_layer(self, model: nn.Module) -> str | None:
        layer = self.hparams.feature_layer
        if layer is None:
            found = find_classifier(model)
            return found[0] if found is not None else None
        names = [name for name, _ in model.named_modules() if name]
        if layer not in names:
            raise FeatureLayerError(
                f"method 'adanpc': feature_layer={layer!r} is not a module of the model; pass None (found "
                "automatically) or the qualified name of the layer whose input are the features"
            )
        return layer

    def _encode(self, model: nn.Module, loader: Iterable[Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
        parameter = next(iter(model.parameters()), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        dtype = parameter.dtype if parameter is not None else torch.float32
        features, labels, num_classes = [], [], 0
        with torch.no_grad(), frozen_statistics(model):
            for batch in loader:
                x, y = _inputs_and_labels(batch)
                x = x.to(device=device, dtype=dtype if x.is_floating_point() else None)
                logits, f = logits_and_features(model, x, self._layer)
                num_classes = logits.shape[1]
                features.append(F.normalize(f.float(), dim=1))
                labels.append(y.to(device=device, dtype=torch.long).reshape(-1))
        if not features:
            raise ValueError("adanpc: source_loader yielded no batch")
        labels_all = torch.cat(labels)
        if labels_all.numel() and (int(labels_all.min()) < 0 or int(labels_all.max()) >= num_classes):
            raise ValueError(f"adanpc: source labels must lie in [0, {num_classes}) (the model's classes)")
        return torch.cat(features), labels_all, num_classes

    # -- steps ------------------------------------------------------------------------------
    def scores(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits, features, vote scores)`` against the memory as it stands."""
        logits, features = logits_and_features(model, x, self._layer)
        device = features.device
        source, source_labels = self.source_features.to(device), self.source_labels.to(device)
        memory, memory_labels = self.memory.to(device), self.memory_labels.to(device)
        if memory.shape[0]:  # source and test entries, in that order (the official memory's)
            bank, bank_labels = (source, memory), (source_labels, memory_labels)
        else:
            bank, bank_labels = (source,), (source_labels,)
        hp = self.hparams
        return logits, features, knn_vote(features, bank, bank_labels, self.num_classes, hp.k, hp.temperature)

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits, _, scores = self.scores(model, x)
            return scores.log().to(logits.dtype)

    def step(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        hp = self.hparams
        with torch.no_grad():
            logits, features, scores = self.scores(model, x)
            keep = confident(scores, hp.beta)
            added = F.normalize(features[keep].float(), dim=1)  # the step's host synchronisation
            if added.shape[0]:
                memory = torch.cat([self.memory.to(added.device), added])
                labels = torch.cat([self.memory_labels.to(added.device), scores[keep].argmax(1)])
                if hp.max_test_memory is not None and memory.shape[0] > hp.max_test_memory:
                    memory, labels = memory[-hp.max_test_memory:], labels[-hp.max_test_memory:]
                self.memory, self.memory_labels = memory, labels
            return scores.log().to(logits.dtype)

    # -- the source memory: configuration, saved with the state -----------------------------
    def extra_state(self) -> dict[str, Any]:
        saved = super().extra_state()
        saved["__source__"] = {
            "features": self.source_features.detach().clone(),
            "labels": self.source_labels.detach().clone(),
            "num_classes": self.num_classes,
        }
        return saved

    def load_extra_state(self, saved: dict[str, Any]) -> None:
        saved = dict(saved)
        source = saved.pop("__source__", None)
        if source is not None:
            device = self.source_features.device
            self.source_features = source["features"].to(device)
            self.source_labels = source["labels"].to(device)
            self.num_classes = int(source["num_classes"])
        super().load_extra_state(saved)

    def follow_device(self, fn: Any) -> None:
        super().follow_device(fn)
        self.source_features = self.source_features.to(conversion_target(fn, self.source_features).device)
        self.source_labels = self.source_labels.to(conversion_target(fn, self.source_labels).device)

