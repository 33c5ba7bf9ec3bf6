"""The prediction entropy that TENT, SAR, EATA/ETA, DeYO, ROID and TRIBE minimise or threshold,
and COME's entropy of an opinion, the loss option of the entropy methods."""

from __future__ import annotations

import dataclasses
import math

import torch

from tta.hyperparams import hparam

#: the per-sample losses an entropy method can minimise (its ``loss`` hyperparameter)
LOSSES = ("entropy", "come")

#: the smoothing COME's authors add to every mass of the opinion before the logarithm
OPINION_EPS = 1e-7


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy ``H(y) = -sum_c softmax(y)_c log_softmax(y)_c`` (docs/METHODS.md §1), in fp32.

    One ``log_softmax`` and one ``exp``; the result has shape ``(N,)`` for logits ``(N, C)``.
    """
    log_p = torch.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(1)


def opinion_entropy(logits: torch.Tensor, prior: float | None = None) -> torch.Tensor:
    """COME's conservative entropy (Zhang et al., "COME: Test-time Adaption by Conservatively
    Minimizing Entropy", ICLR 2025, arXiv 2410.10894; docs/METHODS.md §10.10), per sample, in fp32.

    The logits ``y`` (``(N, C)``) are read as evidence for a Dirichlet distribution over the
    class probabilities (subjective logic): evidence ``e_c = exp(y_c)``, total strength
    ``S = sum_c e_c + K`` with ``K`` the prior evidence (``prior``; None: ``K = C``, one unit
    per class). The *opinion* has ``C + 1`` masses: a belief ``b_c = e_c / S`` per class and
    the uncertainty ``u = K / S``; they sum to 1. The loss is their entropy

        ``H(w) = -sum_j q_j log q_j``,  ``q = (b_1, ..., b_C, u) + 1e-7``

    (the authors' code smooths every mass by ``1e-7``, :data:`OPINION_EPS`). Unlike the softmax
    entropy it cannot be driven to zero by confidence alone: a sample with little evidence keeps
    a large ``u``, so its entropy stays high (the "conservative" part).

    The conservative constraint on the logits: before the masses, ``y`` is replaced by
    ``y / ||y|| * sg(||y||)`` (``sg``: no gradient). The value is unchanged; the gradient
    with respect to ``y`` loses its component along ``y``, so the update cannot lower the
    loss by growing the norm of the logits (the total evidence) itself, only by moving their
    direction. A zero logit vector stays zero (the authors' code gives NaN there).

    The masses are one softmax over ``[y_1, ..., y_C, log K]`` (shifted by the maximum inside
    the softmax), so large logits do not overflow ``exp`` (the authors' ``exp(y)`` does above
    88 in fp32).
    """
    y = logits.float()
    norm = torch.linalg.vector_norm(y, dim=1, keepdim=True)
    y = y / norm.clamp_min(torch.finfo(y.dtype).tiny) * norm.detach()
    k = float(y.shape[1]) if prior is None else float(prior)
    log_k = y.new_full((y.shape[0], 1), math.log(k))
    evidence = torch.cat([y, log_k], dim=1)  # log e_1 .. log e_C, log K
    q = torch.softmax(evidence, dim=1) + OPINION_EPS  # b_1 .. b_C, u, smoothed
    return -(q * q.log()).sum(1)


def sample_entropy(logits: torch.Tensor, loss: str = "entropy") -> torch.Tensor:
    """The per-sample entropy an entropy method uses, by its ``loss`` hyperparameter:
    ``"entropy"`` :func:`softmax_entropy`, ``"come"`` :func:`opinion_entropy` (``K = C``)."""
    if loss == "entropy":
        return softmax_entropy(logits)
    if loss == "come":
        return opinion_entropy(logits)
    raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")


@dataclasses.dataclass
class EntropyLossHparams:
    """The ``loss`` option shared by the entropy methods (``tent``, ``eta``/``eata``, ``sar``,
    ``deyo``)."""

    #: per-sample entropy minimised, weighted and thresholded: "entropy" (softmax; the
    #: published method) or "come" (COME's entropy of the opinion, docs/METHODS.md §10.10)
    loss: str = hparam("entropy", choices=LOSSES)
