"""Batched multi-stream evaluation vs sequential runs (the 15 corruptions, reset each shift).

The 15 single-domain streams of one config (``benchmarks.streams.build_domain_streams``,
CIFAR-sized random images corrupted on the device) are materialised once, so both sides do
the same evaluation work on the same batches and corruption generation (measured in its own
section) is not counted:

* sequential: ``benchmarks.evaluation.evaluate`` on each stream in turn with a
  ``num_streams=1`` model (reset before each stream);
* batched: ``benchmarks.evaluation.evaluate_multi_stream`` on all 15 streams with a
  ``num_streams=15`` model: one forward of 15 x B images per step.

Both are timed interleaved; the figure is sequential time / batched time.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

import tta
from benchmarks.perf.models import MODELS, build_model
from benchmarks.perf.timing import time_interleaved

GPU_TARGET_SPEEDUP = 5.0


@dataclass
class MultiStreamRow:
    device: str
    model: str
    method: str
    num_streams: int
    batch_size: int
    batches_per_stream: int
    status: str = "ok"
    sequential_seconds: float = float("nan")
    batched_seconds: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> int:
        return self.num_streams * self.batch_size * self.batches_per_stream

    @property
    def speedup(self) -> float:
        return self.sequential_seconds / self.batched_seconds

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            images=self.images,
            speedup=self.speedup,
            sequential_images_per_second=self.images / self.sequential_seconds,
            batched_images_per_second=self.images / self.batched_seconds,
        )
        return out


def _materialised_streams(device: torch.device, size: int, batch_size: int, batches: int) -> tuple[list[list[Any]], list[str]]:
    from benchmarks.corruptions import CORRUPTIONS
    from benchmarks.data.base import ImageArrays
    from benchmarks.streams import GeneratedSource, StreamConfig, build_domain_streams

    n = batch_size * batches
    rng = np.random.default_rng(0)
    low = rng.integers(0, 256, size=(n, size // 4, size // 4, 3), dtype=np.uint8)
    images = np.ascontiguousarray(low.repeat(4, axis=1).repeat(4, axis=2))
    arrays = ImageArrays(images, np.arange(n, dtype=np.int64) % 10, tuple(str(c) for c in range(10)))
    config = StreamConfig(
        dataset="perf", domains=tuple(CORRUPTIONS), severities=(5,), schedule="reset_each_shift",
        batch_size=batch_size, n_examples=n, device=str(device), image_size=size,
    )
    streams = build_domain_streams(config, GeneratedSource(arrays))
    return [list(stream) for stream in streams], list(CORRUPTIONS)


def measure_multistream(
    device: torch.device,
    *,
    model_name: str = "cifar_resnet26",
    methods: tuple[str, ...] = ("norm", "unmix_tns"),
    batch_size: int = 64,
    batches_per_stream: int = 3,
    repeats: int = 3,
    log: Callable[[str], None] = print,
) -> list[MultiStreamRow]:
    try:
        from benchmarks.evaluation import evaluate, evaluate_multi_stream
    except ImportError as error:
        log(f"  multi-stream evaluation not available: {error}")
        return []
    size = MODELS[model_name].size(device)
    try:
        lists, names = _materialised_streams(device, size, batch_size, batches_per_stream)
    except Exception as error:  # noqa: BLE001 - streams/corruptions may be missing
        log(f"  could not build the 15 corruption streams: {error!r}")
        return []
    num = len(lists)
    model = build_model(model_name, device, size)
    rows = []
    for method in methods:
        row = MultiStreamRow(str(device), model_name, method, num, batch_size, batches_per_stream)
        try:
            single = tta.adapt(copy.deepcopy(model), method)
            joint = tta.adapt(copy.deepcopy(model), method, num_streams=num)
        except ValueError as error:
            row.status = f"n/a: {error}"[:100]
            rows.append(row)
            continue

        def sequential() -> None:
            for stream, name in zip(lists, names):
                single.reset()
                evaluate(single, stream, progress=False, name=name, device=device)

        def batched() -> None:
            joint.reset()
            evaluate_multi_stream(joint, lists, progress=False, names=names, device=device)

        timings = time_interleaved(
            {"sequential": sequential, "batched": batched}, device, repeats=repeats, warmup=1, min_time=0.0
        )
        row.sequential_seconds = timings["sequential"].median
        row.batched_seconds = timings["batched"].median
        rows.append(row)
        log(
            f"  {row.device} {model_name} {method:<10} {num} streams x {batches_per_stream} batches of {batch_size}: "
            f"sequential {row.sequential_seconds:.2f} s, batched {row.batched_seconds:.2f} s, x{row.speedup:.2f}"
        )
    return rows
