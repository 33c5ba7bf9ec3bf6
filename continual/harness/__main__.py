"""``python -m continual.harness submission=<file> [key=value ...]``: run, score, record.

Keys are the fields of :class:`continual.harness.config.HarnessConfig`; see
docs/COMPETITION.md. Exit status 0 when the submission was scored (or for ``--help``), 1
when it failed (the failure is recorded), 2 for a bad command line (a submission file that
does not exist included; nothing is recorded) or when the submission sandbox cannot be built
on this machine (pass unsafe_no_sandbox=true to run unprotected).
"""

from __future__ import annotations

import sys

from pathlib import Path

from continual.harness.app import run_competition
from continual.harness.config import parse_overrides
from continual.harness.sandbox import SandboxUnavailable


def _protect_memory() -> None:
    # Linux: make this process non-dumpable, so that an unprivileged process of the same
    # user cannot read the test labels from /proc/<pid>/mem.
    try:
        import ctypes

        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments and arguments[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if not arguments:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        config = parse_overrides(arguments)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not Path(config.submission).is_file():  # a typo: no record, no leaderboard in the cwd
        print(f"error: submission file {config.submission} does not exist", file=sys.stderr)
        return 2
    _protect_memory()
    try:
        if config.tuning_benchmark:
            from continual.harness.tuning import run_two_phase

            record = run_two_phase(config, progress=True)
        else:
            record = run_competition(config, progress=True)  # a bar on a terminal, lines in logs
    except SandboxUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if record["status"] == "ok":
        metrics = ", ".join(f"{k} {100 * v:.2f}" for k, v in record["metrics"].items() if k.startswith(("A_", "F_")) and v is not None)
        print(f"{record['name']}: {metrics} ({record['run_s']:.1f} s)")
        if record.get("tuning"):
            tuning = record["tuning"]
            print(f"frozen values {tuning['best_hparams']}, tuning {tuning['criterion']} "
                  f"{100 * tuning['best_metrics'][tuning['criterion']]:.2f} ({len(tuning['trials'])} points, {tuning['spent_s']:.0f} s)")
    else:
        print(f"{record['name']}: {record['status']}: {record['reason']}")
    print(f"record: {record['record']}\nleaderboard: {config.results_dir}/leaderboard.md")
    return 0 if record["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
