"""Online evaluation of S streams through one model call per step (S = 1: :func:`evaluate`).

At step k the k-th batches of the S streams are concatenated in stream-major order (rows
``s*B:(s+1)*B`` belong to stream s) and passed to a model built with
``tta.adapt(model, method, num_streams=S)``, whose statistics layers keep S separate states;
the output is split back per stream. For statistics methods this gives, per stream, the
results of S separate runs while running the S streams in parallel (e.g. the 15 corruptions
of the reset-each-shift protocol; see :func:`benchmarks.streams.split_by_domain`).

Equal batch sizes are a hard requirement of the stream-major layout. The streams must
therefore share their batch schedule: the same number of batches, the same size at every
step (the last, partial batch of a segment included) and resets at the same steps. This
holds for the per-domain streams of one config (same ``n_examples``, ``replays`` and
``batch_size``); anything else is rejected up front rather than padded, because padding
would change batch statistics and so the predictions. A reset resets all S states at once,
which is why reset flags must coincide.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.evaluation.checkpoint import CheckpointMismatch, StreamCheckpoint
from benchmarks.evaluation.compute_budget import ComputeBudget
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


def check_aligned(streams: Sequence[Iterable[Batch]]) -> None:
    """Raise ``ValueError`` unless the streams have identical batch sizes and reset steps.

    Streams that cannot report their schedule up front (plain iterables) are checked step by
    step during evaluation instead.
    """
    if not streams:
        raise ValueError("need at least one stream")
    if not all(hasattr(s, "batch_sizes") and hasattr(s, "batch_resets") for s in streams):
        return
    sizes = [np.asarray(s.batch_sizes()) for s in streams]  # type: ignore[attr-defined]
    resets = [np.asarray(s.batch_resets()) for s in streams]  # type: ignore[attr-defined]
    for i in range(1, len(streams)):
        if not np.array_equal(sizes[0], sizes[i]):
            raise ValueError(
                f"stream {i} has a different batch schedule than stream 0 "
                f"({len(sizes[i])} vs {len(sizes[0])} batches); multi-stream evaluation needs "
                "equal batch sizes at every step (equal stream lengths and batch_size)"
            )
        if not np.array_equal(resets[0], resets[i]):
            raise ValueError(f"stream {i} resets at different steps than stream 0")


def _default_names(streams: Sequence[Iterable[Batch]]) -> list[str]:
    names = []
    for i, s in enumerate(streams):
        domains = tuple(getattr(s, "domains", ()))
        names.append(domains[0] if len(domains) == 1 else f"stream{i}")
    return names if len(set(names)) == len(names) else [f"stream{i}" for i in range(len(streams))]


def evaluate_multi_stream(
    model: Model,
    streams: Sequence[Iterable[Batch]],
    *,
    reset: Callable[[], Any] | None = None,
    window: int = 1000,
    n_bins: int = DEFAULT_ECE_BINS,
    progress: bool = True,
    names: Sequence[str] | None = None,
    device: torch.device | str | None = None,
    checkpoint: StreamCheckpoint | None = None,
    budget: ComputeBudget | None = None,
) -> list[EvalResult]:
    """Evaluate S aligned streams together; one :class:`EvalResult` per stream.

    Args:
        model: a model whose state is split over ``len(streams)`` sub-batches, e.g.
            ``tta.adapt(net, "norm", num_streams=S)``; if it has a ``num_streams`` attribute it
            must equal S.
        streams: S streams with the same batch schedule (see the module docstring).
        reset: called before steps flagged ``reset`` (all streams at once); defaults to
            ``model.reset``.
        window, n_bins, progress: as in :func:`benchmarks.evaluation.evaluate`.
        names: per-stream names (default: the stream's single domain, else ``stream<i>``).
        device: device for the memory measurement (defaults to the first stream's).
        checkpoint: as in :func:`benchmarks.evaluation.evaluate` (one checkpoint holds all
            S streams' records).
        budget: compute-aware evaluation (:mod:`benchmarks.evaluation.compute_budget`): the
            model adapts only on the batches its step time lets it reach and predicts the
            others without adapting (``model`` must then be a ``tta.Adapted``); None adapts
            on every batch.

    Timing and memory are of the joint loop; each result's ``num_streams`` is S and its
    images/s counts the images of all streams.
    """
    check_aligned(streams)
    num = len(streams)
    declared = getattr(model, "num_streams", None)
    if declared is not None and int(declared) != num:
        raise ValueError(f"model was built for num_streams={declared}, got {num} streams")
    names = list(names) if names is not None else _default_names(streams)
    if len(names) != num:
        raise ValueError(f"got {len(names)} names for {num} streams")
    dev = stream_device(streams[0], device)
    reset_fn = resolve_reset(model, reset)
    recorders = [OnlineRecorder() for _ in range(num)]
    totals = [getattr(s, "num_samples", None) for s in streams]
    total = sum(totals) if all(t is not None for t in totals) else None  # type: ignore[misc]
    model_seconds, earlier_seconds, position = 0.0, 0.0, 0
    resumed = resume_from(checkpoint, model)
    if resumed is not None:
        if len(resumed["recorders"]) != num:
            raise CheckpointMismatch(f"{checkpoint.path} holds {len(resumed['recorders'])} streams, this run has {num}")  # type: ignore[union-attr]
        for recorder, state in zip(recorders, resumed["recorders"]):
            recorder.load_state_dict(state, dev)
        position = int(resumed["position"])
        model_seconds, earlier_seconds = resumed["extra"]["model_seconds"], resumed["extra"]["seconds"]
        if budget is not None:
            budget.load_state_dict(resumed["extra"]["budget"])
    lengths = [len(s) if hasattr(s, "__len__") else None for s in streams]  # type: ignore[arg-type]
    num_steps = lengths[0] if all(n is not None for n in lengths) else None
    bar = tqdm(total=total, unit="img", desc=names[0] if num == 1 else f"{num} streams", disable=not progress)
    with PeakMemory(dev) as memory, bar:
        bar.update(sum(r.num_samples for r in recorders))
        start = time.perf_counter()
        steps = itertools.zip_longest(*(batches_from(s, position) for s in streams))
        for step, batches in enumerate(steps, start=position):
            _check_step(step, batches)
            if batches[0].reset and reset_fn is not None:
                reset_fn()
            size = len(batches[0])
            images = torch.cat([b.images for b in batches]) if num > 1 else batches[0].images
            tick = time.perf_counter()
            output = model(images) if budget is None else budget(model, images)
            synchronize(dev)
            model_seconds += time.perf_counter() - tick
            if output.ndim != 2 or output.shape[0] != size * num:
                raise ValueError(f"expected output of shape ({size * num}, C), got {tuple(output.shape)}")
            for recorder, part, batch in zip(recorders, output.split(size), batches):
                recorder.add(part, batch)
            bar.update(size * num)
            if checkpoint is not None and checkpoint.due(step + 1, num_steps):
                checkpoint.save(
                    model=model,  # type: ignore[arg-type]
                    position=step + 1,
                    recorders=[r.state_dict() for r in recorders],
                    extra={
                        "model_seconds": model_seconds, "seconds": earlier_seconds + time.perf_counter() - start,
                        **({"budget": budget.state_dict()} if budget is not None else {}),
                    },
                )
        synchronize(dev)
        seconds = earlier_seconds + time.perf_counter() - start
    return [
        EvalResult(
            name=name,
            domains=recorder.domains or tuple(getattr(stream, "domains", ())),
            records=recorder.finish(),
            seconds=seconds,
            model_seconds=model_seconds,
            peak_memory_mb=memory.peak_mb,
            peak_memory_kind=memory.kind,
            num_batches=recorder.num_batches,
            num_streams=num,
            window=window,
            n_bins=n_bins,
            config=stream_config(stream),
        )
        for name, recorder, stream in zip(names, recorders, streams)
    ]


def _check_step(step: int, batches: tuple[Batch | None, ...]) -> None:
    if any(b is None for b in batches):
        raise ValueError(f"streams end at different steps (step {step})")
    sizes = {len(b) for b in batches}  # type: ignore[arg-type]
    if len(sizes) != 1:
        raise ValueError(f"unequal batch sizes {sorted(sizes)} at step {step}")
    if len({b.reset for b in batches}) != 1:  # type: ignore[union-attr]
        raise ValueError(f"streams disagree on resetting at step {step}")
