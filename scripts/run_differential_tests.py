#!/usr/bin/env python
"""Run every differential test against the official implementations; fail on any skip.

    python scripts/run_differential_tests.py --checkouts ~/official    # a folder of checkouts
    TRIBE_OFFICIAL_SRC=... SAR_OFFICIAL_SRC=... python scripts/run_differential_tests.py

A folder of checkouts holds one folder per repository, named as the repository
(``TRIBE``, ``RoTTA``, ``test-time-adaptation``, ``SAR``, ``EATA``, ``Si-Blurry``, ``AdaB2N``);
a variable that is already set wins over the folder. The variables and repositories are listed
in docs/DIFFERENTIAL_TESTS.md. The tests are those marked ``@pytest.mark.official``; they run
with ``TTA_REQUIRE_OFFICIAL=1``, so a checkout that is missing fails instead of skipping. The
last line is the summary: counts, then each checkout with its commit. Exit status 0 only when
every test passed and none was skipped.

Run it before submitting any change under ``tta/``, ``benchmarks/streams``,
``benchmarks/corruptions`` or ``continual/layers``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.official import CHECKOUTS, REQUIRE_ENV, resolve  # noqa: E402


def _commit(root: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "log", "-1", "--format=%h %cs"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return "no git"
    return out.stdout.strip() or "no git"


def _environment(checkouts: Path | None) -> tuple[dict[str, str], list[str], list[str]]:
    """The test environment, a description of each checkout found, and the variables missing."""
    env = dict(os.environ)
    found, missing = [], []
    for checkout in CHECKOUTS:
        value = env.get(checkout.variable) or (str(checkouts / checkout.folder) if checkouts else "")
        root = resolve(checkout.variable, value)
        if root is None:
            missing.append(f"{checkout.variable} ({checkout.repository})")
            env.pop(checkout.variable, None)
            continue
        env[checkout.variable] = str(root)
        found.append(f"{checkout.variable}={root.name}@{_commit(root)}")
    env[REQUIRE_ENV] = "1"
    return env, found, missing


def _counts(report: Path) -> dict[str, int]:
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        if "skipped" in kinds:
            counts["skipped"] += 1
        elif "error" in kinds:
            counts["errors"] += 1
        elif "failure" in kinds:
            counts["failed"] += 1
        else:
            counts["passed"] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkouts", type=Path, help="folder holding one checkout per official repository")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    env, found, missing = _environment(args.checkouts.expanduser().resolve() if args.checkouts else None)
    for line in missing:
        print(f"missing checkout: {line}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        command = [
            sys.executable, "-m", "pytest", "-q", "-rfEs", "-m", "official", f"--junitxml={report}", "tests",
            *args.pytest_args,
        ]
        status = subprocess.run(command, cwd=ROOT, env=env).returncode
        counts = _counts(report) if report.is_file() else {"passed": 0, "failed": 0, "skipped": 0, "errors": 1}
    total = sum(counts.values())
    ok = status == 0 and total > 0 and counts["passed"] == total and not missing
    summary = ", ".join(f"{n} {kind}" for kind, n in counts.items())
    print(f"differential tests: {'OK' if ok else 'FAILED'}: {summary} of {total}; checkouts: {'; '.join(found) or 'none'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
