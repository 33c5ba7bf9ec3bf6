"""Base class of the normalization layers that replace a model's BatchNorm at test time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

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

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """``.half()``/``.to(dtype)`` convert the affine parameters like any layer's, but the
        statistics buffers stay float32 (they only move to the new device)."""
        floating = {name: b for name, b in self._buffers.items() if b is not None and b.dtype == torch.float32}
        result = super()._apply(fn, recurse)
        for name, before in floating.items():
            after = self._buffers[name]
            if after is not None and after.dtype != torch.float32:
                self._buffers[name] = before.to(after.device)
        return result

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

    def commit(self, stream_ok: torch.Tensor | None = None) -> None:
        """Write the staged update; streams with non-finite statistics keep their state, and
        so do streams where ``stream_ok`` (bool, one per stream) is False.

        One finiteness test over all staged values (per stream), then one ``torch.where``
        per buffer written in place: no host synchronisation, ~2 + n_buffers kernels.
        """
        pending, self._pending = self._pending, None
        if not pending:
            return
        with torch.no_grad():
            values = list(pending.values())
            flat = values[0].flatten(1) if len(values) == 1 else torch.cat([v.flatten(1) for v in values], 1)
            finite = torch.isfinite(flat).all(1)
            if stream_ok is not None:
                finite = finite & stream_ok.to(finite.device)
            for name, value in pending.items():
                buffer = getattr(self, name)
                keep = finite.view(-1, *([1] * (value.dim() - 1)))
                if value.dtype == buffer.dtype and value.shape == buffer.shape:
                    torch.where(keep, value, buffer, out=buffer)
                else:
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


#: device-resident segment indices of the batched commit, keyed by (device, per-layer
#: lengths, streams): built once, so a step never copies host data to the device (a blocking
#: copy on CUDA)
_SEGMENTS: dict[tuple[str, tuple[int, ...], int], tuple[torch.Tensor, torch.Tensor]] = {}


def _segments(device: torch.device, lengths: tuple[int, ...], streams: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, ends)``: the layer of every staged element ``(S, total)`` and the index of each
    layer's last element ``(S, L)``."""
    key = (str(device), lengths, streams)
    found = _SEGMENTS.get(key)
    if found is None:
        if len(_SEGMENTS) > 64:
            _SEGMENTS.clear()
        sizes = torch.tensor(lengths)
        ids = torch.repeat_interleave(torch.arange(len(lengths)), sizes)
        ends = sizes.cumsum(0) - 1
        found = (ids.to(device).expand(streams, -1).contiguous(), ends.to(device).expand(streams, -1).contiguous())
        _SEGMENTS[key] = found
    return found


def commit_layers(layers: Iterable[AdaptiveNorm], stream_ok: torch.Tensor | None = None) -> None:
    """Commit the staged updates of many layers (what :class:`tta.Adapted` calls per step).

    The same result as ``layer.commit(stream_ok)`` for every layer: a layer's stream keeps its
    state when any of that layer's staged values for that stream is non-finite, or where
    ``stream_ok`` (the wrapper passes whether each stream's input batch was finite) is False. On CUDA the layers
    are committed together with a constant number of kernels instead of about five per layer
    (:func:`_commit_batched`); on the CPU, where an operator costs microseconds and the
    batched form touches the state more often, one by one (measured: batching was neutral on
    a CIFAR ResNet-26 and 4% slower on a ResNet-50 with UnMix-TNS, K = 16).
    """
    staged = [layer for layer in layers if layer._pending]
    if len(staged) > 1 and _commit_batched(staged, only_device="cuda", stream_ok=stream_ok):
        return
    for layer in staged:
        layer.commit(stream_ok)


def _commit_batched(
    staged: list[AdaptiveNorm], only_device: str | None = None, stream_ok: torch.Tensor | None = None
) -> bool:
    """Commit the staged updates of ``staged`` together; False (nothing written) when they do
    not fit one layout (float32 buffers of equal stream count on one device, of type
    ``only_device`` when given).

    The staged values are concatenated per stream (``(S, total)``), tested for finiteness
    once, counted per layer with a cumulative sum read at each layer's last element (a
    scatter or ``torch.segment_reduce`` would contend on atomics or read lengths back to the
    host), selected against the current buffers with one ``torch.where`` and written back
    with one ``torch._foreach_copy_``. No host synchronisation.
    """
    first = next(iter(staged[0]._pending.values()))  # type: ignore[union-attr]
    streams, device = first.shape[0], first.device
    if only_device is not None and device.type != only_device:
        return False
    buffers: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    lengths: list[int] = []
    for layer in staged:
        count = 0
        for name, value in layer._pending.items():  # type: ignore[union-attr]
            buffer = getattr(layer, name)
            if (
                value.device != device
                or value.dtype != torch.float32
                or buffer.dtype != torch.float32
                or value.shape != buffer.shape
                or value.shape[0] != streams
                or not buffer.is_contiguous()
            ):
                return False
            buffers.append(buffer.view(streams, -1))
            values.append(value.reshape(streams, -1))
            count += values[-1].shape[1]
        lengths.append(count)
    ids, ends = _segments(device, tuple(lengths), streams)
    for layer in staged:
        layer._pending = None
    with torch.no_grad():
        new = torch.cat(values, 1)  # (S, total)
        bad = torch.isfinite(new).logical_not_().cumsum(1).gather(1, ends)  # (S, L) running count
        bad = bad - torch.nn.functional.pad(bad[:, :-1], (1, 0))  # non-finite count per layer
        keep = bad == 0  # (S, L)
        if stream_ok is not None:
            keep = keep & stream_ok.to(keep.device)[:, None]
        keep = keep.gather(1, ids)  # (S, total)
        new = torch.where(keep, new, torch.cat(buffers, 1))
        torch._foreach_copy_(buffers, list(new.split([b.shape[1] for b in buffers], dim=1)))
    return True
