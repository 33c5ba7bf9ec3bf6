"""End to end through the real command line: Hydra multirun with the joblib launcher, the
report, restarts that skip finished runs, fail-fast config errors and killed runs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.app.records import RECORD_NAME
from benchmarks.report import ReportError, make_report

ROOT = Path(__file__).resolve().parents[2]

#: A few batches per run: two corruptions of 48 digits each, batches of 24.
TINY = [
    "experiment=digits_quick",
    "stream.domains=[gaussian_noise,contrast]",
    "stream.n_examples=48",
    "stream.batch_size=24",
    "runtime.progress=false",
]


def make_bench_env() -> dict[str, str]:
    """Environment for ``python -m benchmarks.run`` subprocesses that use this checkout.

    The digits source model is trained here if needed (cached in ``$TTA_CACHE_DIR``, default
    ``~/.cache/tta``), so parallel jobs never train it concurrently.
    """
    from benchmarks.models.digits import digits_source_model

    digits_source_model()
    path = os.environ.get("PYTHONPATH", "")
    return dict(
        os.environ,
        PYTHONPATH=str(ROOT) + (os.pathsep + path if path else ""),
        HF_HUB_OFFLINE="1",
        TTA_JOBS="2",
    )


@pytest.fixture(scope="session")
def bench_env() -> dict[str, str]:
    return make_bench_env()


def bench(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.run", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _table_rows(markdown: str) -> tuple[list[str], list[str]]:
    """(header cells, first-column cells) of the first markdown table."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        if not line.startswith("|") or line.startswith("| ---"):
            break
        rows.append(line.strip("|").split("|")[0].strip())
    # stop at the end of the first table: the next header starts with "| method |" again
    first_table_end = next((i for i, r in enumerate(rows) if r == "method"), len(rows))
    return header, rows[:first_table_end]


def test_joblib_sweep_2x2_report_and_restart(bench_env: dict[str, str], tmp_path: Path) -> None:
    args = [
        "-m", *TINY, "launcher=joblib", "method=source,norm", "stream.label_order=iid,sorted",
        f"paths.output_root={tmp_path / 'out'}", "name=sweep",
    ]
    first = bench(args, bench_env, tmp_path)
    output = first.stdout + first.stderr
    assert first.returncode == 0, output
    assert "Joblib.Parallel" in output  # Hydra's joblib launcher ran the jobs
    sweep = tmp_path / "out" / "sweep"
    records = sorted(sweep.glob(f"*/{RECORD_NAME}"))
    assert len(records) == 4, output
    assert sorted(p.parent.name.split("-")[0] for p in records) == ["norm", "norm", "source", "source"]

    files = make_report([sweep], tmp_path / "report")
    markdown = files["markdown"].read_text()
    header, rows = _table_rows(markdown)
    assert header == ["method", "label_order=iid", "label_order=sorted"]
    assert rows == ["source", "norm"]
    assert "| method | gaussian_noise | contrast | mean |" in markdown
    assert (tmp_path / "report" / "error_over_stream.png").stat().st_size > 0
    assert (tmp_path / "report" / "domain_errors.png").stat().st_size > 0

    # Restart as after an interruption: one run lost its completion record.
    victim = records[0]
    victim.unlink()
    before = {p: p.stat().st_mtime_ns for p in records[1:]}
    second = bench(args, bench_env, tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "sweep finished: 4 of its 4 runs finished" in second.stdout + second.stderr
    assert victim.is_file()
    assert {p: p.stat().st_mtime_ns for p in records[1:]} == before  # finished runs untouched
    for record in records:
        last = (record.parent / "run.log").read_text().strip().splitlines()[-1]
        expected = "] - finished |" if record == victim else "] - skipped (finished earlier) |"
        assert expected in last, last


def test_bad_sweep_value_fails_before_any_job(bench_env: dict[str, str], tmp_path: Path) -> None:
    """An unknown method name in a sweep stops the whole sweep before the first job runs."""
    result = bench(
        ["-m", *TINY, "method.name=source,sourse", f"paths.output_root={tmp_path / 'out'}", "name=bad"],
        bench_env, tmp_path, timeout=200,
    )
    assert result.returncode != 0
    assert "unknown method 'sourse'" in result.stderr
    assert "registered methods: " in result.stderr and "unmix_tns" in result.stderr
    assert "nothing was run" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_killed_run_leaves_no_result_the_report_reads(bench_env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["experiment=digits_quick", "stream.replays=200", "runtime.progress=false", "runtime.num_threads=1",
            f"paths.output_root={out}", "name=killed"]
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.run", *args], cwd=tmp_path, env=bench_env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        started = None
        while time.monotonic() < deadline and process.poll() is None:
            logs = list((out / "killed").glob("*/run.log"))
            if logs and re.search(r"\] - run ", logs[0].read_text()):
                started = logs[0].parent
                break
            time.sleep(0.2)
        assert started is not None, "the run never started"
        time.sleep(1.0)  # well inside the stream (about 720k images)
        assert process.poll() is None, "the run ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not (started / RECORD_NAME).exists()
    assert not [p for p in started.iterdir() if p.suffix in (".csv", ".json")]
    with pytest.raises(ReportError, match="started but never wrote run.json"):
        make_report([out], tmp_path / "report")
