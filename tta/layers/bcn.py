"""Batch-Channel Normalization (Qiao et al., "Micro-Batch Training with Batch-Channel
Normalization and Weight Standardization", arXiv 1903.10520, §4; the same authors' "Rethinking
Normalization and Elimination Singularity in Neural Networks", arXiv 1911.09738).

Spec: docs/METHODS.md §7. Three pieces:

* :class:`BatchChannelNorm2d`, the training layer (also what a trained model holds);
* :class:`TestTimeBatchChannelNorm`, the statistics layer ``tta.adapt(model, "bcn")`` swaps in:
  it keeps updating the estimated batch-stage statistics on the test stream, through the
  wrapper's deferred commit (:class:`tta.layers.base.AdaptiveNorm`);
* :func:`convert_to_bcn_ws`, which swaps a model's BatchNorm layers for BCN and the
  convolutions feeding a normalization layer for :class:`tta.layers.ws.WSConv2d`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tta.layers.base import AdaptiveNorm, NormAct, SourceNormState
from tta.layers.stats import normalize, stream_stats
from tta.layers.ws import WSConv2d

#: default EstBN moving speed r. UNVERIFIED (docs/METHODS.md §7): the official buffer starts at 0 and is
#: set by a training script that is not public; one third-party copy fixes r = 0.01.
DEFAULT_MOVING_SPEED = 0.01


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _channel_view(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return values.view(1, -1, *([1] * (x.dim() - 2)))


def estimated_stats_update(
    x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, r: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """EstBN's update of the estimates ``(mean, var)`` (shape ``(C,)``) from a batch ``x``.

    ``m_c`` = batch mean; ``v_c`` = mean over (B, *spatial) of ``(z - mean_old_c)^2``, the
    deviation from the *old* estimate (official code), which equals the biased batch variance
    plus ``(m_c - mean_old_c)^2``. Then ``mean <- (1 - r) mean + r m``,
    ``var <- (1 - r) var + r v``. No gradient; float32 (or the estimates' dtype).
    """
    with torch.no_grad():
        batch_var, batch_mean = torch.var_mean(x.detach().to(mean.dtype), dim=_reduce_dims(x), correction=0)
        deviation = batch_var + (batch_mean - mean).square()
        r = torch.as_tensor(r, dtype=mean.dtype, device=mean.device)
        return torch.lerp(mean, batch_mean, r), torch.lerp(var, deviation, r)


def _expand_groups(values: torch.Tensor, num_channels: int) -> torch.Tensor:
    return values.repeat_interleave(num_channels // values.numel())


class BatchChannelNorm2d(nn.Module):
    """BCN: a batch-normalization stage, then a channel (group) normalization stage.

    ``BCN(z) = GroupAffine(GroupNorm_noaffine(ChannelAffine(BatchStage(z))))``:

    1. batch stage, per channel c with affine ``weight_c, bias_c``:

       * ``estimated_stats=False`` (large batches): BatchNorm semantics, i.e. batch
         statistics in training (running averages with ``momentum``), running statistics in
         eval mode;
       * ``estimated_stats=True`` (micro-batches, the official ``EstBN``): normalization
         *always* uses the estimates ``mu^_c, sigma^2_c``; in training mode they are first
         moved towards the batch (:func:`estimated_stats_update`, rate ``moving_speed`` r, no
         gradient) and the batch is normalized with the updated estimates, as in the official
         code. Gradients do not flow through the estimates. ``batch_eps`` is fixed at 1e-5
         in the official EstBN.
    2. group stage: for each sample and each of the G groups, normalize its ``(C/G) * H * W``
       values (biased variance, ``eps``);
    3. per-*group* affine ``group_weight_g, group_bias_g`` (one scalar pair per group, the
       official shape (1, G, 1)), broadcast over the group's channels and positions.

    ``moving_speed`` is a buffer (a scalar tensor) so a training schedule can change it, as the
    official ``estbn_moving_speed`` buffer; it is read on the device (no host sync).
    Works for any input ``(N, C, *spatial)``, also for the ``(N, C)`` input of a BN1d slot.
    """

    def __init__(
        self,
        num_channels: int,
        num_groups: int = 32,
        eps: float = 1e-5,
        *,
        estimated_stats: bool = False,
        momentum: float | None = 0.1,
        moving_speed: float = DEFAULT_MOVING_SPEED,
        batch_eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_groups < 1 or num_channels % num_groups:
            raise ValueError(f"num_groups={num_groups} must divide num_channels={num_channels}")
        if not 0.0 <= moving_speed <= 1.0:
            raise ValueError(f"moving_speed must lie in [0, 1], got {moving_speed}")
        factory = {"device": device, "dtype": dtype}
        self.num_channels = int(num_channels)
        self.num_groups = int(num_groups)
        self.eps = float(eps)
        self.batch_eps = float(batch_eps)
        self.momentum = momentum
        self.estimated_stats = bool(estimated_stats)
        self.weight = nn.Parameter(torch.ones(num_channels, **factory))
        self.bias = nn.Parameter(torch.zeros(num_channels, **factory))
        self.group_weight = nn.Parameter(torch.ones(num_groups, **factory))
        self.group_bias = nn.Parameter(torch.zeros(num_groups, **factory))
        self.register_buffer("running_mean", torch.zeros(num_channels, device=device))
        self.register_buffer("running_var", torch.ones(num_channels, device=device))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        if self.estimated_stats:
            self.register_buffer("moving_speed", torch.tensor(float(moving_speed), device=device))
        else:
            self.register_buffer("moving_speed", None)

    def batch_stage(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(
                f"BatchChannelNorm2d expects input of shape (N, {self.num_channels}, ...), got {tuple(x.shape)}"
            )
        if self.estimated_stats:
            mean, var = self.running_mean, self.running_var
            if self.training:
                new_mean, new_var = estimated_stats_update(x, mean, var, self.moving_speed)
                with torch.no_grad():
                    self.running_mean.copy_(new_mean)
                    self.running_var.copy_(new_var)
                    self.num_batches_tracked.add_(1)
                # normalize with fresh tensors: a later in-place update of the buffers must not
                # invalidate this forward's autograd graph (e.g. two forwards, one backward)
                mean, var = new_mean, new_var
            return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.batch_eps)
        momentum = self.momentum
        if self.training:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average, as nn.BatchNorm2d
                momentum = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias,
            self.training, momentum or 0.0, self.batch_eps,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.batch_stage(x)
        weight = _expand_groups(self.group_weight, self.num_channels)
        bias = _expand_groups(self.group_bias, self.num_channels)
        return F.group_norm(out, self.num_groups, weight, bias, self.eps)

    def extra_repr(self) -> str:
        stage = (
            f"estimated_stats=True, moving_speed={float(self.moving_speed):g}"
            if self.estimated_stats
            else f"momentum={self.momentum}"
        )
        return f"{self.num_channels}, num_groups={self.num_groups}, eps={self.eps}, {stage}"


class TestTimeBatchChannelNorm(AdaptiveNorm):
    """BCN at test time with the EstBN update of its batch-stage statistics on the stream.

    Built from a trained :class:`BatchChannelNorm2d` (either batch-stage flavour): the
    estimates start from its running statistics, its channel affine becomes ``weight/bias``
    and its group affine ``group_weight/group_bias`` (both trainable by an objective method
    composed on top, e.g. ``"bcn+tent"``). Per forward, for each stream:

    1. ``mean', var' = EstBN update`` of the estimates with rate ``moving_speed`` r
       (:func:`estimated_stats_update`);
    2. normalize with ``mean', var'`` (the updated estimates, as EstBN's training forward);
    3. group stage and group affine as :class:`BatchChannelNorm2d`.

    The update is staged with :meth:`propose_update` and committed by :class:`tta.Adapted`
    after a successful step (only the step's first forward; not under ``no_adapt``; a
    stream whose batch holds NaN/Inf keeps its estimates). Train/eval mode is ignored.
    """

    __test__ = False

    def __init__(self, layer: BatchChannelNorm2d, moving_speed: float | None = None, num_streams: int = 1) -> None:
        source = SourceNormState(
            num_features=layer.num_channels,
            eps=layer.batch_eps,
            momentum=float(layer.momentum) if layer.momentum is not None else 0.1,
            weight=layer.weight.detach(),
            bias=layer.bias.detach(),
            running_mean=layer.running_mean.detach(),
            running_var=layer.running_var.detach(),
            source_type=f"{type(layer).__module__}.{type(layer).__qualname__}",
            input_kind="2d",
        )
        super().__init__(source, num_streams)
        if moving_speed is None:
            if layer.estimated_stats:
                moving_speed = float(layer.moving_speed)
            else:
                moving_speed = self.source_momentum
        if not 0.0 <= moving_speed <= 1.0:
            raise ValueError(f"moving_speed must lie in [0, 1], got {moving_speed}")
        self.moving_speed = float(moving_speed)
        self.num_groups = layer.num_groups
        self.group_eps = layer.eps
        self.group_weight = nn.Parameter(layer.group_weight.detach().clone())
        self.group_bias = nn.Parameter(layer.group_bias.detach().clone())
        source_mean, source_var = self.require_source_stats()
        self.register_buffer("estimated_mean", source_mean.expand(num_streams, -1).clone())
        self.register_buffer("estimated_var", source_var.expand(num_streams, -1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        with torch.no_grad():
            batch_mean, batch_var = stream_stats(x, self.num_streams)  # (S, C) fp32, biased
            old_mean, old_var = self.estimated_mean, self.estimated_var
            deviation = batch_var + (batch_mean - old_mean).square()
            mean = torch.lerp(old_mean, batch_mean, self.moving_speed)
            var = torch.lerp(old_var, deviation, self.moving_speed)
        self.propose_update(estimated_mean=mean, estimated_var=var)
        out = normalize(x, mean, var, self.weight, self.bias, self.eps)
        weight = _expand_groups(self.group_weight, self.num_features)
        bias = _expand_groups(self.group_bias, self.num_features)
        return F.group_norm(out, self.num_groups, weight, bias, self.group_eps)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_groups={self.num_groups}, group_eps={self.group_eps}, "
            f"moving_speed={self.moving_speed:g}"
        )


def largest_divisor_at_most(n: int, limit: int) -> int:
    """The number of groups used for ``n`` channels when ``limit`` groups do not divide it."""
    for groups in range(min(n, limit), 0, -1):
        if n % groups == 0:
            return groups
    return 1


def _is_norm(module: nn.Module) -> bool:
    from tta.surgery import is_batch_norm

    return is_batch_norm(module) or isinstance(
        module, (nn.GroupNorm, nn.LayerNorm, BatchChannelNorm2d, AdaptiveNorm)
    )


def convs_followed_by_norm(model: nn.Module) -> list[str]:
    """Names of the ``nn.Conv2d`` layers whose next layer is a normalization layer.

    "Next" is the next leaf module in registration order (``named_modules``), skipping
    ``nn.Identity``; normalization layers count as leaves (their children, e.g. the activation
    of timm's ``BatchNormAct2d``, are not visited). This matches how torchvision and timm
    define blocks (``conv1, bn1, ...``, ``downsample = (conv, bn)``); a model that registers
    modules in an order unrelated to its forward needs ``standardize="all"`` or ``"none"``.
    """
    sequence: list[tuple[str, str]] = []
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skip):
            continue
        if _is_norm(module):
            sequence.append((name, "norm"))
            skip.append(name + ".")
        elif type(module) is nn.Conv2d:
            sequence.append((name, "conv"))
        elif isinstance(module, nn.Identity):
            continue
        elif next(module.children(), None) is None:
            sequence.append((name, "other"))
    return [
        name for (name, kind), (_, next_kind) in zip(sequence, sequence[1:]) if kind == "conv" and next_kind == "norm"
    ]


def _bcn_from_bn(
    module: nn.Module,
    num_groups: int,
    estimated_stats: bool,
    eps: float,
    momentum: float | None,
    moving_speed: float,
    keep_statistics: bool,
) -> BatchChannelNorm2d:
    from tta.surgery import source_state

    state = source_state(module)
    channels = state.num_features
    device = state.running_mean.device if state.running_mean is not None else None
    dtype = state.weight.dtype if state.weight is not None else None
    layer = BatchChannelNorm2d(
        channels,
        largest_divisor_at_most(channels, num_groups),
        eps,
        estimated_stats=estimated_stats,
        momentum=state.momentum if momentum is None else momentum,
        moving_speed=moving_speed,
        device=device,
        dtype=dtype,
    )
    if keep_statistics:
        with torch.no_grad():
            if state.weight is not None:
                layer.weight.copy_(state.weight)
            if state.bias is not None:
                layer.bias.copy_(state.bias)
            if state.running_mean is not None and state.running_var is not None:
                layer.running_mean.copy_(state.running_mean)
                layer.running_var.copy_(state.running_var)
    layer.train(module.training)
    return layer


def convert_to_bcn_ws(
    model: nn.Module,
    num_groups: int = 32,
    estimated_stats: bool = False,
    *,
    eps: float = 1e-5,
    momentum: float | None = None,
    moving_speed: float = DEFAULT_MOVING_SPEED,
    keep_statistics: bool = True,
    standardize: str = "followed_by_norm",
    ws_eps: float = 1e-5,
    eps_inside_sqrt: bool = True,
) -> nn.Module:
    """Swap a model's BatchNorm layers for :class:`BatchChannelNorm2d` and its convolutions
    for :class:`tta.layers.ws.WSConv2d`, in place; returns the model (a new module only when
    the model itself is a BatchNorm layer).

    Args:
        model: any model; every 2-D BatchNorm flavour that :mod:`tta.surgery` knows
            (``BatchNorm2d``, ``SyncBatchNorm``, frozen BN, timm ``BatchNormAct2d`` whose
            drop/activation are kept) is replaced. ``BatchNorm1d/3d`` are left alone.
        num_groups: G of the group stage (official: 32). A layer whose channel count G does
            not divide gets the largest divisor of its channel count below G.
        estimated_stats: micro-batch BCN (EstBN batch stage) instead of BatchNorm semantics.
        eps: epsilon of the group stage.
        momentum: BatchNorm momentum of the batch stage; None keeps each replaced layer's.
        moving_speed: EstBN rate r (UNVERIFIED default, see :data:`DEFAULT_MOVING_SPEED`).
        keep_statistics: start the batch stage from the replaced layer's affine and running
            statistics (default); otherwise from the identity (fresh training).
        standardize: which ``nn.Conv2d`` (exact type; subclasses with their own forward are
            left alone) become WS convolutions: ``"followed_by_norm"`` (the papers' advice;
            see :func:`convs_followed_by_norm`), ``"all"`` or ``"none"``.
        ws_eps, eps_inside_sqrt: see :class:`tta.layers.ws.WSConv2d`.

    Weight standardization changes what a pretrained convolution computes, so a converted
    pretrained model must be (re)trained; outputs stay finite.
    """
    from tta.surgery import is_batch_norm, replace_modules

    if standardize not in ("followed_by_norm", "all", "none"):
        raise ValueError(f"standardize must be 'followed_by_norm', 'all' or 'none', got {standardize!r}")

    def is_2d_bn(module: nn.Module) -> bool:
        return is_batch_norm(module) and not isinstance(module, (nn.BatchNorm1d, nn.BatchNorm3d))

    def build_bcn(module: nn.Module) -> nn.Module:
        layer = _bcn_from_bn(module, num_groups, estimated_stats, eps, momentum, moving_speed, keep_statistics)
        if "Act" in type(module).__name__ and hasattr(module, "act") and hasattr(module, "drop"):
            return NormAct(layer, module.drop, module.act)
        return layer

    if is_2d_bn(model):
        return build_bcn(model)
    if standardize == "followed_by_norm":
        ws_names = set(convs_followed_by_norm(model))
    elif standardize == "all":
        ws_names = {name for name, module in model.named_modules() if type(module) is nn.Conv2d}
    else:
        ws_names = set()
    replace_modules(
        model,
        lambda name, module: name in ws_names,
        lambda name, module: WSConv2d.from_conv(module, ws_eps=ws_eps, eps_inside_sqrt=eps_inside_sqrt),
    )
    replace_modules(model, lambda name, module: is_2d_bn(module), lambda name, module: build_bcn(module))
    return model
