"""The result of an online run and its tidy table (docs/METHODS.md §9.4).

Table scopes (one row each):

* ``overall``: every sample of the stream;
* ``segment``: one pass of the schedule (a domain at a severity; the whole mixed block);
  the mean over segments is the headline number of the official code (one loader per pass);
* ``domain``: all samples of a domain (recovered from per-sample tags in mixed streams);
* ``domain_severity``: all samples of a (domain, severity) pair (gradual visits 1-4 twice);
* ``recurrence``: one visit of the whole schedule of a recurring stream (PeTTA's protocol;
  ``stream.recurrences > 1`` only), with its sample range in ``window_start``/``window_stop``;
  a slow collapse shows as a rising error from visit to visit;
* ``window``: consecutive windows of a fixed number of samples, in stream order.

The ``recurrence`` column holds the visit of ``segment`` and ``recurrence`` rows of a
recurring stream and is empty otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.evaluation.metrics import (
    DEFAULT_ECE_BINS,
    error_rate,
    expected_calibration_error,
    window_errors,
)
from benchmarks.evaluation.recorder import SampleRecords

MIXED = "mixed"

ROW_FIELDS: tuple[str, ...] = (
    "stream",
    "scope",
    "domain",
    "severity",
    "segment",
    "recurrence",
    "window_start",
    "window_stop",
    "n_samples",
    "n_errors",
    "error",
    "ece",
)


@dataclass
class EvalResult:
    """Everything measured in one online run of one stream.

    Attributes:
        name: stream name (the ``stream`` column of the table).
        domains: domain names; ``records.domain_id`` indexes into it.
        records: per-sample predictions, labels and tags.
        seconds: wall-clock seconds of the whole loop (stream generation included).
        model_seconds: seconds spent in model calls (synchronised on CUDA).
        peak_memory_mb / peak_memory_kind: see :mod:`benchmarks.evaluation.memory`.
        num_batches: model calls made for this stream.
        num_streams: streams evaluated together in the same loop; throughput then counts the
            images of all of them.
        window: samples per time window.
        n_bins: ECE bins.
        config: the fully resolved configuration of the run.
    """

    name: str
    domains: tuple[str, ...]
    records: SampleRecords
    seconds: float
    model_seconds: float
    peak_memory_mb: float
    peak_memory_kind: str
    num_batches: int
    num_streams: int = 1
    window: int = 1000
    n_bins: int = DEFAULT_ECE_BINS
    config: dict[str, Any] = field(default_factory=dict)

    # -- headline numbers ----------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return len(self.records)

    @property
    def error(self) -> float:
        return error_rate(self.records.correct)

    @property
    def ece(self) -> float:
        return expected_calibration_error(self.records.confidence, self.records.correct, self.n_bins)

    def domain_errors(self) -> dict[str, float]:
        """Online error per domain, pooled over severities and segments."""
        groups = self._groups(self.records.domain_id)
        return {self.domains[d]: error_rate(self.records.correct[m]) for d, m in groups}

    def segment_errors(self) -> list[float]:
        return [error_rate(self.records.correct[m]) for _, m in self._groups(self.records.segment)]

    def sample_recurrence(self) -> np.ndarray | None:
        """The visit of every sample of a recurring stream (from the stream's segments), else None."""
        segments = (self.config or {}).get("segments") or []
        if not segments or "recurrence" not in segments[0]:
            return None
        visit = np.array([int(seg["recurrence"]) for seg in segments], dtype=np.int64)
        return visit[self.records.segment]

    def recurrence_errors(self) -> list[float]:
        """Per visit of a recurring stream, the headline error of that visit alone: the mean
        over its domains (gradual schedules: over its (domain, severity) pairs) of the online
        error; empty for a stream that does not recur."""
        visit = self.sample_recurrence()
        if visit is None:
            return []
        r = self.records
        gradual = (self.config or {}).get("schedule") == "gradual"
        keys = r.domain_id * 1000 + r.severity if gradual else r.domain_id
        out = []
        for v in np.unique(visit):
            inside = visit == v
            out.append(_mean([error_rate(r.correct[inside & (keys == k)]) for k in np.unique(keys[inside])]))
        return out

    def domain_severity_errors(self) -> dict[tuple[str, int], float]:
        out = {}
        for (d, s), m in self._pair_groups():
            out[(self.domains[d], s)] = error_rate(self.records.correct[m])
        return out

    #: fields of :meth:`summary` that measure the machine, not the predictions
    TIMING_FIELDS = ("seconds", "model_seconds", "images_per_s", "model_images_per_s", "peak_memory_mb", "peak_memory_kind")

    def summary(self, *, timing: bool = True) -> dict[str, Any]:
        """Headline numbers; ``timing=False`` leaves out :attr:`TIMING_FIELDS`, so the
        summary depends only on the predictions (identical for a resumed run)."""
        out = self._summary()
        return out if timing else {k: v for k, v in out.items() if k not in self.TIMING_FIELDS}

    def _summary(self) -> dict[str, Any]:
        pairs = self.domain_severity_errors()
        severities = sorted({s for _, s in pairs})
        total_images = self.num_samples * self.num_streams
        return {
            "stream": self.name,
            "num_samples": self.num_samples,
            "num_batches": self.num_batches,
            "num_streams": self.num_streams,
            "error": self.error,
            "ece": self.ece,
            "mean_segment_error": _mean(self.segment_errors()),
            "mean_domain_error": _mean(list(self.domain_errors().values())),
            "mean_domain_severity_error": _mean(list(pairs.values())),
            "error_at_severity": {
                str(s): _mean([e for (_, sev), e in pairs.items() if sev == s]) for s in severities
            },
            **({"recurrence_errors": recurrences} if (recurrences := self.recurrence_errors()) else {}),
            "seconds": self.seconds,
            "model_seconds": self.model_seconds,
            "images_per_s": _rate(total_images, self.seconds),
            "model_images_per_s": _rate(total_images, self.model_seconds),
            "peak_memory_mb": self.peak_memory_mb,
            "peak_memory_kind": self.peak_memory_kind,
        }

    # -- tidy table ----------------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        r = self.records
        visit = self.sample_recurrence()
        rows = [self._row("overall", "all", None, None, np.ones(len(r), dtype=bool))]
        for k, m in self._groups(r.segment):
            present = np.unique(r.domain_id[m])
            name = self.domains[int(present[0])] if len(present) == 1 else MIXED
            row = self._row("segment", name, int(r.severity[m][0]), k, m)
            if visit is not None:
                row["recurrence"] = int(visit[m][0])
            rows.append(row)
        if visit is not None:
            for v, m in self._groups(visit):
                row = self._row("recurrence", None, None, None, m)
                where = np.flatnonzero(m)
                row.update(recurrence=v, window_start=int(where[0]), window_stop=int(where[-1]) + 1)
                rows.append(row)
        for d, m in self._groups(r.domain_id):
            rows.append(self._row("domain", self.domains[d], None, None, m))
        for (d, s), m in self._pair_groups():
            rows.append(self._row("domain_severity", self.domains[d], s, None, m))
        bounds, errors = window_errors(r.correct, self.window)
        for k in range(len(errors)):
            lo, hi = int(bounds[k]), int(bounds[k + 1])
            window_mask = np.zeros(len(r), dtype=bool)
            window_mask[lo:hi] = True
            row = self._row("window", None, None, None, window_mask)
            row.update(window_start=lo, window_stop=hi)
            rows.append(row)
        return rows

    def _row(
        self,
        scope: str,
        domain: str | None,
        severity: int | None,
        segment: int | None,
        mask: np.ndarray,
    ) -> dict[str, Any]:
        correct = self.records.correct[mask]
        return {
            "stream": self.name,
            "scope": scope,
            "domain": domain,
            "severity": severity,
            "segment": segment,
            "recurrence": None,
            "window_start": None,
            "window_stop": None,
            "n_samples": int(correct.size),
            "n_errors": int(correct.size - correct.sum()),
            "error": error_rate(correct),
            "ece": expected_calibration_error(self.records.confidence[mask], correct, self.n_bins),
        }

    @staticmethod
    def _groups(keys: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(key, mask) per distinct key, in order of first appearance in the stream."""
        values, first = np.unique(keys, return_index=True)
        return [(int(v), keys == v) for v in values[np.argsort(first)]]

    def _pair_groups(self) -> list[tuple[tuple[int, int], np.ndarray]]:
        r = self.records
        pairs = np.stack([r.domain_id, r.severity], axis=1) if len(r) else np.zeros((0, 2), dtype=np.int64)
        values, first = np.unique(pairs, axis=0, return_index=True)
        out = []
        for d, s in values[np.argsort(first)]:
            out.append(((int(d), int(s)), (r.domain_id == d) & (r.severity == s)))
        return out


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("nan")


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")
