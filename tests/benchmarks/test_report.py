"""The report: tables from run records, plots, and clear failures on empty or foreign folders."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from benchmarks.app.records import RECORD_NAME, write_record
from benchmarks.report import ReportError, main, make_report

DOMAINS = ("gaussian_noise", "shot_noise", "contrast")
PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(root: Path, method: str, *, delta: float | None = 0.1, seed: int = 1, base: float = 0.3,
             hparams: dict | None = None) -> Path:
    """A finished run folder as the app writes it (only run.json is read by the report)."""
    errors = {d: base + 0.1 * i for i, d in enumerate(DOMAINS)}
    run_dir = root / f"{method}-{seed}-{delta}-{abs(hash((method, seed, delta, str(hparams)))) % 10**8}"
    (run_dir / ".hydra").mkdir(parents=True)
    write_record(run_dir, {
        "run_id": run_dir.name,
        "run_key": run_dir.name,
        "name": "fake",
        "seed": seed,
        "method": {"name": method, "hparams": hparams or {},
                   "label": method + (f"({','.join(f'{k}={v}' for k, v in hparams.items())})" if hparams else "")},
        "setting": {"model": "digits_cnn(bn)", "dataset": "digits", "schedule": "continual",
                    "label_order": "dirichlet" if delta is not None else "iid", "delta": delta, "severities": "5",
                    "domains": ",".join(DOMAINS), "batch_size": 64, "n_examples": None, "replays": 1},
        "summary": {
            "mean_error": sum(errors.values()) / len(errors),
            "error": sum(errors.values()) / len(errors),
            "domain_errors": errors,
            "curve": {"window": 100, "start": [0, 100, 200], "stop": [100, 200, 300], "error": list(errors.values())},
            "segments": [{"domain": d, "severity": 5, "start": 100 * i, "stop": 100 * (i + 1)} for i, d in enumerate(DOMAINS)],
        },
        "identity": {},
    })
    return run_dir


def first_table(markdown: str) -> list[list[str]]:
    lines = markdown.split("## Mean online error")[1].split("##")[0].splitlines()
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("|") and "---" not in line]


def test_methods_by_settings_table_per_domain_columns_and_plots(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for method, base in (("unmix_tns", 0.2), ("norm", 0.3), ("source", 0.5)):
        for delta in (0.1, 1.0):
            fake_run(runs, method, delta=delta, base=base)
    fake_run(runs, "norm", delta=0.1, seed=2, base=0.4)  # a second seed of one cell
    files = make_report([runs])
    markdown = files["markdown"].read_text()
    table = first_table(markdown)
    assert table[0] == ["method", "delta=0.1", "delta=1"]
    assert [row[0] for row in table[1:]] == ["source", "norm", "unmix_tns"]  # baseline first
    norm = dict(zip(table[0], table[2]))
    assert norm["delta=0.1"] == "45.00 ± 7.07"  # seeds 1 and 2: 40% and 50%
    assert norm["delta=1"] == "40.00"
    assert "Common to all runs:" in markdown and "schedule=continual" in markdown
    assert "| method | gaussian_noise | shot_noise | contrast | mean |" in markdown
    assert markdown.count("## Per-domain error (%):") == 2
    assert "| source | 50.00 | 60.00 | 70.00 | 60.00 |" in markdown
    for name in ("error_over_stream.png", "domain_errors.png"):
        assert (runs / "report" / name).read_bytes()[:8] == PNG
    rows = list(csv.DictReader(io.StringIO(files["csv"].read_text())))
    assert len(rows) == 6 and {r["method"] for r in rows} == {"source", "norm", "unmix_tns"}
    assert [r["n_runs"] for r in rows if r["method"] == "norm" and r["delta"] == "0.1"] == ["2"]


def test_hparams_make_separate_rows_and_several_dirs_merge(tmp_path: Path) -> None:
    fake_run(tmp_path / "a", "unmix_tns", hparams={"k": 8})
    fake_run(tmp_path / "b", "unmix_tns", hparams={"k": 16})
    files = make_report([tmp_path / "a", tmp_path / "b"], tmp_path / "out", plots=False)
    rows = [r[0] for r in first_table(files["markdown"].read_text())[1:]]
    assert rows == ["unmix_tns(k=16)", "unmix_tns(k=8)"]
    assert not (tmp_path / "out" / "domain_errors.png").exists()


def test_unfinished_runs_and_partial_files_are_not_read(tmp_path: Path) -> None:
    fake_run(tmp_path, "source")
    killed = tmp_path / "norm-killed"
    (killed / ".hydra").mkdir(parents=True)
    (killed / f".{RECORD_NAME}.123.abc.tmp").write_text('{"format": "tta-bench-run", "summ')  # a half-written temp file
    (killed / "results.csv").write_text("stream,scope\n")
    files = make_report([tmp_path], plots=False)
    markdown = files["markdown"].read_text()
    assert [r[0] for r in first_table(markdown)[1:]] == ["source"]
    assert "1 started run(s) without run.json" in markdown


def test_empty_missing_and_foreign_directories_fail_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match="no tta-bench runs under .*empty: expected run folders holding run.json"):
        make_report([empty])
    with pytest.raises(ReportError, match="no such directory"):
        make_report([tmp_path / "missing"])
    foreign = tmp_path / "foreign"
    (foreign / "x").mkdir(parents=True)
    (foreign / "x" / "notes.txt").write_text("hello")
    with pytest.raises(ReportError, match="no tta-bench runs"):
        make_report([foreign])
    (foreign / "x" / RECORD_NAME).write_text(json.dumps({"something": "else"}))
    with pytest.raises(ReportError, match="foreign files: .*not a tta-bench run record"):
        make_report([foreign])
    unfinished = tmp_path / "unfinished" / "norm-abc"
    (unfinished / ".hydra").mkdir(parents=True)
    with pytest.raises(ReportError, match="1 run folder\\(s\\) were started but never wrote run.json"):
        make_report([tmp_path / "unfinished"])
    other_app = tmp_path / "other_app" / "2026-01-01" / "12-00-00"
    (other_app / ".hydra").mkdir(parents=True)
    (other_app / ".hydra" / "config.yaml").write_text("lr: 0.1\nepochs: 3\n")
    with pytest.raises(ReportError, match="output of another Hydra app"):
        make_report([tmp_path / "other_app"])
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(ReportError, match="not a directory"):
        make_report([file])

    assert main([str(empty)]) == 2
    assert "error: no tta-bench runs" in capsys.readouterr().err


def test_cli_prints_markdown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake_run(tmp_path, "norm")
    assert main([str(tmp_path), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# tta-bench report") and "| norm |" in out
    assert (tmp_path / "report" / "report.md").is_file()
