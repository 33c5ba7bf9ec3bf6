"""In-process runs of the task function: results, skipping, crashes, multi-stream, gradual."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

import benchmarks.app  # noqa: F401
import benchmarks.app.runner as runner
from benchmarks.app.identity import run_id
from benchmarks.app.records import RECORD_NAME, read_record, scan_runs
from benchmarks.report import ReportError, make_report

TINY = [
    "experiment=digits_quick",
    "stream.domains=[gaussian_noise,contrast]",
    "stream.n_examples=48",
    "stream.batch_size=24",
    "runtime.progress=false",
]


@pytest.fixture(scope="module", autouse=True)
def _digits_model() -> None:
    from benchmarks.models.digits import digits_source_model

    digits_source_model()  # trained once, cached in $TTA_CACHE_DIR (default ~/.cache/tta)


def make(tmp_path: Path, *overrides: str):  # noqa: ANN201
    with initialize_config_module(config_module="conf", version_base="1.3"):
        return compose(config_name="config", overrides=[*TINY, f"paths.output_root={tmp_path}", *overrides])


def test_run_writes_results_then_record_and_skips_when_finished(tmp_path: Path) -> None:
    cfg = make(tmp_path, "method=norm")
    summary = runner.run(cfg)
    run_dir = tmp_path / "digits_quick" / run_id(cfg)
    names = {p.name for p in run_dir.iterdir()}
    assert {"results.csv", "results.json", "config.json", RECORD_NAME} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    record = read_record(run_dir / RECORD_NAME)
    assert record["method"]["name"] == "norm" and record["seed"] == 1
    assert list(record["summary"]["domain_errors"]) == ["gaussian_noise", "contrast"]
    assert record["summary"]["num_samples"] == 96 and record["summary"]["num_batches"] == 4
    assert summary["mean_error"] == pytest.approx(record["summary"]["mean_error"])
    config = json.loads((run_dir / "config.json").read_text())
    assert config["app"]["method"]["name"] == "norm"
    mtime = (run_dir / RECORD_NAME).stat().st_mtime_ns

    again = runner.run(make(tmp_path, "method=norm"))  # skipped: nothing is rewritten
    assert (run_dir / RECORD_NAME).stat().st_mtime_ns == mtime
    assert again["mean_error"] == pytest.approx(summary["mean_error"])

    forced = make(tmp_path, "method=norm", "runtime.skip_finished=false")
    runner.run(forced)
    assert (run_dir / RECORD_NAME).stat().st_mtime_ns != mtime


def test_crash_before_the_record_leaves_nothing_the_report_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make(tmp_path, "method=source")
    run_dir = tmp_path / "digits_quick" / run_id(cfg)
    (run_dir / ".hydra").mkdir(parents=True)  # as Hydra creates it before the task runs

    def killed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt  # e.g. Ctrl-C or a signal right after the tables were written

    monkeypatch.setattr(runner, "write_record", killed)
    with pytest.raises(KeyboardInterrupt):
        runner.run(cfg)
    assert (run_dir / "results.json").is_file() and not (run_dir / RECORD_NAME).exists()
    with pytest.raises(ReportError, match="never wrote run.json"):
        make_report([tmp_path])
    monkeypatch.undo()

    # a crash inside an atomic write (here: the final rename fails) leaves no record and no
    # temporary file behind
    import benchmarks.evaluation.writers as writers

    def broken_replace(src, dst):  # noqa: ANN001, ANN202
        raise OSError("disk full")

    monkeypatch.setattr(writers.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        runner.run(cfg)
    monkeypatch.undo()
    assert not (run_dir / RECORD_NAME).exists()
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    assert scan_runs([tmp_path]).finished == []

    runner.run(cfg)  # the re-run finishes it
    assert len(scan_runs([tmp_path]).finished) == 1


def test_multi_stream_matches_separate_reset_runs(tmp_path: Path) -> None:
    sequential = runner.run(make(tmp_path, "method=norm", "stream=reset_each_shift", "stream.domains=[gaussian_noise,contrast]"))
    parallel = runner.run(
        make(tmp_path, "method=norm", "stream=reset_each_shift", "stream.domains=[gaussian_noise,contrast]", "eval.multi_stream=true")
    )
    assert parallel["num_streams"] == 2
    assert parallel["domain_errors"] == pytest.approx(sequential["domain_errors"])
    assert parallel["mean_error"] == pytest.approx(sequential["mean_error"])


def test_gradual_headline_averages_domain_severity_pairs(tmp_path: Path) -> None:
    summary = runner.run(make(tmp_path, "method=source", "stream=gradual", "stream.domains=[contrast]", "stream.n_examples=24"))
    pairs = summary["domain_severity_errors"]
    assert sorted(pairs) == [f"contrast@{s}" for s in range(1, 6)]
    assert summary["mean_error"] == pytest.approx(sum(pairs.values()) / len(pairs))


def test_a_sweep_counts_only_its_own_runs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A sweep folder may hold earlier sweeps' runs: the end-of-sweep line counts this sweep's."""
    import logging

    from omegaconf import OmegaConf

    from benchmarks.app.checks import PreflightChecks
    from tests.benchmarks.test_report import fake_run

    fake_run(tmp_path, "source")  # an earlier sweep's run
    ours = fake_run(tmp_path, "norm")
    callback = PreflightChecks()
    callback.sweep_keys = {ours.name, "a-job-that-failed"}
    with caplog.at_level(logging.INFO, logger="benchmarks.app.checks"):
        callback.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert "sweep finished: 1 of its 2 runs finished in" in caplog.text
    assert "(and 1 finished runs of earlier sweeps)" in caplog.text


def test_a_run_parses_its_method_once_into_the_spec_and_builds_it_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tta.methods.base import Method

    built: list[str] = []
    original = Method.__init__

    def counting(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        built.append(self.name)
        original(self, *args, **kwargs)

    monkeypatch.setattr(Method, "__init__", counting)
    runner.run(make(tmp_path, "method=unmix_tns_tent", "+method.hparams.k=4"))
    assert built == ["unmix_tns", "tent"]  # the two parts of the composition, once each


def test_reset_every_reaches_the_wrapper_and_the_fingerprint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tta

    seen = []
    real_adapt = tta.adapt

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        adapted = real_adapt(*args, **kwargs)
        seen.append(adapted.reset_every)
        return adapted

    monkeypatch.setattr(tta, "adapt", spy)
    cfg = make(tmp_path, "method=tent", "method.reset_every=2")
    runner.run(cfg)
    record = read_record(tmp_path / "digits_quick" / run_id(cfg) / RECORD_NAME)
    assert seen == [2] and record["protocol"]["method"]["hparams"]["wrapper"] == {"reset_every": 2}
    plain = make(tmp_path, "method=tent")
    runner.run(plain)
    plain_record = read_record(tmp_path / "digits_quick" / run_id(plain) / RECORD_NAME)
    assert "wrapper" not in plain_record["protocol"]["method"]["hparams"]


def test_source_images_reach_the_method_that_reads_source_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.app import source_data

    real_batches = source_data.source_batches
    seen = []

    def recording(stream, count, seed):  # noqa: ANN001, ANN202
        batches = real_batches(stream, count, seed)
        seen.append((stream.split, count, [tuple(x.shape) for x, _ in batches], torch.cat([y for _, y in batches])))
        return batches

    monkeypatch.setattr(runner, "source_batches", recording)
    cfg = make(tmp_path, "method=petta", "method.source_images=50")
    runner.run(cfg)
    ((split, count, shapes, labels),) = seen
    assert split == "test" and count == 50  # the stream's config; source_batches reads its train split
    assert shapes == [(24, 3, 32, 32), (24, 3, 32, 32), (2, 3, 32, 32)]  # the stream's batch size
    assert len(set(labels.tolist())) > 5  # a seeded shuffle, not a one-class prefix
    record = read_record(tmp_path / "digits_quick" / run_id(cfg) / RECORD_NAME)
    assert record["protocol"]["method"]["hparams"]["source_data"] == {"split": "train", "images": 50, "order_seed": 1}
    from benchmarks.app.errors import BenchConfigError

    with pytest.raises(BenchConfigError, match="reads no source data"):
        runner.run(make(tmp_path, "method=tent", "method.source_images=50"))


def test_source_batches_come_from_the_training_split() -> None:
    from benchmarks.app.source_data import source_batches
    from benchmarks.data import load_digits
    from benchmarks.streams import StreamConfig

    stream = StreamConfig(dataset="digits", domains=("fog",), batch_size=16)
    batches = source_batches(stream, 40, seed=0)
    train, test = load_digits("train", size=32), load_digits("test", size=32)
    images = torch.cat([x for x, _ in batches])
    train_images, test_images = train.to_tensor(), test.to_tensor()
    for image, label in zip(images, torch.cat([y for _, y in batches])):
        match = (train_images == image).flatten(1).all(1).nonzero()
        assert len(match) >= 1 and int(train.labels[int(match[0])]) == int(label)
    assert not (test_images[:, None] == images[None]).flatten(2).all(2).any()  # nothing from the test split
