"""Iterating a planned stream as batches of (corrupted) images on the stream's device."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from benchmarks.data.base import ImageArrays
from benchmarks.streams.config import CLEAN_DOMAINS, StreamConfig, split_by_domain
from benchmarks.streams.plan import StreamPlan, plan_stream
from benchmarks.streams.schedule import MIXED
from benchmarks.streams.sources import DomainSource, resolve_source

#: ``corrupt(images, name, severity, *, seed, sample_ids) -> images`` (benchmarks.corruptions).
CorruptFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Batch:
    """One batch of a stream.

    Attributes:
        images: float32 ``(B, 3, H, W)`` in [0, 1] on the stream's device.
        labels: int64 ``(B,)`` on the stream's device.
        domain: the batch's domain name, or ``"mixed"`` when it holds several domains (a
            batch of a mixed stream that happens to hold one domain is named after it).
        severity: severity of the batch's segment (every sample's, except in ``ccc`` streams,
            whose samples carry their own: ``Stream.plan.severity``).
        domain_ids: int64 ``(B,)`` on the CPU, per-sample index into ``domains``.
        domains: the stream's domain names.
        sample_ids: int64 ``(B,)`` on the CPU, per-sample corruption-draw ids.
        positions: int64 ``(B,)`` on the CPU, global positions of the samples in the stream.
        reset: the method must be reset before this batch (start of the stream, and every new
            domain in ``reset_each_shift``).
        index: the batch's index in the stream.
        segment: index of the stream segment the batch belongs to.
    """

    images: torch.Tensor
    labels: torch.Tensor
    domain: str
    severity: int
    domain_ids: torch.Tensor
    domains: tuple[str, ...]
    sample_ids: torch.Tensor
    positions: torch.Tensor
    reset: bool
    index: int
    segment: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class Stream:
    """A deterministic, re-iterable stream of :class:`Batch` es (§9.2-§9.3).

    With ``cache=True`` every built batch is kept (on the stream's device), so evaluating
    several methods on one stream corrupts the images once; it costs the stream's full
    image memory.

    Images are gathered from a device-resident uint8 copy of each source array and, for a
    generated source, corrupted batch-wise on the device with per-sample ids, so the
    corruption of a sample does not depend on the batch it lands in. Mixed batches are
    corrupted domain by domain (a loop over at most the number of domains, never over
    samples).
    """

    def __init__(
        self,
        config: StreamConfig,
        source: DomainSource | None = None,
        *,
        corrupt_fn: CorruptFn | None = None,
        cache: bool = False,
    ) -> None:
        self.config = config
        self.source = source if source is not None else resolve_source(config)
        self.plan: StreamPlan = plan_stream(config, self.source)
        self.device = torch.device(config.device)
        self._corrupt_fn = corrupt_fn
        self._device_images: dict[int, torch.Tensor] = {}
        self._cache: dict[int, Batch] | None = {} if cache else None
        self._resets = self.plan.batch_resets()
        # A (domain, severity) that loads each source key, to fetch its images lazily.
        keys, first = np.unique(self.plan.key_id, return_index=True)
        self._key_owner: dict[int, tuple[str, int]] = {
            int(k): (self.plan.domains[int(self.plan.domain_id[i])], int(self.plan.severity[i]))
            for k, i in zip(keys, first)
        }

    # -- sizes ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.plan.num_batches

    @property
    def num_samples(self) -> int:
        return self.plan.num_samples

    @property
    def num_classes(self) -> int:
        return self.plan.num_classes

    @property
    def domains(self) -> tuple[str, ...]:
        return self.plan.domains

    def batch_sizes(self) -> np.ndarray:
        return self.plan.batch_sizes()

    def batch_resets(self) -> np.ndarray:
        return self._resets.copy()

    # -- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        for index in range(len(self)):
            yield self.batch(index)

    def batch(self, index: int) -> Batch:
        """Build batch ``index`` (random access; the result depends only on the config)."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range for a stream of {len(self)} batches")
        if self._cache is None:
            return self._build(index)
        if index not in self._cache:
            self._cache[index] = self._build(index)
        cached = self._cache[index]
        # Hand out copies so a model that edits its input in place cannot alter the cache.
        return dataclasses.replace(cached, images=cached.images.clone(), labels=cached.labels.clone())

    def _build(self, index: int) -> Batch:
        plan = self.plan
        start, stop = int(plan.batch_bounds[index]), int(plan.batch_bounds[index + 1])
        rows = slice(start, stop)
        segment_id = int(plan.segment_id[start])
        segment = plan.segments[segment_id]
        domain_ids = plan.domain_id[rows]
        present = np.unique(domain_ids)
        images = self._images(
            domain_ids,
            plan.severity[rows],
            plan.key_id[rows],
            plan.base_index[rows],
            plan.sample_id[rows],
        )
        return Batch(
            images=images,
            labels=torch.from_numpy(plan.labels[rows].copy()).to(self.device),
            domain=plan.domains[int(present[0])] if len(present) == 1 else MIXED,
            severity=segment.severity,
            domain_ids=torch.from_numpy(domain_ids.copy()),
            domains=plan.domains,
            sample_ids=torch.from_numpy(plan.sample_id[rows].copy()),
            positions=torch.arange(start, stop, dtype=torch.int64),
            reset=bool(self._resets[index]),
            index=index,
            segment=segment_id,
        )

    # -- image assembly ------------------------------------------------------------------------
    def _images(
        self,
        domain_ids: np.ndarray,
        severities: np.ndarray,
        key_ids: np.ndarray,
        base_index: np.ndarray,
        sample_ids: np.ndarray,
    ) -> torch.Tensor:
        """Gather the batch (one gather per source key), then corrupt it per (domain,
        severity) group.

        A generated source has a single key, so even a mixed batch is gathered at once and
        only the corruption runs per group (a loop over the groups present, at most domains x
        severities, never over samples). Segments hold one severity except in ``ccc`` streams.
        """
        keys = np.unique(key_ids)
        if len(keys) == 1:
            images = self._gather(int(keys[0]), base_index)
        else:
            images = None
            for key in keys:
                rows = np.flatnonzero(key_ids == key)
                part = self._gather(int(key), base_index[rows])
                if images is None:
                    images = part.new_empty((len(key_ids), *part.shape[1:]))
                images[self._device_rows(rows)] = part
            assert images is not None
        if not self.source.on_the_fly:
            return images
        groups = np.unique(np.stack([domain_ids, severities], axis=1), axis=0)
        for domain_id, severity in groups:
            domain = self.plan.domains[int(domain_id)]
            if domain in CLEAN_DOMAINS:
                continue
            if len(groups) == 1:
                return self._apply_corruption(images, domain, int(severity), sample_ids)
            rows = np.flatnonzero((domain_ids == domain_id) & (severities == severity))
            index = self._device_rows(rows)
            images[index] = self._apply_corruption(images[index], domain, int(severity), sample_ids[rows])
        return images

    def _gather(self, key_id: int, base_index: np.ndarray) -> torch.Tensor:
        """Float NCHW images in [0, 1] (the same values as ``ImageArrays.to_tensor``)."""
        store = self._store(key_id)
        index = self._device_rows(base_index)
        return store.index_select(0, index).permute(0, 3, 1, 2).contiguous().float().div_(255.0)

    def _apply_corruption(
        self, images: torch.Tensor, domain: str, severity: int, sample_ids: np.ndarray
    ) -> torch.Tensor:
        ids = self._device_rows(sample_ids)
        seed = self.config.corruption_seed
        if not self.config.quantize:
            return self._corrupt()(images, domain, severity, seed=seed, sample_ids=ids)
        if self._corrupt_fn is None:
            # the official files' exact 8-bit values (truncating the float32 output of
            # corrupt would land one level off for a few percent of some corruptions)
            from benchmarks.corruptions import corrupt_uint8

            levels = corrupt_uint8(images, domain, severity, seed=seed, sample_ids=ids)
        else:
            from benchmarks.corruptions import to_uint8

            levels = to_uint8(self._corrupt_fn(images, domain, severity, seed=seed, sample_ids=ids))
        return levels.float().div_(255.0)

    def _device_rows(self, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)).to(self.device)

    def _store(self, key_id: int) -> torch.Tensor:
        """The uint8 NHWC images of a source key on the device (a zero-copy view on the CPU)."""
        if key_id not in self._device_images:
            domain, severity = self._key_owner[key_id]
            arrays: ImageArrays = self.source.load(domain, severity)
            host = torch.from_numpy(np.ascontiguousarray(arrays.images))
            self._device_images[key_id] = host.to(self.device)
        return self._device_images[key_id]

    def _corrupt(self) -> CorruptFn:
        if self._corrupt_fn is None:
            from benchmarks.corruptions import corrupt

            self._corrupt_fn = corrupt
        return self._corrupt_fn

    def describe(self) -> dict[str, Any]:
        """Resolved config plus derived sizes, for result files."""
        return {
            **self.config.to_dict(),
            "num_samples": self.num_samples,
            "num_batches": len(self),
            "num_classes": self.num_classes,
            "segments": [
                {"domain": s.name, "severity": s.severity, "reset": s.reset,
                 "start": int(self.plan.segment_bounds[i]), "stop": int(self.plan.segment_bounds[i + 1]),
                 # the visit of a recurring stream (absent otherwise: older result files stay as they were)
                 **({"recurrence": int(s.recurrence)} if self.config.recurrences > 1 else {})}
                for i, s in enumerate(self.plan.segments)
            ],
        }


def build_stream(
    config: StreamConfig,
    source: DomainSource | None = None,
    *,
    corrupt_fn: CorruptFn | None = None,
    cache: bool = False,
) -> Stream:
    """The stream of ``config``.

    Args:
        config: the stream definition.
        source: where images come from; by default resolved from ``config.dataset`` and
            ``config.source`` (:func:`benchmarks.streams.sources.resolve_source`).
        corrupt_fn: the batched corruption function; defaults to
            :func:`benchmarks.corruptions.corrupt` (imported on first use).
        cache: keep built batches to replay the stream without rebuilding them.
    """
    return Stream(config, source, corrupt_fn=corrupt_fn, cache=cache)


def build_domain_streams(
    config: StreamConfig,
    source: DomainSource | None = None,
    *,
    corrupt_fn: CorruptFn | None = None,
    cache: bool = False,
) -> list[Stream]:
    """One single-domain stream per domain of ``config`` (reset-each-shift as S parallel
    streams, for :func:`benchmarks.evaluation.evaluate_multi_stream`).

    The streams share one source, so the data is read once.
    """
    shared = source if source is not None else resolve_source(config)
    return [Stream(part, shared, corrupt_fn=corrupt_fn, cache=cache) for part in split_by_domain(config)]
