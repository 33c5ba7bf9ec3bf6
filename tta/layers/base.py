"""Base class of the normalization layers that replace a model's BatchNorm at test time."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class SourceNormState:
    """What a replacement layer inherits from the normalization layer it replaces."""

    num_features: int
    eps: float
    momentum: float
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    source_type: str  # qualified class name of the replaced layer, for repr and errors
    input_kind: str  # "1d", "2d" or "3d": which BatchNorm flavour it was


class AdaptiveNorm(nn.Module):
    """A normalization layer whose statistics adapt online.

    Subclasses implement :meth:`forward` with the helpers of :mod:`tta.layers.stats` and
    report new statistics through :meth:`propose_update` instead of writing buffers directly.
    The :class:`tta.Adapted` wrapper then commits them once the whole step succeeded, so

    * an exception anywhere in the model (bad input shape, a failing later layer) leaves every
      layer's state as it was;
    * only the first forward of a step updates statistics (a method that forwards twice per
      batch, such as SAR, does not update twice; the prediction forward is the one that counts);
    * a stream whose proposed statistics are not finite (NaN/Inf in its batch) keeps its old
      state, checked on the device without a host synchronisation;
    * ``adapting = False`` (``Adapted.no_adapt()``) gives the same prediction with no update.

    All stateful buffers carry a leading stream dimension S (``num_streams``) so S independent
    streams can run through one batched forward.
    """

    def __init__(self, source: SourceNormState, num_streams: int = 1) -> None:
        super().__init__()
        if num_streams < 1:
            raise ValueError(f"num_streams must be >= 1, got {num_streams}")
        self.num_features = source.num_features
        self.eps = float(source.eps)
        self.source_momentum = float(source.momentum)
        self.num_streams = int(num_streams)
        self.source_type = source.source_type
        self.input_kind = source.input_kind
        if source.weight is not None:
            self.weight = nn.Parameter(source.weight.detach().clone())
        else:
            self.register_parameter("weight", None)
        if source.bias is not None:
            self.bias = nn.Parameter(source.bias.detach().clone())
        else:
            self.register_parameter("bias", None)
        if source.running_mean is not None and source.running_var is not None:
            self.register_buffer("source_mean", source.running_mean.detach().float().clone())
            self.register_buffer("source_var", source.running_var.detach().float().clone())
        else:
            self.register_buffer("source_mean", None)
            self.register_buffer("source_var", None)
        self.adapting = True
        self._pending: dict[str, torch.Tensor] | None = None

    # -- statistics state ------------------------------------------------------------------
    def require_source_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.source_mean is None or self.source_var is None:
            raise ValueError(
                f"{type(self).__name__} needs the source running statistics, but the replaced "
                f"{self.source_type} was built with track_running_stats=False"
            )
        return self.source_mean, self.source_var

    @property
    def wants_update(self) -> bool:
        """False when no update would be kept (not adapting, or one is already staged)."""
        return self.adapting and self._pending is None

    def propose_update(self, **new_state: torch.Tensor) -> None:
        """Stage new values of stateful buffers (each with a leading stream dim)."""
        if not self.wants_update:
            return
        self._pending = {name: value.detach() for name, value in new_state.items()}

    def commit(self) -> None:
        """Write the staged update; streams with non-finite statistics keep their state."""
        pending, self._pending = self._pending, None
        if not pending:
            return
        with torch.no_grad():
            finite = None
            for value in pending.values():
                ok = torch.isfinite(value).flatten(1).all(1)
                finite = ok if finite is None else finite & ok
            for name, value in pending.items():
                buffer = getattr(self, name)
                keep = finite.view(-1, *([1] * (value.dim() - 1)))
                buffer.copy_(torch.where(keep, value.to(buffer.dtype), buffer))

    def discard(self) -> None:
        self._pending = None

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (N, {self.num_features}, ...), "
                f"got {tuple(x.shape)}"
            )
        if x.shape[0] % self.num_streams:
            raise ValueError(
                f"batch of {x.shape[0]} rows cannot be split into {self.num_streams} equal streams"
            )

    def extra_repr(self) -> str:
        streams = f", num_streams={self.num_streams}" if self.num_streams > 1 else ""
        return f"{self.num_features}, eps={self.eps}{streams}, replaces={self.source_type}"


class NormAct(nn.Module):
    """Normalization followed by the drop/activation of a fused layer (timm ``BatchNormAct2d``)."""

    def __init__(self, norm: nn.Module, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self.norm(x)))
