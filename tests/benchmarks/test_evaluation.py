"""Online evaluation: metrics on crafted predictions, the protocol, and atomic result files."""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
import torch

from benchmarks.evaluation import (
    EvalResult,
    SampleRecords,
    calibration_bins,
    error_rate,
    evaluate,
    expected_calibration_error,
    window_errors,
    write_results,
)
from benchmarks.streams import Batch, GeneratedSource, StreamConfig, build_stream
from tests.benchmarks.test_streams import RecordingCorruption, tiny_arrays

# -- metrics on hand-computed values ------------------------------------------------------------------


def test_error_rate_and_windows():
    correct = np.array([1, 0, 1, 1, 0, 0, 1], dtype=bool)
    assert error_rate(correct) == pytest.approx(3 / 7)
    bounds, errors = window_errors(correct, 3)
    assert bounds.tolist() == [0, 3, 6, 7]
    assert errors.tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert math.isnan(error_rate(np.zeros(0, dtype=bool)))


def test_ece_hand_computed():
    conf = np.array([0.95, 0.92, 0.55, 0.52, 0.3, 0.31])
    correct = np.array([1, 0, 1, 1, 0, 1], dtype=float)
    # Bins of width 1/15, right-closed: 0.95 -> 14, 0.92 -> 13, 0.55 -> 8, 0.52 -> 7, and
    # 0.30, 0.31 -> 4 (acc 1/2, mean conf 0.305). Each bin adds |B|/n * |acc - conf|.
    expected = (
        abs(1 - 0.95) * 1 + abs(0 - 0.92) * 1 + abs(1 - 0.55) * 1 + abs(1 - 0.52) * 1 + abs(0.5 - 0.305) * 2
    ) / 6
    assert expected_calibration_error(conf, correct, 15) == pytest.approx(expected)
    assert calibration_bins(conf, 15).tolist() == [14, 13, 8, 7, 4, 4]


def test_ece_bins_are_right_closed():
    edges = np.array([1 / 15, 2 / 15, 1.0])
    assert calibration_bins(edges, 15).tolist() == [0, 1, 14]
    # A perfectly calibrated bin contributes nothing: 4 samples at 0.75, 3 correct.
    conf = np.full(4, 0.75)
    assert expected_calibration_error(conf, np.array([1, 1, 1, 0]), 15) == pytest.approx(0.0)
    assert expected_calibration_error(conf, np.array([1, 1, 1, 0]), 1) == pytest.approx(0.0)
    assert expected_calibration_error(np.array([0.9]), np.array([0]), 10) == pytest.approx(0.9)


# -- the online protocol -----------------------------------------------------------------------------


class ConstantModel:
    """Always predicts class 0 with probability ``p``; counts calls and resets."""

    def __init__(self, p: float = 0.8, num_classes: int = 3) -> None:
        rest = (1 - p) / (num_classes - 1)
        self.logits = torch.log(torch.tensor([p] + [rest] * (num_classes - 1)))
        self.calls = 0
        self.resets: list[int] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.logits.expand(len(x), -1).clone()

    def reset(self) -> None:
        self.resets.append(self.calls)


def small_stream(**overrides):
    values = dict(domains=("fog", "clean"), batch_size=16, n_examples=30, seed=1)
    values.update(overrides)
    return build_stream(StreamConfig(**values), GeneratedSource(tiny_arrays(n=30)), corrupt_fn=RecordingCorruption())


def test_constant_model_error_and_ece():
    model = ConstantModel(p=0.8)
    result = evaluate(model, small_stream(schedule="continual"), window=20, progress=False)
    # Balanced labels 0,1,2: a third is class 0 -> error 2/3; one confidence 0.8 -> ECE |1/3 - 0.8|.
    assert result.num_samples == 60 and result.error == pytest.approx(2 / 3)
    assert result.ece == pytest.approx(abs(1 / 3 - 0.8), abs=1e-6)
    assert result.domain_errors() == pytest.approx({"fog": 2 / 3, "clean": 2 / 3})
    assert model.calls == result.num_batches == 4
    assert model.resets == [0]  # continual: one reset, before the first batch


def test_reset_each_shift_resets_before_every_domain():
    model = ConstantModel()
    evaluate(model, small_stream(schedule="reset_each_shift"), progress=False)
    assert model.resets == [0, 2]  # batches per domain: 16 + 14
    explicit = []
    evaluate(ConstantModel(), small_stream(schedule="reset_each_shift"), reset=lambda: explicit.append(1), progress=False)
    assert len(explicit) == 2


def test_plain_callable_without_reset_is_accepted():
    result = evaluate(lambda x: torch.zeros(len(x), 3), small_stream(), progress=False)
    assert result.num_samples == 60


class PixelModel:
    """Predicts from pixel content, so records can be checked against the images."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        pred = (x[:, 0, 0, 0] * 255).round().long() % 3
        return torch.nn.functional.one_hot(pred, 3).float() * 5


def test_records_align_with_samples_and_gradual_table():
    stream = small_stream(domains=("fog",), schedule="gradual", n_examples=30, batch_size=8)
    result = evaluate(PixelModel(), stream, window=50, progress=False)
    images = torch.cat([b.images for b in stream])
    labels = torch.from_numpy(stream.plan.labels)
    expected_pred = (images[:, 0, 0, 0] * 255).round().long() % 3
    assert np.array_equal(result.records.prediction, expected_pred.numpy())
    assert np.array_equal(result.records.correct, (expected_pred == labels).numpy())
    assert np.array_equal(result.records.severity, stream.plan.severity)
    rows = result.rows()
    segment_rows = [r for r in rows if r["scope"] == "segment"]
    assert [r["severity"] for r in segment_rows] == [1, 2, 3, 4, 5, 4, 3, 2, 1]
    pair_rows = {r["severity"]: r for r in rows if r["scope"] == "domain_severity"}
    assert sorted(pair_rows) == [1, 2, 3, 4, 5]
    assert pair_rows[3]["n_samples"] == 60 and pair_rows[5]["n_samples"] == 30
    correct = result.records.correct
    sev = result.records.severity
    assert pair_rows[2]["error"] == pytest.approx(1 - correct[sev == 2].mean())
    summary = result.summary()
    seg_errors = [1 - correct[result.records.segment == k].mean() for k in range(9)]
    assert summary["mean_segment_error"] == pytest.approx(np.mean(seg_errors))
    assert summary["error_at_severity"]["5"] == pytest.approx(1 - correct[sev == 5].mean())
    windows = [r for r in rows if r["scope"] == "window"]
    assert [(r["window_start"], r["window_stop"]) for r in windows] == [(0, 50), (50, 100), (100, 150), (150, 200), (200, 250), (250, 270)]


def hand_batch(labels, domain_ids, index, reset, domains=("a", "b")) -> Batch:
    """A batch whose pixels encode (label, domain) so a model can be crafted per sample."""
    labels = torch.tensor(labels)
    domain_ids = torch.tensor(domain_ids)
    images = torch.zeros(len(labels), 3, 2, 2)
    images[:, 0, 0, 0] = labels.float()
    images[:, 1, 0, 0] = domain_ids.float()
    return Batch(images, labels, "mixed", 5, domain_ids, domains, torch.arange(len(labels)),
                 torch.arange(len(labels)) + 10 * index, reset, index, 0)


def test_mixed_stream_per_domain_errors_from_tags():
    # Domain a: 4 samples, all right; domain b: 2 samples, all wrong.
    batches = [hand_batch([0, 1, 2], [0, 1, 0], 0, True), hand_batch([1, 2, 0], [0, 0, 1], 1, False)]

    def model(x):
        label, domain = x[:, 0, 0, 0].long(), x[:, 1, 0, 0].long()
        pred = torch.where(domain == 0, label, (label + 1) % 3)
        return torch.nn.functional.one_hot(pred, 3).float()

    result = evaluate(model, batches, progress=False)
    assert result.domain_errors() == {"a": 0.0, "b": 1.0}
    summary = result.summary()
    assert summary["error"] == pytest.approx(2 / 6)  # over all samples
    assert summary["mean_domain_error"] == pytest.approx(0.5)  # average of per-domain errors


# -- result files ----------------------------------------------------------------------------------------


def make_result(name="s") -> EvalResult:
    records = SampleRecords.from_arrays(
        prediction=np.array([0, 1, 1, 2]), confidence=np.array([0.9, 0.8, 0.7, 0.6]), label=np.array([0, 1, 2, 2]),
        domain_id=np.array([0, 0, 1, 1]),
    )
    return EvalResult(name, ("fog", "snow"), records, 1.0, 0.5, 10.0, "process_max_rss", 2, window=2,
                      config={"seed": 1, "domains": ["fog", "snow"]})


def test_write_results_tidy_csv_json_and_config(tmp_path):
    paths = write_results([make_result("a"), make_result("b")], tmp_path / "out", config={"method": "norm", "x": float("nan")})
    with open(paths["csv"]) as handle:
        rows = list(csv.DictReader(handle))
    assert {r["stream"] for r in rows} == {"a", "b"}
    overall = next(r for r in rows if r["stream"] == "a" and r["scope"] == "overall")
    assert overall["n_samples"] == "4" and float(overall["error"]) == pytest.approx(0.25)
    domain_rows = {r["domain"]: r for r in rows if r["stream"] == "a" and r["scope"] == "domain"}
    assert float(domain_rows["snow"]["error"]) == pytest.approx(0.5)
    payload = json.loads(paths["json"].read_text())
    assert [s["stream"] for s in payload["summaries"]] == ["a", "b"]
    assert payload["summaries"][0]["images_per_s"] == pytest.approx(4.0)
    assert json.loads(paths["config"].read_text()) == {"method": "norm", "x": None}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "results.csv", "results.json"]


def test_write_is_atomic_when_replace_fails(tmp_path, monkeypatch):
    paths = write_results(make_result(), tmp_path)
    before = paths["csv"].read_text()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        write_results(make_result("other"), tmp_path)
    monkeypatch.undo()
    assert paths["csv"].read_text() == before  # the old complete file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "results.csv", "results.json"]


def test_recorder_rejects_wrong_output_shape():
    with pytest.raises(ValueError):
        evaluate(lambda x: torch.zeros(len(x) + 1, 3), small_stream(), progress=False)
