"""The experiment scripts name only valid configs: every `benchmarks.run` call they would
make composes and passes the app's pre-flight checks (a typo in an override otherwise
shows up hours into a run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

import benchmarks.app  # noqa: F401  (schema + resolvers)
from benchmarks.app.checks import check_config
from tests.conftest import shared_data_dir

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ("run_full_length.sh", "run_stream_selection.sh")
#: overrides that only say where and how a sweep runs
LAUNCH_KEYS = ("name", "paths.output_root", "launcher", "runtime.num_threads")


def recorded_calls(script: str, tmp_path: Path) -> list[list[str]]:
    """Run ``script`` with ``PY`` replaced by a recorder; the argument lists it was called with."""
    log = tmp_path / "calls.jsonl"
    recorder = tmp_path / "recorder.py"
    recorder.write_text(f"import json, sys\nopen({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    stub = tmp_path / "py"
    stub.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{recorder}" "$@"\n')
    stub.chmod(0o755)
    env = {**os.environ, "PY": str(stub), "OUT": str(tmp_path / "out")}
    subprocess.run(["bash", str(ROOT / "scripts" / script)], env=env, check=True, cwd=ROOT, timeout=120)
    return [json.loads(line) for line in log.read_text().splitlines()]


def sweep_variants(overrides: list[str]) -> list[list[str]]:
    """One override list per swept value (``k=a,b``), the other sweeps at their first value:
    every value is checked once without the product of all sweeps."""
    fixed = [o for o in overrides if o.split("=", 1)[0] not in LAUNCH_KEYS]

    def values(override: str) -> list[str]:
        key, _, value = override.partition("=")
        if value.startswith(("[", "'", '"', "{")) or "," not in value:
            return [override]
        return [f"{key}={v}" for v in value.split(",")]

    first = [values(o)[0] for o in fixed]
    variants = [first]
    for i, override in enumerate(fixed):
        for value in values(override)[1:]:
            variants.append([*first[:i], value, *first[i + 1 :]])
    return variants


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_runs_compose_and_pass_the_checks(script: str, tmp_path: Path) -> None:
    if not (shared_data_dir() / "cifar10-jpeg-test.tar.gz").is_file():
        pytest.skip("the CIFAR-10 streams' checks need ../shared/data (or $TTA_SHARED_DATA)")
    calls = [c for c in recorded_calls(script, tmp_path) if c[:2] == ["-m", "benchmarks.run"]]
    assert calls, f"{script} made no benchmarks.run call"
    seen: set[str] = set()  # overrides already checked in some composition
    checked = 0
    with initialize_config_module(config_module="conf", version_base="1.3"):
        for call in calls:
            assert call[2] == "-m", f"{script}: every run is a multirun sweep: {call}"
            for overrides in sweep_variants(call[3:]):
                if checked and seen.issuperset(overrides) and len(overrides) > 1:
                    continue  # the pools repeat from call to call: each value once is enough
                check_config(compose(config_name="config", overrides=overrides))
                seen.update(overrides)
                checked += 1
    assert checked >= 1


def test_sweep_variants_check_every_value_once() -> None:
    variants = sweep_variants(["name=x", "method=a,b,c", "seed=1", "stream.domains=[fog,snow]", "stream.label_order=iid,sorted"])
    assert variants == [
        ["method=a", "seed=1", "stream.domains=[fog,snow]", "stream.label_order=iid"],
        ["method=b", "seed=1", "stream.domains=[fog,snow]", "stream.label_order=iid"],
        ["method=c", "seed=1", "stream.domains=[fog,snow]", "stream.label_order=iid"],
        ["method=a", "seed=1", "stream.domains=[fog,snow]", "stream.label_order=sorted"],
    ]
