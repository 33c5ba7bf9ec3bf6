"""Online (predict-then-adapt) evaluation of a model on a stream (ALGORITHMS.md §1, §9.4).

Each batch is given to the model exactly once; the output of that call is the prediction
recorded for the batch. With a ``tta.Adapted`` model this is the forward that also adapts
(TENT/SAR: logits from before the parameter step; LAME: the refined output), which is the
official protocol. Any callable ``model(x) -> logits`` works; if it has a ``reset()`` (or one
is passed), it is called before every batch flagged ``reset``. A model without ``reset`` is
taken to be stateless, and reset flags are ignored.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from tqdm import tqdm

from benchmarks.evaluation.checkpoint import StreamCheckpoint
from benchmarks.evaluation.memory import PeakMemory, synchronize
from benchmarks.evaluation.metrics import DEFAULT_ECE_BINS
from benchmarks.evaluation.recorder import OnlineRecorder
from benchmarks.evaluation.results import EvalResult
from benchmarks.streams.stream import Batch

Model = Callable[[torch.Tensor], torch.Tensor]


def resolve_reset(model: Model, reset: Callable[[], Any] | None) -> Callable[[], Any] | None:
    """The reset to call on flagged batches: the explicit one, else ``model.reset``."""
    if reset is not None:
        return reset
    candidate = getattr(model, "reset", None)
    return candidate if callable(candidate) else None


def batches_from(stream: Iterable[Batch], position: int) -> Iterator[Batch]:
    """The stream's batches from index ``position`` on (random access where the stream has it)."""
    if position == 0:
        yield from stream
    elif hasattr(stream, "batch") and hasattr(stream, "__len__"):
        for index in range(position, len(stream)):  # type: ignore[arg-type]
            yield stream.batch(index)  # type: ignore[attr-defined]
    else:  # a plain iterable: rebuild and skip the batches already evaluated
        yield from itertools.islice(stream, position, None)


def resume_from(checkpoint: StreamCheckpoint | None, model: Model) -> dict[str, Any] | None:
    """Restore ``model`` and the RNGs from ``checkpoint`` when it holds a run to continue."""
    if checkpoint is None:
        return None
    if not isinstance(model, torch.nn.Module):
        raise TypeError("a checkpointed evaluation needs a model with a state_dict (an nn.Module such as tta.Adapted)")
    payload = checkpoint.load()
    if payload is not None:
        checkpoint.restore(payload, model)
    return payload


def stream_device(stream: Iterable[Batch], device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device(getattr(stream, "device", "cpu"))


def stream_config(stream: Iterable[Batch]) -> dict[str, Any]:
    describe = getattr(stream, "describe", None)
    return describe() if callable(describe) else {}


def evaluate(
    model: Model,
    stream: Iterable[Batch],
    *,
    reset: Callable[[], Any] | None = None,
    window: int = 1000,
    n_bins: int = DEFAULT_ECE_BINS,
    progress: bool = True,
    name: str = "stream",
    device: torch.device | str | None = None,
    config: dict[str, Any] | None = None,
    checkpoint: StreamCheckpoint | None = None,
) -> EvalResult:
    """Run ``model`` online over ``stream`` and measure it.

    Args:
        model: ``model(x) -> (B, C)`` logits (or log-probabilities); adapts as a side effect.
        stream: a :class:`benchmarks.streams.Stream` or any iterable of ``Batch``.
        reset: called before batches flagged ``reset``; defaults to ``model.reset``.
        window: samples per time window of the windowed error.
        n_bins: ECE bins (15 by default).
        progress: show a tqdm progress bar (images).
        name: the stream's name in the result table.
        device: device for the memory measurement (defaults to ``stream.device``).
        config: resolved configuration stored with the result (defaults to
            ``stream.describe()``).
        checkpoint: write a resumable checkpoint every ``checkpoint.every`` batches and, when
            one of the same fingerprint exists, continue from it (``model`` must then be an
            ``nn.Module``, e.g. ``tta.Adapted``); the result equals an uninterrupted run's.
    """
    dev = stream_device(stream, device)
    reset_fn = resolve_reset(model, reset)
    recorder = OnlineRecorder()
    total = getattr(stream, "num_samples", None)
    model_seconds, earlier_seconds, position = 0.0, 0.0, 0
    resumed = resume_from(checkpoint, model)
    if resumed is not None:
        recorder.load_state_dict(resumed["recorders"][0], dev)
        position = int(resumed["position"])
        model_seconds, earlier_seconds = resumed["extra"]["model_seconds"], resumed["extra"]["seconds"]
    num_batches = len(stream) if hasattr(stream, "__len__") else None  # type: ignore[arg-type]
    with PeakMemory(dev) as memory, tqdm(total=total, unit="img", desc=name, disable=not progress) as bar:
        bar.update(recorder.num_samples)
        start = time.perf_counter()
        for batch in batches_from(stream, position):
            if batch.reset and reset_fn is not None:
                reset_fn()
            tick = time.perf_counter()
            output = model(batch.images)
            synchronize(dev)
            model_seconds += time.perf_counter() - tick
            recorder.add(output, batch)
            bar.update(len(batch))
            position += 1
            if checkpoint is not None and checkpoint.due(position, num_batches):
                checkpoint.save(
                    model=model,  # type: ignore[arg-type]
                    position=position,
                    recorders=[recorder.state_dict()],
                    extra={"model_seconds": model_seconds, "seconds": earlier_seconds + time.perf_counter() - start},
                )
        synchronize(dev)
        seconds = earlier_seconds + time.perf_counter() - start
    records = recorder.finish()
    return EvalResult(
        name=name,
        domains=recorder.domains or tuple(getattr(stream, "domains", ())),
        records=records,
        seconds=seconds,
        model_seconds=model_seconds,
        peak_memory_mb=memory.peak_mb,
        peak_memory_kind=memory.kind,
        num_batches=recorder.num_batches,
        window=window,
        n_bins=n_bins,
        config=config if config is not None else stream_config(stream),
    )
