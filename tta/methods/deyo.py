"""``deyo``: destroy your object (DeYO): entropy minimization on samples whose prediction
depends on the object's shape, selected and weighted by entropy and by the pseudo-label
probability difference (PLPD) under a shape-destroying augmentation."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from tta.hyperparams import hparam
from tta.methods.affine import NormAffineObjective
from tta.methods.entropy import EntropyLossHparams, sample_entropy
from tta.methods.optim import LOW_PRECISION, OptimizerHparams, descend
from tta.methods.sar import SAR_EXCLUDE_OFFICIAL
from tta.methods.state import state
from tta.registry import register_method

#: the shape-destroying augmentations of the official code (``--aug_type``)
AUGMENTATIONS = ("patch", "pixel", "occ")


# -- the augmented view x' --------------------------------------------------------------------
def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with antialiasing (as ``torchvision.transforms.Resize`` on tensors), in
    fp32 for half-precision inputs; a no-op at the same size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    work = x.float() if x.dtype in LOW_PRECISION else x
    return F.interpolate(work, size=size, mode="bilinear", align_corners=False, antialias=True).to(x.dtype)


def patch_shuffle(x: torch.Tensor, patch_len: int, generator: torch.Generator) -> torch.Tensor:
    """Cut every image into a ``patch_len x patch_len`` grid of tiles and put the tiles back in
    a random order, one permutation per image.

    Images whose sides are not multiples of ``patch_len`` are resized down to the nearest
    multiples first and back to their size after. The permutations are the ``argsort`` of
    ``(N, patch_len^2)`` uniform draws from ``generator`` (on the CPU)."""
    n, c, h, w = x.shape
    p = int(patch_len)
    th, tw = (h // p) * p, (w // p) * p
    if th == 0 or tw == 0:
        raise ValueError(f"deyo: patch_len {p} exceeds the image size {h} x {w}")
    y = _resize(x, (th, tw))
    ph, pw = th // p, tw // p
    tiles = y.reshape(n, c, p, ph, p, pw).permute(0, 2, 4, 1, 3, 5).reshape(n, p * p, c, ph, pw)
    order = torch.rand(n, p * p, generator=generator).argsort(dim=1).to(x.device)
    tiles = tiles[torch.arange(n, device=x.device).unsqueeze(1), order]
    y = tiles.reshape(n, p, p, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, th, tw)
    return _resize(y, (h, w))


def pixel_shuffle(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Permute the pixel positions, one permutation (``randperm`` of ``generator``) shared
    by all images and channels."""
    n, c, h, w = x.shape
    order = torch.randperm(h * w, generator=generator).to(x.device)
    return x.reshape(n, c, h * w)[:, :, order].reshape(n, c, h, w)


def occlude(x: torch.Tensor, size: int, row: int, col: int) -> torch.Tensor:
    """A copy of ``x`` whose ``size x size`` square at ``(row, col)`` (clipped to the image)
    holds each image's per-channel mean."""
    y = x.clone()
    mean = x.mean(dim=(2, 3), keepdim=True)
    window = y[:, :, row:row + size, col:col + size]
    window.copy_(mean.expand_as(window))
    return y


# -- selection and weights --------------------------------------------------------------------
def plpd(probs: torch.Tensor, probs_aug: torch.Tensor) -> torch.Tensor:
    """Pseudo-label probability difference per sample: ``p(y_hat | x) - p(y_hat | x')`` with
    ``y_hat = argmax p(. | x)``; both arguments ``(N, C)`` probabilities."""
    label = probs.argmax(dim=1, keepdim=True)
    return (probs.gather(1, label) - probs_aug.gather(1, label)).squeeze(1)


def deyo_weights(
    ent: torch.Tensor, plpd_: torch.Tensor, e0: float, reweight_ent: bool = True, reweight_plpd: bool = True
) -> torch.Tensor:
    """Sample weights (paper Eq. 10): ``exp(Ent_0 - Ent(x))`` (``reweight_ent``) plus
    ``exp(PLPD(x))`` (``reweight_plpd``); 1 with neither. Without gradient."""
    ent, plpd_ = ent.detach(), plpd_.detach()
    weight = torch.zeros_like(ent)
    if reweight_ent:
        weight = weight + torch.exp(e0 - ent)
    if reweight_plpd:
        weight = weight + torch.exp(plpd_)
    return weight if (reweight_ent or reweight_plpd) else torch.ones_like(ent)


@dataclasses.dataclass
class DeYOHparams(OptimizerHparams, EntropyLossHparams):
    #: Nesterov momentum for SGD (SGD only; the official code uses none)
    nesterov: bool = False
    #: entropy threshold tau_Ent of the selection (Eq. 8); None: 0.5 ln C (official)
    ent_threshold: float | None = hparam(None, low=0.0, low_open=True, symbol="τ_Ent")
    #: PLPD threshold tau_PLPD of the selection (Eq. 8): official default 0.2 (the authors'
    #: script uses 0.3 for ImageNet-C with a BN ResNet-50, 0.2 in the wild settings)
    plpd_threshold: float = hparam(0.2, low=-1.0, high=1.0, symbol="τ_PLPD")
    #: entropy margin Ent_0 of the weights (Eq. 10); None: 0.4 ln C (official)
    e0: float | None = hparam(None, low=0.0, low_open=True, symbol="Ent_0")
    #: weight each selected sample by exp(Ent_0 - Ent) (official True)
    reweight_ent: bool = True
    #: weight each selected sample by exp(PLPD) (official True)
    reweight_plpd: bool = True
    #: the shape-destroying augmentation x': "patch" (shuffled tiles, official), "pixel"
    #: (shuffled pixels) or "occ" (a square filled with the image's mean)
    aug: str = hparam("patch", choices=AUGMENTATIONS)
    #: tiles per image side for "patch" (official 4)
    patch_len: int = hparam(4, low=1)
    #: side of the "occ" square in pixels; None: half the image height (official 112 at 224)
    occlusion_size: int | None = hparam(None, low=1)
    #: top row of the "occ" square; None: a quarter of the image height (official 56 at 224)
    occlusion_row: int | None = hparam(None, low=0)
    #: left column of the "occ" square; None: a quarter of the image width (official 56 at 224)
    occlusion_col: int | None = hparam(None, low=0)
    #: regular expressions of module names whose affine parameters stay frozen (re.search);
    #: default: the official rules (``layer4`` of ResNets, last 3 blocks and final norm of ViT-Base)
    exclude: tuple[str, ...] = SAR_EXCLUDE_OFFICIAL
    #: gradient steps per batch (official 1)
    steps: int = hparam(1, low=1)
    #: restore the wrap-time model and method state before every batch
    episodic: bool = False


@register_method
class DeYO(NormAffineObjective):
    """DeYO (Lee et al., "Entropy is not Enough for Test-Time Adaptation: From the Perspective
    of Disentangled Factors", ICLR 2024, openreview 9w3iw8wDuE; official code Jhyun17/DeYO
    ``methods/deyo.py``; docs/METHODS.md §10.9).

    Idea: entropy alone cannot tell whether a confident prediction rests on the object's shape
    or on spurious, shape-free cues (colour, texture, background). DeYO destroys the shape
    (shuffles image tiles) and measures how much the probability of the predicted class drops:
    the pseudo-label probability difference (PLPD). Samples that are confident *and* whose
    prediction collapses without the shape are trusted for entropy minimization.

    Trainable: the affine parameters of the normalization layers except those whose module
    name matches ``exclude`` (official: ``layer4`` of ResNets; ``blocks.9-11`` and the final
    ``norm`` of ViT-Base); alone on a BatchNorm model DeYO runs on ``norm`` (test-batch
    statistics, as the official code forces). Per batch, ``steps`` times:

    1. ``y = f_theta(x)`` (the returned prediction) and ``Ent(x_b)``, the softmax entropy
       (``loss="entropy"``) or COME's entropy of the opinion (``loss="come"``);
    2. entropy filter: ``S1 = {b : Ent(x_b) < tau_Ent}``, ``tau_Ent = 0.5 ln C``;
    3. the augmented view ``x'`` of the samples of ``S1`` only (``aug``: :func:`patch_shuffle`
       with ``patch_len`` 4 by default, :func:`pixel_shuffle`, :func:`occlude`); a forward of
       ``x'`` without gradient (with batch statistics its normalization sees the ``S1`` batch,
       as in the official code);
    4. ``PLPD_b = p(y_hat_b | x_b) - p(y_hat_b | x'_b)`` (:func:`plpd`, ``y_hat_b`` the
       prediction on ``x_b``); PLPD filter ``S2 = {b in S1 : PLPD_b > tau_PLPD}`` (with step 2
       the selection rule, Eq. 8);
    5. loss ``mean_{b in S2} alpha_b Ent(x_b)`` with
       ``alpha_b = exp(Ent_0 - Ent(x_b)) + exp(PLPD_b)`` (:func:`deyo_weights`, Eq. 10;
       ``Ent_0 = 0.4 ln C``; either term can be turned off), the weights without gradient;
    6. one optimizer step, **skipped when ``S1`` or ``S2`` is empty** (official: no backward,
       no step, momentum does not move either).

    Defaults (CIFAR-10-C): the official thresholds (``tau_Ent = 0.5 ln C``,
    ``tau_PLPD = 0.2``, ``Ent_0 = 0.4 ln C``, 4 x 4 patches) with the optimizer of the
    CIFAR-10-C configuration of the ROID authors' port (Adam, lr 1e-3, beta 0.9, batch 200);
    the official repository itself has ImageNet-C runs only (SGD, momentum 0.9, lr 0.00025 at
    batch 64: ``optimizer="sgd", lr=0.00025``).

    COME (``loss="come"``; the COME authors have no DeYO variant): as in their EATA and SAR
    variants, COME's entropy replaces the softmax entropy everywhere DeYO uses an entropy (the
    filter of step 2, the weight and the loss); PLPD stays on the softmax probabilities.

    Randomness: the tile permutations (``patch``) and the pixel permutation (``pixel``) are
    drawn from ``self.generator``; nothing is drawn when ``S1`` is empty (as in the official
    code, where the draws come from the global RNG).

    Cost: one forward and one backward on the batch and one forward without gradient on
    ``S1``. Two host synchronisations per step, both algorithmic: the size of ``S1`` (the
    augmented batch is its samples, whose batch statistics the official code uses) and
    whether ``S2`` is empty (which decides whether the optimizer steps). The counters
    ``num_reliable`` (samples in ``S1``) and ``num_selected`` (in ``S2``) are device tensors.

    Deviations: eval mode instead of the official ``model.train()`` (normalization uses batch
    statistics either way; dropout/stochastic depth stay off, as in the ROID authors' port).
    Non-square images are tiled per side (the official code assumes square images). The
    ``occ`` square defaults to the official geometry scaled to the image (112 and 56 pixels at
    224) instead of fixed pixel values, which would fall outside a 32 x 32 image. The
    official ablation switches that disable the filters are thresholds here
    (``ent_threshold`` large, ``plpd_threshold=-1``).
    """

    name = "deyo"
    Hparams = DeYOHparams

    num_reliable = state(lambda m: torch.zeros((), dtype=torch.long))
    num_selected = state(lambda m: torch.zeros((), dtype=torch.long))

    def thresholds(self, num_classes: int) -> tuple[float, float]:
        """``(tau_Ent, Ent_0)`` for ``num_classes`` classes."""
        hp = self.hparams
        tau = hp.ent_threshold if hp.ent_threshold is not None else 0.5 * math.log(num_classes)
        e0 = hp.e0 if hp.e0 is not None else 0.4 * math.log(num_classes)
        return tau, e0

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """The shape-destroying view ``x'`` of ``x`` (``aug``)."""
        hp = self.hparams
        if hp.aug == "patch":
            return patch_shuffle(x, hp.patch_len, self.generator)
        if hp.aug == "pixel":
            return pixel_shuffle(x, self.generator)
        h, w = x.shape[-2:]
        size = hp.occlusion_size if hp.occlusion_size is not None else h // 2
        row = hp.occlusion_row if hp.occlusion_row is not None else h // 4
        col = hp.occlusion_col if hp.occlusion_col is not None else w // 4
        return occlude(x, size, row, col)

    def step(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        optimizer = self.optimizer
        assert optimizer is not None, "convert() must run first"
        hp = self.hparams
        out = None
        for _ in range(int(hp.steps)):
            with torch.enable_grad():
                out = model(x)
                tau, e0 = self.thresholds(out.shape[1])
                ent = sample_entropy(out, hp.loss)
                # host synchronisation 1: which samples pass the entropy filter (NaN never does)
                index = (ent < tau).nonzero().squeeze(1)
                self.num_reliable = self.num_reliable.to(out.device) + index.numel()
                if index.numel() == 0:
                    continue
                with torch.no_grad():
                    out_aug = model(self.augment(x.detach()[index]))
                    probs = torch.softmax(out.detach()[index].float(), dim=1)
                    diff = plpd(probs, torch.softmax(out_aug.float(), dim=1))
                    selected = diff > hp.plpd_threshold
                    count = selected.sum()
                ent1 = ent[index]
                weights = deyo_weights(ent1, diff, e0, hp.reweight_ent, hp.reweight_plpd)
                loss = torch.where(selected, weights * ent1, 0.0).sum() / count.clamp_min(1)
            self.num_selected = self.num_selected.to(out.device) + count
            if bool(count > 0):  # host synchronisation 2: skip the update when S2 is empty
                descend(optimizer, loss)
        return out.detach()  # type: ignore[union-attr]
