"""Labelled source data for the methods that read some at wrap time (``method.source_images``).

EATA's Fisher regularizer, PeTTA's source feature statistics and AdaNPC's initial memory are
computed from source data once, when the model is wrapped (each method names the
hyperparameter that takes it: ``Method.source_data_argument``). A config cannot hold a data
loader, so the app builds one: the first ``method.source_images`` clean images of the
dataset's *training* split, in an order drawn from the run's seed (so that a prefix is not
one class), with their labels, in batches of the stream's batch size on the run's device.
The test stream is drawn from the test split, so the two never share an image.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

SPLIT = "train"


def source_batches(stream: Any, count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` batches of ``count`` clean training images for ``stream`` (a
    ``StreamConfig``: dataset, data root, image size, batch size and device)."""
    from benchmarks.streams.sources import resolve_source

    train = stream.replace(split=SPLIT)
    clean = resolve_source(train).load(train.domains[0], train.severities[0])
    rows = np.random.default_rng(np.random.SeedSequence([seed, 3])).permutation(len(clean.labels))[:count]
    images = clean.to_tensor()[torch.as_tensor(rows)].to(stream.device)
    labels = torch.as_tensor(np.asarray(clean.labels)[rows], dtype=torch.int64).to(stream.device)
    size = int(stream.batch_size)
    return [(images[i : i + size], labels[i : i + size]) for i in range(0, len(rows), size)]


def source_data_argument(method_spec: Any) -> str:
    """The hyperparameter of ``method_spec``'s part that takes source data."""
    (argument,) = {part.source_data_argument for part in method_spec.parts if part.source_data_argument}
    return str(argument)
