"""``roid``: certainty- and diversity-weighted soft likelihood ratio, weight ensembling and
prior correction (ROID)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from tta.hyperparams import hparam
from tta.methods.affine import NormAffineObjective
from tta.methods.entropy import softmax_entropy
from tta.methods.optim import OptimizerHparams, descend
from tta.methods.state import state
from tta.registry import register_method

#: SoftLikelihoodRatio of the official code: probabilities clipped at 0.99, 1e-5 in the log
_SLR_CLIP = 0.99
_SLR_EPS = 1e-5
#: weight of each direction of the symmetric cross-entropy (official ``alpha=0.5``)
_SCE_ALPHA = 0.5


def soft_likelihood_ratio(logits: torch.Tensor, clip: float = _SLR_CLIP, eps: float = _SLR_EPS) -> torch.Tensor:
    """Per-sample soft likelihood ratio loss (paper Eq. 3), in fp32, shape ``(N,)``:

    ``L_SLR(x) = - sum_c p_c log(p_c / (1 - p_c) + eps)`` with ``p = min(softmax(logits), clip)``.

    The clip keeps ``1 - p_c`` away from 0 (the loss would diverge as a prediction becomes
    one-hot); above it the gradient is zero, which is what stops over-confidence."""
    p = torch.softmax(logits.float(), dim=1).clamp(0.0, clip)
    return -(p * torch.log(p / (1.0 - p) + eps)).sum(1)


def symmetric_cross_entropy(x: torch.Tensor, reference: torch.Tensor, alpha: float = _SCE_ALPHA) -> torch.Tensor:
    """Per-sample ``-(1 - alpha) sum_c q_c log p_c - alpha sum_c p_c log q_c`` with
    ``p = softmax(x)`` (augmented view) and ``q = softmax(reference)`` (original view);
    gradients flow into both (official ``SymmetricCrossEntropy``)."""
    log_p, log_q = torch.log_softmax(x.float(), 1), torch.log_softmax(reference.float(), 1)
    return -(1.0 - alpha) * (log_q.exp() * log_p).sum(1) - alpha * (log_p.exp() * log_q).sum(1)


def _min_max(values: torch.Tensor) -> torch.Tensor:
    # 0/0 (all values equal, e.g. a batch of one) gives NaN as in the official code; the
    # gradient of such a batch is then zeroed by the non-finite gradient guard
    return (values - values.min()) / (values.max() - values.min())


def roid_weights(
    logits: torch.Tensor, class_probs: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Certainty and diversity weights (paper Eqs. 4-6). Returns ``(weights, keep)``:

    * diversity ``d_b = 1 - cos(p_b, p_bar)`` against the moving average ``p_bar`` of the
      batch-mean predictions, min-max normalized over the batch;
    * certainty ``c_b = -H(p_b)``, min-max normalized over the batch;
    * ``w_b = exp(d_b c_b / T)``; samples with ``d_b < mean(d)`` are dropped (``keep`` is
      False, their weight 0): they resemble what the model predicted recently.
    """
    probs = torch.softmax(logits.float(), dim=1)
    diversity = _min_max(1.0 - F.cosine_similarity(class_probs.float().unsqueeze(0), probs, dim=1))
    keep = ~(diversity < diversity.mean())
    certainty = _min_max(-softmax_entropy(logits))
    weights = torch.exp(diversity * certainty / temperature)
    return torch.where(keep, weights, 0.0), keep


def prior_correction(logits: torch.Tensor) -> torch.Tensor:
    """The official prior correction of the output (paper Eq. 8, in the code's form).

    With ``pi = mean_b softmax(logits)_b`` over the batch of N samples and C classes:
    ``s = max(1/N, 1/C) / max_c pi_c``, ``pi' = (pi + s) / (1 + s C)`` (a smoothed prior
    that sums to one), and the returned output is ``logits * pi'`` (per class).

    Paper and code disagree: the paper reweights the *probabilities* by the smoothed prior;
    the official code multiplies the *logits* by it, and so do we. The smoothing keeps the
    correction mild when the batch is small or the prior flat.

    ``logits`` is ``(N, C)``, or ``(S, N, C)`` for S batches corrected each with its own prior."""
    out = logits.float()
    prior = torch.softmax(out, dim=-1).mean(-2, keepdim=True)
    n, c = out.shape[-2:]
    smooth = max(1.0 / n, 1.0 / c) / prior.amax(-1, keepdim=True)
    return (out * ((prior + smooth) / (1.0 + smooth * c))).to(logits.dtype)


def weight_ensemble_(params: list[torch.Tensor], source: list[torch.Tensor], momentum: float) -> None:
    """``theta <- m theta + (1 - m) theta_src`` in place (paper Eq. 7), for every tensor."""
    if params and momentum < 1.0:
        with torch.no_grad():
            torch._foreach_mul_(params, momentum)
            torch._foreach_add_(params, source, alpha=1.0 - momentum)


@dataclasses.dataclass(frozen=True)
class AugmentDraw:
    """One draw of the official consistency augmentation (the whole batch shares it)."""

    order: tuple[int, ...]  # order of brightness(0), contrast(1), saturation(2), hue(3), gamma(4)
    factors: tuple[float, float, float, float, float]  # in that index order
    angle: float
    translate: tuple[int, int]
    scale: float
    flip: bool


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=generator).item())


def draw_augmentation(generator: torch.Generator, height: int, width: int) -> AugmentDraw:
    """Random parameters of the official ``get_tta_transforms(cotta_augs=False)`` for a batch
    of ``height x width`` images, drawn in the official order (colour-op order, the five
    factors as the ops come up, then angle, translation, scale, flip)."""
    order = tuple(int(i) for i in torch.randperm(5, generator=generator))
    ranges = ((0.6, 1.4), (0.7, 1.3), (0.5, 1.5), (-0.06, 0.06), (0.7, 1.3))
    factors = [1.0, 1.0, 1.0, 0.0, 1.0]
    for op in order:
        factors[op] = _uniform(generator, *ranges[op])
    pad = height // 2
    angle = _uniform(generator, -15.0, 15.0)
    # translation bound: 1/16 of the padded width / height, rounded to whole pixels
    max_dx, max_dy = (width + 2 * pad) / 16.0, (height + 2 * pad) / 16.0
    tx = int(round(_uniform(generator, -max_dx, max_dx)))
    ty = int(round(_uniform(generator, -max_dy, max_dy)))
    scale = _uniform(generator, 0.9, 1.1)
    flip = bool(torch.rand(1, generator=generator).item() < 0.5)
    return AugmentDraw(order, tuple(factors), angle, (tx, ty), scale, flip)  # type: ignore[arg-type]


def apply_augmentation(x: torch.Tensor, draw: AugmentDraw) -> torch.Tensor:
    """The official consistency augmentation with the parameters ``draw``, on a batch of
    images in [0, 1] (N, C, H, W): clip; colour jitter (brightness, contrast, saturation,
    hue, gamma in ``draw.order``; saturation and hue leave non-RGB images as they are, as
    torchvision does); reflect padding by ``H // 2``; affine map (rotation, integer shift,
    scale; bilinear, zero fill); centre crop back to ``H x W``; optional horizontal flip;
    clip. torchvision's functional ops, the ones the official transform calls.

    Deviation: the official crop is square (``H x H``); we crop to ``H x W`` so non-square
    inputs keep their shape (identical for square images)."""
    try:
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode
    except ImportError as error:  # torchvision is optional for the core
        raise ImportError("roid's consistency loss needs torchvision; pass consistency=False") from error
    out = x.clamp(0.0, 1.0)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue, None)
    for op in draw.order:
        if op == 4:  # the official gamma step clamps first (NaN gradients after contrast)
            out = TF.adjust_gamma(out.clamp(1e-8, 1.0), draw.factors[4])
        else:
            out = ops[op](out, draw.factors[op])
    height, width = out.shape[-2:]
    pad = height // 2
    out = TF.pad(out, [pad], padding_mode="reflect")
    out = TF.affine(
        out, angle=draw.angle, translate=list(draw.translate), scale=draw.scale, shear=[0.0, 0.0],
        interpolation=InterpolationMode.BILINEAR, fill=[0.0] * out.shape[-3],
    )
    out = TF.center_crop(out, [height, width])
    if draw.flip:
        out = TF.hflip(out)
    return out.clamp(0.0, 1.0)


@dataclasses.dataclass
class ROIDHparams(OptimizerHparams):
    #: gradient steps per batch (official 1)
    steps: int = hparam(1, low=1)
    #: certainty and diversity weighting (official USE_WEIGHTING True)
    weighting: bool = True
    #: prior correction of the returned output (official USE_PRIOR_CORRECTION True)
    prior_correction: bool = True
    #: consistency loss on an augmented view (official USE_CONSISTENCY True; needs image
    #: batches in [0, 1] and torchvision)
    consistency: bool = True
    #: weight-ensembling momentum m: theta <- m theta + (1 - m) theta_src (official 0.99)
    momentum_src: float = hparam(0.99, low=0.0, high=1.0, symbol="m")
    #: momentum of the moving average of mean predictions (official 0.9)
    momentum_probs: float = hparam(0.9, low=0.0, high=1.0)
    #: temperature T of the weights exp(d c / T) (official 1/3)
    temperature: float = hparam(1.0 / 3.0, low=0.0, low_open=True, symbol="T")
    #: restore the wrap-time model and method state before every batch
    episodic: bool = False


@register_method
class ROID(NormAffineObjective):
    """ROID (Marsden, Döbler & Yang, "Universal Test-time Adaptation through Weight
    Ensembling, Diversity Weighting, and Prior Correction", WACV 2024, arXiv 2306.00650;
    official code: mariodoebler/test-time-adaptation ``classification/methods/roid.py`` and
    the defaults of its ``conf.py``).

    Trainable: the affine parameters of every normalization layer (BatchNorm via the
    statistics layers, GroupNorm, LayerNorm); alone on a BatchNorm model ROID runs on
    ``norm`` (test-batch statistics, as the official code forces). Per batch ``x`` of N
    samples, ``steps`` times:

    1. ``y = f_theta(x)``, ``p = softmax(y)``;
    2. weights (:func:`roid_weights`, Eqs. 4-6): diversity ``d_b = minmax(1 - cos(p_b,
       p_bar))``, certainty ``c_b = minmax(-H(p_b))``, ``w_b = exp(d_b c_b / T)``, and
       ``w_b = 0`` where ``d_b < mean(d)``; then ``p_bar <- m_p p_bar + (1 - m_p) mean_b p_b``
       (``p_bar`` starts uniform);
    3. loss ``L = (1/N) sum_b w_b L_SLR(y_b)`` (:func:`soft_likelihood_ratio`, Eq. 3)
       ``+ (1/N) sum_{b kept} w_b SCE(f_theta(A(x_b)), y_b)`` where A is one random draw of the
       official augmentation for the batch (:func:`apply_augmentation`) and SCE the
       symmetric cross-entropy (:func:`symmetric_cross_entropy`); only the kept samples are
       augmented and forwarded (under batch statistics they normalize among themselves);
    4. one optimizer step, then weight ensembling with the wrap-time parameters
       ``theta <- m theta + (1 - m) theta_0`` (:func:`weight_ensemble_`, Eq. 7);
    5. the returned prediction is ``y`` of the (last) forward with the prior correction of
       :func:`prior_correction` (Eq. 8; the code multiplies logits, see there).

    Departures from the official code, all of form rather than effect:

    * N is the actual batch size; the official code divides by the configured
      ``TEST.BATCH_SIZE`` (the same except for a shorter last batch);
    * a batch of one sample is adapted like any other: its min-max weights are 0/0 = NaN, as
      in the official code, so its gradient is zeroed
      (:func:`tta.methods.optim.nonfinite_guard_`) instead of turning the parameters into
      NaN; the ensembling and the moving average still move. The official framework instead
      buffers single samples in a sliding window;
    * the model stays in eval mode (as in the official code); no mixed precision (fp16/bf16
      parameters train on fp32 masters, see :class:`tta.methods.optim.MasterOptimizer`);
    * the augmentation draws from the wrapper's seeded generator, not the global RNG.

    Cost: two forwards and one backward (one forward and backward without consistency).
    One host synchronisation per step when ``consistency`` is on: the number of kept
    samples, which sets the shape of the augmented batch.
    """

    name = "roid"
    Hparams = ROIDHparams

    #: fp32 wrap-time values of the trainable parameters (weight-ensembling anchors)
    source_params = state(lambda m: [])
    #: moving average of the batch-mean predictions; empty until the first batch gives C
    #: (an empty tensor, not None, so that reset() restores the unset state)
    class_probs = state(lambda m: torch.zeros(0))

    def convert(self, model: nn.Module) -> nn.Module:
        model = super().convert(model)
        self.source_params = [p.detach().float().clone() for p in self.params]
        return model

    def _loss(self, model: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        hp = self.hparams
        n = out.shape[0]
        slr = soft_likelihood_ratio(out)
        if not hp.weighting:
            loss = slr.sum() / n
            keep, weights = None, None
        else:
            if self.class_probs.shape[0] != out.shape[1]:
                self.class_probs = torch.full((out.shape[1],), 1.0 / out.shape[1], device=out.device)
            with torch.no_grad():
                weights, keep = roid_weights(out.detach(), self.class_probs, hp.temperature)
                mean_probs = torch.softmax(out.detach().float(), 1).mean(0)
                self.class_probs = hp.momentum_probs * self.class_probs + (1.0 - hp.momentum_probs) * mean_probs
            loss = torch.where(keep, slr * weights, 0.0).sum() / n
        if hp.consistency:
            if x.dim() != 4:
                raise ValueError(
                    f"roid's consistency loss augments images (N, C, H, W), got shape {tuple(x.shape)}; "
                    "pass consistency=False for other inputs"
                )
            draw = draw_augmentation(self.generator, x.shape[-2], x.shape[-1])
            if keep is None:
                # without weighting every sample takes part with weight 1 (the official code
                # has no such case: consistency without weighting refers to undefined names)
                x_sel, ref, w_sel = x, out, torch.ones(n, device=out.device)
            else:
                index = keep.nonzero().squeeze(1)  # the host synchronisation of the step
                x_sel, ref, w_sel = x[index], out[index], weights[index]  # type: ignore[index]
            out_aug = model(apply_augmentation(x_sel, draw))
            loss = loss + (symmetric_cross_entropy(out_aug, ref) * w_sel).sum() / n
        return loss

    def step(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        optimizer = self.optimizer
        assert optimizer is not None, "convert() must run first"
        out = None
        with torch.enable_grad():
            for _ in range(int(self.hparams.steps)):
                out = model(x)
                descend(optimizer, self._loss(model, x, out))
                # ensemble the fp32 masters (the parameters themselves for fp32 models) and
                # write them back into half-precision parameters
                weight_ensemble_(optimizer.masters, self.source_params, self.hparams.momentum_src)
                with torch.no_grad():
                    copies = [(p, m) for p, m in zip(optimizer.params, optimizer.masters) if p is not m]
                    if copies:
                        torch._foreach_copy_([p for p, _ in copies], [m for _, m in copies])
        out = out.detach()  # type: ignore[union-attr]
        return prior_correction(out) if self.hparams.prior_correction else out

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = super().predict(model, x)
        return prior_correction(out) if self.hparams.prior_correction else out

