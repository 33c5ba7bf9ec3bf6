"""Slow: real sweeps on a local Ray instance and with submitit's local executor, and the
app running from a pip-installed copy of the project (configs shipped as package data).

Run with ``python -m pytest tests/benchmarks/test_app_launchers.py -m slow``.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.app.records import RECORD_NAME, read_record
from benchmarks.report import make_report
from tests.benchmarks.test_app import ROOT, TINY, bench, make_bench_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench_env() -> dict[str, str]:
    return make_bench_env()


def _finished(sweep: Path) -> dict[str, dict]:
    return {read_record(p)["method"]["name"]: read_record(p) for p in sweep.glob(f"*/{RECORD_NAME}")}


def test_ray_launcher_sweep(bench_env: dict[str, str], tmp_path: Path) -> None:
    if importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None:  # an optional extra, not a dependency
        pytest.skip("the [ray] extra is not installed (pip install -e .[ray])")
    args = ["-m", *TINY, "launcher=ray", "method=source,norm,unmix_tns", f"paths.output_root={tmp_path / 'out'}", "name=ray"]
    result = bench(args, bench_env, tmp_path, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Ray Launcher is launching 3 jobs" in output
    assert "Started a local Ray instance" in output
    finished = _finished(tmp_path / "out" / "ray")
    assert sorted(finished) == ["norm", "source", "unmix_tns"]
    markdown = make_report([tmp_path / "out" / "ray"])["markdown"].read_text()
    assert "| unmix_tns |" in markdown


def test_submitit_local_launcher_sweep(bench_env: dict[str, str], tmp_path: Path) -> None:
    args = ["-m", *TINY, "launcher=submitit_local", "method=source,norm", f"paths.output_root={tmp_path / 'out'}", "name=sub"]
    result = bench(args, bench_env, tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(_finished(tmp_path / "out" / "sub")) == ["norm", "source"]


def test_runs_from_a_pip_installed_copy(bench_env: dict[str, str], tmp_path: Path) -> None:
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns(".venv", ".git", "outputs", "multirun", "build", "dist", "*.egg-info", "__pycache__", "*.pt")
    source.mkdir()
    for name in ("setup.cfg", "README.md", "setup.py", "pyproject.toml", "MANIFEST.in"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, source / name)
    for package in ("tta", "benchmarks", "continual", "conf"):
        shutil.copytree(ROOT / package, source / package, ignore=ignore)
    target = tmp_path / "installed"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=600,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert (target / "conf" / "experiment" / "digits_quick.yaml").is_file()
    env = dict(bench_env, PYTHONPATH=str(target))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([sys.executable, "-c", "import conf, benchmarks.run; print(conf.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True)
    assert where.stdout.strip().startswith(str(target)), where.stdout + where.stderr
    result = bench([*TINY, "method=norm", f"paths.output_root={elsewhere / 'out'}"], env, elsewhere)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(list((elsewhere / "out" / "digits_quick").glob(f"*/{RECORD_NAME}"))) == 1
