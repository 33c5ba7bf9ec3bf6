"""Collects the online predictions of a stream, sample by sample, without per-batch syncs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from benchmarks.streams.stream import Batch


@dataclass(frozen=True)
class SampleRecords:
    """Per-sample outcome of an online run, in stream order (all arrays of equal length).

    ``confidence`` is the top softmax probability of the model output (for log-probability
    outputs such as LAME's, softmax returns the probabilities themselves).
    """

    correct: np.ndarray
    confidence: np.ndarray
    prediction: np.ndarray
    label: np.ndarray
    domain_id: np.ndarray
    severity: np.ndarray
    segment: np.ndarray
    position: np.ndarray

    def __len__(self) -> int:
        return int(self.correct.shape[0])

    @classmethod
    def from_arrays(
        cls,
        prediction: np.ndarray,
        confidence: np.ndarray,
        label: np.ndarray,
        domain_id: np.ndarray | None = None,
        severity: np.ndarray | None = None,
        segment: np.ndarray | None = None,
    ) -> "SampleRecords":
        """Records from plain arrays (one domain / severity / segment unless given)."""
        n = len(label)
        zeros = np.zeros(n, dtype=np.int64)
        prediction = np.asarray(prediction, dtype=np.int64)
        label = np.asarray(label, dtype=np.int64)
        return cls(
            correct=prediction == label,
            confidence=np.asarray(confidence, dtype=np.float32),
            prediction=prediction,
            label=label,
            domain_id=zeros if domain_id is None else np.asarray(domain_id, dtype=np.int64),
            severity=zeros if severity is None else np.asarray(severity, dtype=np.int64),
            segment=zeros if segment is None else np.asarray(segment, dtype=np.int64),
            position=np.arange(n, dtype=np.int64),
        )


class OnlineRecorder:
    """Accumulates predictions batch by batch.

    Predictions stay on the device until :meth:`finish`, so recording never forces a
    host-device synchronisation inside the stream loop.
    """

    def __init__(self) -> None:
        self._pred: list[torch.Tensor] = []
        self._conf: list[torch.Tensor] = []
        self._label: list[torch.Tensor] = []
        self._meta: list[tuple[torch.Tensor, int, int, torch.Tensor]] = []
        self.domains: tuple[str, ...] | None = None
        self.num_batches = 0

    def add(self, output: torch.Tensor, batch: Batch) -> None:
        """Record the model ``output`` (logits or log-probabilities) for ``batch``."""
        if output.ndim != 2 or output.shape[0] != len(batch):
            raise ValueError(f"expected output of shape ({len(batch)}, C), got {tuple(output.shape)}")
        with torch.no_grad():
            conf, pred = output.detach().float().softmax(dim=1).max(dim=1)
        self._pred.append(pred)
        self._conf.append(conf)
        self._label.append(batch.labels)
        self._meta.append((batch.domain_ids, batch.severity, batch.segment, batch.positions))
        if self.domains is None:
            self.domains = tuple(batch.domains)
        self.num_batches += 1

    @property
    def num_samples(self) -> int:
        return sum(int(t.shape[0]) for t in self._label)

    def state_dict(self) -> dict[str, Any]:
        """Everything recorded so far, on the CPU (for a mid-stream checkpoint)."""
        return {
            "pred": [t.cpu() for t in self._pred],
            "conf": [t.cpu() for t in self._conf],
            "label": [t.cpu() for t in self._label],
            "meta": [(ids.cpu(), int(sev), int(seg), pos.cpu()) for ids, sev, seg, pos in self._meta],
            "domains": None if self.domains is None else list(self.domains),
            "num_batches": self.num_batches,
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str | None = None) -> None:
        """Continue from :meth:`state_dict` (predictions go back to ``device``)."""
        self._pred = [t.to(device) if device is not None else t for t in state["pred"]]
        self._conf = [t.to(device) if device is not None else t for t in state["conf"]]
        self._label = [t.to(device) if device is not None else t for t in state["label"]]
        self._meta = [(ids, int(sev), int(seg), pos) for ids, sev, seg, pos in state["meta"]]
        self.domains = None if state["domains"] is None else tuple(state["domains"])
        self.num_batches = int(state["num_batches"])

    def finish(self) -> SampleRecords:
        """All records as NumPy arrays (one device-to-host copy per field)."""
        if not self._pred:
            empty_i, empty_f = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
            return SampleRecords(
                np.zeros(0, dtype=bool), empty_f, empty_i, empty_i, empty_i, empty_i, empty_i, empty_i
            )
        pred = torch.cat(self._pred).cpu().numpy().astype(np.int64)
        device = self._pred[0].device
        label = torch.cat([lab.to(device) for lab in self._label]).cpu().numpy().astype(np.int64)
        sizes = [len(m[0]) for m in self._meta]
        return SampleRecords(
            correct=pred == label,
            confidence=torch.cat(self._conf).cpu().numpy().astype(np.float32),
            prediction=pred,
            label=label,
            domain_id=torch.cat([m[0].cpu() for m in self._meta]).numpy().astype(np.int64),
            severity=np.repeat(np.array([m[1] for m in self._meta], dtype=np.int64), sizes),
            segment=np.repeat(np.array([m[2] for m in self._meta], dtype=np.int64), sizes),
            position=torch.cat([m[3].cpu() for m in self._meta]).numpy().astype(np.int64),
        )
