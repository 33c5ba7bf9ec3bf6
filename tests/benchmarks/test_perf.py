"""Smoke tests of the performance harness (``python -m benchmarks.perf``) on tiny sizes.

Nothing here asserts a wall-clock limit: timings on a shared 2-core machine are noise. The
tests check that every section runs, that the table and the JSON are written and consistent,
and that the target checks are reported.
"""

from __future__ import annotations

import json
import math

import torch

from benchmarks.perf import main
from benchmarks.perf.cli import parse_args
from benchmarks.perf.report import check_targets
from benchmarks.perf.timing import (
    Timing,
    paired_ratio,
    peak_memory_bytes,
    time_interleaved,
)

TINY = [
    "--device", "cpu", "--repeats", "1", "--warmup", "0", "--min-time", "0", "--threads", "1",
]


def test_methods_and_profile_sections_write_a_consistent_table(tmp_path):
    results = main(
        TINY
        + [
            "--models", "cifar_resnet26", "--batch-sizes", "2", "--target-batch", "2",
            "--methods", "source,norm,alpha_bn,unmix_tns,tent",
            "--sections", "methods,profile", "--profile-batch", "2",
            "--long-stream-steps", "3", "--long-stream-batch", "2", "--out", str(tmp_path),
        ]
    )
    rows = {row["method"]: row for row in results["methods"]}
    assert set(rows) == {"source", "norm", "alpha_bn", "unmix_tns", "tent"}
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["seconds"] > 0 and row["plain_seconds"] > 0 and row["ratio"] > 0
        assert row["peak_bytes"] >= 0 and row["plain_peak_bytes"] > 0
    markdown = (tmp_path / "perf.md").read_text()
    assert "| 2 | unmix_tns |" in markdown and "## Targets" in markdown
    saved = json.loads((tmp_path / "perf.json").read_text())
    assert saved["environment"]["torch"] == torch.__version__
    from benchmarks.protocol import PROTOCOL_SCHEMA, fingerprint_of

    protocol = saved["protocol"]  # the typed protocol block of the run, with its fingerprint
    assert protocol["schema"] == PROTOCOL_SCHEMA and protocol["kind"] == "benchmarks.perf"
    assert saved["fingerprint"] == fingerprint_of(protocol)
    assert protocol["methods"]["tent"]["hparams"]["tent"]["lr"] > 0 and protocol["batch_sizes"] == [2]
    assert protocol["software"][0]["torch"] == torch.__version__
    # the CPU ratio targets are evaluated at the target batch; CUDA ones say "not measured"
    targets = {(t["target"], t["scope"]): t["met"] for t in saved["targets"]}
    assert targets[("norm <= 1.25x plain (CPU, batch 2)", "cifar_resnet26")] in ("yes", "no")
    assert any(t["met"] == "not measured" and "CUDA" in t["target"] for t in saved["targets"])
    profile = saved["profile"]["cpu"]
    for method in ("norm", "alpha_bn", "unmix_tns"):
        assert profile["methods"][method]["syncs"] == {}, method  # no host synchronisation
        assert profile["methods"][method]["ops"] > 0
        assert len(profile["methods"][method]["memory"]["live_tensors"]) == 2
    assert (tmp_path / "profile_cpu_unmix_tns.txt").exists()


def test_the_default_methods_are_the_registrys_that_need_nothing_more_than_source_data():
    import tta
    from benchmarks.perf.cli import default_methods
    from tta.registry import method_class

    expected = [
        name for name in tta.registered_methods()
        if method_class(name).requires is None or method_class(name).source_data_argument
    ]
    assert default_methods() == expected == parse_args([]).methods
    assert "bcn" not in expected and {"source", "norm", "tent", "eta", "eata", "petta", "adanpc"} <= set(expected)


def test_methods_that_read_source_data_get_synthetic_batches():
    from benchmarks.models.digits import DigitsCNN
    from benchmarks.perf.methods import SOURCE_BATCHES, build_variants, source_data_for

    model = DigitsCNN(10, 8, "bn").eval()
    x = torch.rand(6, 3, 8, 8)
    (argument, batches), = source_data_for("petta", model, x).items()
    assert argument == "source_loader" and len(batches) == SOURCE_BATCHES
    assert all(b[0].shape == x.shape and int(b[1].max()) < 10 for b in batches)
    assert source_data_for("rbn+adanpc", model, x).keys() == {"source_loader"}
    assert source_data_for("tent", model, x) == {} and source_data_for("no_such", model, x) == {}
    calls, skipped = build_variants(model, x, ["eata", "adanpc", "petta"])
    assert not skipped and {"eata", "adanpc", "petta"} <= calls.keys()


def test_vit_has_no_statistics_methods_but_runs_tent(tmp_path):
    results = main(
        TINY
        + [
            "--models", "vit_tiny", "--sizes", "vit_tiny=16", "--batch-sizes", "2",
            "--methods", "norm,tent", "--sections", "methods", "--no-memory", "--out", str(tmp_path),
        ]
    )
    rows = {row["method"]: row for row in results["methods"]}
    assert rows["norm"]["status"].startswith("n/a")
    assert rows["tent"]["status"] == "ok"


def test_corruption_and_multistream_sections(tmp_path):
    results = main(
        TINY
        + [
            "--sections", "corruptions,multistream", "--corruptions", "gaussian_noise,fog",
            "--corruption-batch", "4", "--reference-images", "1",
            "--streams-batch", "2", "--streams-batches", "1", "--streams-methods", "norm",
            "--out", str(tmp_path),
        ]
    )
    names = [row["name"] for row in results["corruptions"]]
    assert names == ["gaussian_noise", "fog"]
    for row in results["corruptions"]:
        assert row["status"] == "ok" and row["images_per_second"] > 0
    (stream,) = results["multistream"]
    assert stream["status"] == "ok" and stream["num_streams"] == 15
    assert stream["sequential_seconds"] > 0 and stream["batched_seconds"] > 0
    assert "Multi-stream" in (tmp_path / "perf.md").read_text()


def test_quick_mode_only_fills_unset_flags():
    args = parse_args(["--quick", "--repeats", "7"])
    assert args.repeats == 7 and args.batch_sizes == [1, 16, 64] and args.sizes["resnet50"] == 32


def test_interleaved_timing_and_paired_ratio():
    calls = {"a": lambda: torch.ones(8).sum(), "b": lambda: torch.ones(16).sum()}
    timings = time_interleaved(calls, torch.device("cpu"), repeats=3, warmup=1, min_time=0.0)
    assert set(timings) == {"a", "b"} and all(len(t.seconds) == 3 for t in timings.values())
    assert paired_ratio(Timing("x", [2.0, 4.0, 9.0]), Timing("y", [1.0, 2.0, 3.0])) == 2.0
    assert math.isnan(paired_ratio(Timing("x", []), Timing("y", [])))


def test_cpu_peak_memory_counts_the_allocations_of_one_call():
    size = 1 << 20  # 4 MiB of float32

    def allocate() -> torch.Tensor:
        return torch.empty(size).fill_(1.0) + 1.0  # two live buffers at the peak

    peak = peak_memory_bytes(allocate, torch.device("cpu"))
    assert 2 * 4 * size <= peak <= 4 * 4 * size


def test_target_checks_without_rows_say_not_measured():
    checks = check_targets([], [], [], measured_devices=["cpu"])
    assert checks and all(c.met in ("not measured", "n/a") for c in checks)
