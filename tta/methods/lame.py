"""``lame``: Laplacian-adjusted maximum-likelihood estimation on the model's outputs."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from tta.features import find_classifier, logits_and_features
from tta.hyperparams import hparam
from tta.methods.base import OUTPUT, Method
from tta.registry import register_method

_EPS_LOG = 1e-10  # official: unary = -log(p + 1e-10)
_CHECK_EVERY = 10  # iterations between host-side convergence checks


@dataclasses.dataclass
class LAMEHparams:
    #: affinity on the L2-normalized penultimate features: "knn", "rbf" (official default) or "linear"
    affinity: str = hparam("rbf", choices=("knn", "rbf", "linear"))
    #: k: neighbours of the kNN affinity; for rbf, sigma = mean distance to the k-th nearest
    #: point counting the point itself (official 5)
    knn: int = hparam(5, low=1, symbol="k")
    #: lambda, weight of the Laplacian term (official 1)
    bound_lambda: float = hparam(1.0, low=0.0, symbol="λ")
    #: maximum bound-optimization iterations (official 100)
    max_steps: int = hparam(100, low=1)
    #: symmetrize the affinity, W <- (W + W^T) / 2 (official False)
    force_symmetry: bool = False
    #: qualified name of the classifier layer whose input are the features; None: found
    #: automatically (see :mod:`tta.features`)
    feature_layer: str | None = None


def knn_affinity(features: torch.Tensor, knn: int) -> torch.Tensor:
    """Binary ``W_ij = 1`` for the k nearest neighbours j of i (Euclidean), excluding i itself
    (the nearest ``min(k + 1, N)`` minus the first); not symmetric. ``features``: ``(S, N, D)``."""
    n = features.shape[-2]
    dist = torch.cdist(features, features, compute_mode="donot_use_mm_for_euclid_dist")
    index = dist.topk(min(knn + 1, n), dim=-1, largest=False).indices[..., 1:]
    weights = torch.zeros_like(dist)
    return weights.scatter_(-1, index, 1.0)


def rbf_affinity(features: torch.Tensor, knn: int) -> torch.Tensor:
    """``W_ij = exp(-d_ij^2 / (2 sigma^2))``, sigma = mean over i of the distance to its
    ``min(k, N)``-th nearest point counting itself (official; diagonal kept at 1).

    Guard: sigma = 0 (batch of one, or all points equal) gives W = 0 (no pairwise
    information) instead of the official NaN; decided on the device."""
    n = features.shape[-2]
    dist = torch.cdist(features, features, compute_mode="donot_use_mm_for_euclid_dist")
    sigma = dist.topk(min(knn, n), dim=-1, largest=False).values[..., -1].mean(-1)  # (S,)
    ok = (sigma > 0)[:, None, None]
    safe = torch.where(ok, sigma[:, None, None], torch.ones_like(sigma)[:, None, None])
    return torch.where(ok, torch.exp(-dist.square() / (2 * safe.square())), 0.0)


def linear_affinity(features: torch.Tensor, knn: int) -> torch.Tensor:
    """``W = X X^T`` (cosine similarity of the normalized features)."""
    return features @ features.transpose(-1, -2)


class FeatureLayerError(ValueError, AttributeError):
    """``feature_layer`` names no module of the model. A ``ValueError`` like every other bad
    hyperparameter, and an ``AttributeError`` as torch's ``get_submodule`` raised before."""


AFFINITIES = {"knn": knn_affinity, "rbf": rbf_affinity, "linear": linear_affinity}


def entropy_energy(z: torch.Tensor, unary: torch.Tensor, pairwise: torch.Tensor, bound_lambda: float) -> torch.Tensor:
    """Per-stream ``E = sum_i z_i.a_i - lambda sum_i z_i.pairwise_i + sum_i z_i.log z_i``.

    Official: ``pairwise`` already carries lambda and is multiplied by lambda again (lambda^2;
    identical at the default lambda = 1); kept to reproduce the stopping rule."""
    return (unary * z - bound_lambda * pairwise * z + z * torch.log(z.clamp_min(1e-20))).sum((-2, -1))


def laplacian_optimization(
    unary: torch.Tensor, kernel: torch.Tensor, bound_lambda: float = 1.0, max_steps: int = 100
) -> torch.Tensor:
    """Bound optimization of LAME's objective (the paper's concave-convex bound optimization); returns ``log Z``.

    ``unary``: ``(S, N, K)`` = ``-log(p + 1e-10)``; ``kernel``: ``(S, N, N)``. Start from
    ``Z = softmax(-unary)``; iterate ``Z <- softmax(-unary + lambda W Z)`` (the closed-form
    minimizer of the linearized bound); stop a stream once ``i > 1`` and
    ``|E - E_prev| <= 1e-8 |E_prev|`` (official rule, energy from the new Z and the pairwise
    term of the previous Z). Converged streams are frozen on the device, so the result equals
    the official per-stream loop; the host checks whether all streams converged only every
    10 iterations (a decision of the algorithm: when to stop) instead of every iteration.
    """
    log_z = torch.log_softmax(-unary, dim=-1)
    z = log_z.exp()
    streams = unary.shape[0]
    old_energy = torch.full((streams,), float("inf"), device=unary.device, dtype=unary.dtype)
    converged = torch.zeros(streams, dtype=torch.bool, device=unary.device)
    for i in range(max_steps):
        pairwise = bound_lambda * kernel @ z
        new_log_z = torch.log_softmax(-unary + pairwise, dim=-1)
        new_z = new_log_z.exp()
        energy = entropy_energy(new_z, unary, pairwise, bound_lambda)
        frozen = converged[:, None, None]
        log_z = torch.where(frozen, log_z, new_log_z)
        z = torch.where(frozen, z, new_z)
        done = (energy - old_energy).abs() <= 1e-8 * old_energy.abs()
        if i <= 1:
            done = torch.zeros_like(done)
        old_energy = torch.where(converged, old_energy, energy)
        converged = converged | done
        if (i + 1) % _CHECK_EVERY == 0 and i + 1 < max_steps and bool(converged.all()):
            break
    return log_z


@register_method
class LAME(Method):
    """LAME (Boudiaf et al., "Parameter-free Online Test-time Adaptation", CVPR 2022,
    arXiv 2201.05718; docs/METHODS.md §8). Output-only: the model is frozen (no gradient,
    no parameter or buffer changes; train/eval mode untouched after wrapping in eval).

    Per batch of N samples with class probabilities ``p_i`` and L2-normalized penultimate
    features ``f_i`` (:func:`tta.features.logits_and_features`, one forward):

    ``min_Z  sum_i KL(z_i || p_i) - lambda sum_ij w_ij z_i^T z_j``  (the paper's objective)

    solved by :func:`laplacian_optimization` on the affinity W (kNN, RBF or linear; see the
    functions of this module). Returned: ``log Z``, so ``softmax(output) == Z`` and the
    argmax is Z's; nothing carries over between batches.

    Guards: a batch (or stream sub-batch) of one sample returns ``log_softmax(logits)`` (no
    neighbours: the solver's fixed point is p itself); a degenerate RBF bandwidth and
    non-finite affinities give zero affinity entries. ``num_streams = S`` solves each
    stream's sub-batch separately (batched on the device).
    """

    name = "lame"
    role = OUTPUT
    Hparams = LAMEHparams
    supports_streams = True

    def convert(self, model: nn.Module) -> nn.Module:
        self._layer = self.hparams.feature_layer
        if self._layer is None:
            found = find_classifier(model)
            self._layer = found[0] if found is not None else None
            return model
        names = [name for name, _ in model.named_modules() if name]
        if self._layer not in names:  # fail at wrap time on a wrong name
            linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
            examples = ", ".join(repr(name) for name in (linear or names)[:8])
            raise FeatureLayerError(
                f"method 'lame': feature_layer={self._layer!r} is not a module of the model; accepted values: "
                f"None (the classifier is found automatically) or the qualified name of the layer whose "
                f"input are the features, e.g. {examples}"
            )
        return model

    def step(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.predict(model, x)

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits, features = logits_and_features(model, x, self._layer)
            return self.refine(logits, features)

    def refine(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``log Z`` for logits ``(S*N, K)`` and features ``(S*N, D)`` (stream-major)."""
        hp = self.hparams
        streams = self.num_streams
        n = logits.shape[0] // streams
        if n == 1:
            return torch.log_softmax(logits.float(), dim=-1).to(logits.dtype)
        probs = torch.softmax(logits.float(), dim=-1).unflatten(0, (streams, n))
        unary = -torch.log(probs + _EPS_LOG)
        feats = F.normalize(features.float(), p=2, dim=-1).unflatten(0, (streams, n))
        kernel = AFFINITIES[hp.affinity](feats, int(hp.knn))
        if hp.force_symmetry:
            kernel = 0.5 * (kernel + kernel.transpose(-1, -2))
        kernel = torch.where(torch.isfinite(kernel), kernel, 0.0)
        log_z = laplacian_optimization(unary, kernel, hp.bound_lambda, int(hp.max_steps))
        return log_z.flatten(0, 1).to(logits.dtype)
