"""The per-sample plan of a stream: which image, label, domain, severity at each position.

Planning is cheap (index arithmetic on NumPy arrays, no images touched), so the whole order of
a stream is known before the first batch is built; batches are then slices of the plan.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np

from benchmarks.streams.config import StreamConfig
from benchmarks.streams.label_order import segment_order
from benchmarks.streams.ccc import step_assignments
from benchmarks.streams.schedule import Segment, build_segments, walk_steps
from benchmarks.streams.sources import DomainSource


@dataclass(frozen=True)
class StreamPlan:
    """Per-sample arrays of a stream (all of length ``num_samples``), in stream order.

    Attributes:
        domains: the configured domain names; ``domain_id`` indexes into it.
        segments: the schedule's segments; ``segment_id`` indexes into it.
        keys: source cache keys; ``key_id`` indexes into it.
        segment_bounds: start offset of every segment, plus the total length.
        batch_bounds: start offset of every batch, plus the total length.
        labels, domain_id, severity, segment_id, key_id: per-sample values.
        base_index: row of the sample in its source arrays.
        sample_id: id of the sample's corruption draw: ``replay * n + base_index`` where ``n``
            is the number of rows used from the source (so each replay is a fresh draw while
            the same image in another domain or segment keeps its id).
    """

    domains: tuple[str, ...]
    segments: tuple[Segment, ...]
    keys: tuple[Hashable, ...]
    num_classes: int
    segment_bounds: np.ndarray
    batch_bounds: np.ndarray
    labels: np.ndarray
    domain_id: np.ndarray
    severity: np.ndarray
    segment_id: np.ndarray
    key_id: np.ndarray
    base_index: np.ndarray
    sample_id: np.ndarray

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_batches(self) -> int:
        return int(self.batch_bounds.shape[0] - 1)

    def batch_sizes(self) -> np.ndarray:
        return np.diff(self.batch_bounds)

    def recurrence(self) -> np.ndarray:
        """Per-sample visit of the schedule (0 unless the stream recurs)."""
        return np.array([s.recurrence for s in self.segments], dtype=np.int64)[self.segment_id]

    def batch_resets(self) -> np.ndarray:
        """Whether the method is reset before each batch (first batch of a resetting segment)."""
        resetting = np.array([s.reset for s in self.segments], dtype=bool)
        return np.isin(self.batch_bounds[:-1], self.segment_bounds[:-1][resetting])


def _derived_seed(*entropy: int) -> int:
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


def segment_seed(config: StreamConfig, index: int, segment: Segment) -> int:
    """The seed of one segment's sample order.

    ``config.seed`` for every segment of the first visit (every domain presents the same
    image order, as the official loaders reseed per domain), one derived from ``(seed,
    recurrence)`` for later visits of a recurring stream, and one derived from ``(seed,
    segment index)`` for the ``class_temporal`` order, whose official sampler draws every
    domain's slots afresh from one running generator.
    """
    if config.label_order == "class_temporal":
        return _derived_seed(config.seed, 1, index)
    if segment.recurrence == 0:
        return config.seed
    return _derived_seed(config.seed, 0, segment.recurrence)


def plan_stream(config: StreamConfig, source: DomainSource) -> StreamPlan:
    """Lay out every sample of ``config``'s stream in order (§9.2, §9.3).

    For each segment: pool the samples of its domain(s) (the first ``n_examples`` rows of
    each source, ``replays`` times), optionally keep a long-tailed subsample (global class
    imbalance), shuffle with a generator freshly seeded with ``config.seed`` (as the
    official loaders reseed per domain, so every domain presents the same image order),
    apply the label order (see :func:`benchmarks.streams.label_order.segment_order`), and
    cut into batches of ``batch_size`` (the last one of a segment may be smaller). The seed
    of each segment's order is :func:`segment_seed`.
    """
    segments = tuple(build_segments(config))
    keys: list[Hashable] = []
    key_index: dict[Hashable, int] = {}
    domain_index = {d: i for i, d in enumerate(config.domains)}
    num_classes: int | None = None
    fields = ("labels", "domain_id", "severity", "segment_id", "key_id", "base_index", "sample_id")
    columns: dict[str, list[np.ndarray]] = {name: [] for name in fields}
    segment_bounds = [0]
    batch_bounds = [0]
    walk = walk_steps(config) if config.schedule == "ccc" else []
    for seg_id, segment in enumerate(segments):
        if walk:
            step = walk[seg_id % len(walk)]
            key = source.key(step.current[0], step.current[1])
            if key not in key_index:
                key_index[key] = len(keys)
                keys.append(key)
            arrays = source.load(step.current[0], step.current[1])
            num_classes = arrays.num_classes
            rng = np.random.default_rng(np.random.SeedSequence([config.seed, 3, seg_id]))
            rows, following = step_assignments(step, config.walk_speed, len(arrays), rng)
            state_domain = np.array([domain_index[step.current[0]], domain_index[step.following[0]]])
            state_severity = np.array([step.current[1], step.following[1]])
            start = segment_bounds[-1]
            part = {
                "labels": arrays.labels[rows], "domain_id": state_domain[following.astype(int)],
                "severity": state_severity[following.astype(int)],
                "segment_id": np.full(len(rows), seg_id, dtype=np.int64),
                "key_id": np.full(len(rows), key_index[key], dtype=np.int64), "base_index": rows,
                "sample_id": np.arange(start, start + len(rows), dtype=np.int64),  # every position its own draw
            }
            for name in columns:
                columns[name].append(np.asarray(part[name], dtype=np.int64))
            stop = start + len(rows)
            batch_bounds.extend(range(start + config.batch_size, stop, config.batch_size))
            batch_bounds.append(stop)
            segment_bounds.append(stop)
            continue
        pool: dict[str, list[np.ndarray]] = {name: [] for name in columns}
        for domain in segment.domains:
            key = source.key(domain, segment.severity)
            if key not in key_index:
                key_index[key] = len(keys)
                keys.append(key)
            arrays = source.load(domain, segment.severity)
            if num_classes is None:
                num_classes = arrays.num_classes
            elif arrays.num_classes != num_classes:
                raise ValueError(
                    f"domain {domain!r} has {arrays.num_classes} classes, expected {num_classes}"
                )
            n = len(arrays) if config.n_examples is None else min(len(arrays), config.n_examples)
            if n == 0:
                raise ValueError(f"domain {domain!r} at severity {segment.severity} has no samples")
            virtual = np.arange(n * config.replays, dtype=np.int64)
            base = virtual % n
            pool["labels"].append(arrays.labels[base])
            pool["domain_id"].append(np.full(virtual.shape, domain_index[domain], dtype=np.int64))
            pool["severity"].append(np.full(virtual.shape, segment.severity, dtype=np.int64))
            pool["segment_id"].append(np.full(virtual.shape, seg_id, dtype=np.int64))
            pool["key_id"].append(np.full(virtual.shape, key_index[key], dtype=np.int64))
            pool["base_index"].append(base)
            pool["sample_id"].append(virtual)
        merged = {name: np.concatenate(parts) for name, parts in pool.items()}
        order = segment_order(
            merged["labels"],
            config.effective_label_order,
            segment_seed(config, seg_id, segment),
            num_classes=int(num_classes),  # type: ignore[arg-type]
            delta=config.delta,
            seeding=config.seeding,
            imbalance_factor=config.imbalance_factor,
            imbalance_order=config.imbalance_order,
            min_chunk_size=config.dirichlet_min_chunk,
            timeout_s=config.dirichlet_timeout_s,
        )
        if len(order) == 0:
            raise ValueError(f"segment {segment.name!r} keeps no samples (imbalance_factor={config.imbalance_factor})")
        for name in columns:
            columns[name].append(merged[name][order])
        start, stop = segment_bounds[-1], segment_bounds[-1] + len(order)
        batch_bounds.extend(range(start + config.batch_size, stop, config.batch_size))
        batch_bounds.append(stop)
        segment_bounds.append(stop)
    arrays_out = {name: np.concatenate(parts) for name, parts in columns.items()}
    return StreamPlan(
        domains=config.domains,
        segments=segments,
        keys=tuple(keys),
        num_classes=int(num_classes or 0),
        segment_bounds=np.asarray(segment_bounds, dtype=np.int64),
        batch_bounds=np.asarray(batch_bounds, dtype=np.int64),
        **arrays_out,
    )
