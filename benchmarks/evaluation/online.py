"""Online (predict-then-adapt) evaluation of a model on a stream (docs/METHODS.md §1, §9.4).

Each batch is given to the model exactly once; the output of that call is the prediction
recorded for the batch. With a ``tta.Adapted`` model this is the forward that also adapts
(TENT/SAR: logits from before the parameter step; LAME: the refined output), which is the
official protocol. Any callable ``model(x) -> logits`` works; if it has a ``reset()`` (or one
is passed), it is called before every batch flagged ``reset``. A model without ``reset`` is
taken to be stateless, and reset flags are ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from benchmarks.evaluation.checkpoint import StreamCheckpoint
from benchmarks.evaluation.compute_budget import ComputeBudget
from benchmarks.evaluation.metrics import DEFAULT_ECE_BINS
from benchmarks.evaluation.multi_stream import Model, evaluate_multi_stream
from benchmarks.evaluation.results import EvalResult
from benchmarks.streams.stream import Batch


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
    budget: ComputeBudget | None = None,
) -> EvalResult:
    """Run ``model`` online over ``stream`` and measure it: the one-stream case of
    :func:`benchmarks.evaluation.evaluate_multi_stream`.

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
        budget: compute-aware evaluation (:class:`~benchmarks.evaluation.ComputeBudget`).
    """
    (result,) = evaluate_multi_stream(
        model, [stream], reset=reset, window=window, n_bins=n_bins, progress=progress, names=[name],
        device=device, checkpoint=checkpoint, budget=budget,
    )
    if config is not None:
        result.config = config
    return result
