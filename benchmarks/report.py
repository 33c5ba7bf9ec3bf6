"""Aggregate finished benchmark runs into a markdown report and PNG plots.

    python -m benchmarks.report outputs/digits_quick [more dirs ...] [--out DIR] [--no-plots]

Reads every ``run.json`` under the given directories (the completion records written by
``python -m benchmarks.run``; runs without one were interrupted and are not read) and writes
into ``--out`` (default: ``<dir>/report`` for one directory, ``./report`` for several):

* ``report.md``: methods x settings table of the mean online error, then per-domain tables;
* ``summary.csv``: the same numbers, one row per (method, setting);
* ``error_over_stream.png`` and ``domain_errors.png``.

Runs are put side by side only when their protocol fingerprints agree on everything but
the swept keys (method, seeds, the config keys their overrides vary, and ``--swept``);
otherwise each protocol group gets its own tables (files ``*_group<k>.png``) headed by what
differs (:mod:`benchmarks.app.compare`).

The markdown is also printed. An empty directory, or one holding no tta-bench runs, is an
error (exit status 2) that says what was found instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.app.aggregate import build_table, markdown, summary_csv
from benchmarks.app.compare import group_runs
from benchmarks.app.records import RECORD_NAME, scan_runs
from benchmarks.files import atomic_write_text

logger = logging.getLogger("benchmarks.report")


class ReportError(Exception):
    """Nothing (valid) to report on; the message says why."""


def default_out_dir(dirs: Sequence[Path]) -> Path:
    return dirs[0] / "report" if len(dirs) == 1 else Path("report")


def make_report(
    dirs: Sequence[str | Path], out: str | Path | None = None, *, plots: bool = True, swept: Sequence[str] = ()
) -> dict[str, Path]:
    """Write the report files for the runs under ``dirs``; returns their paths by kind.

    Runs share a table only when their protocols agree except for the swept keys
    (:mod:`benchmarks.app.compare`); ``swept`` names more of them.
    """
    paths = [Path(d) for d in dirs]
    if not paths:
        raise ReportError("no directories given")
    for path in paths:
        if not path.exists():
            raise ReportError(f"no such directory: {path}")
        if not path.is_dir():
            raise ReportError(f"not a directory: {path} (pass the folder of a run or of a sweep)")
    out_dir = Path(out) if out is not None else default_out_dir(paths)
    scan = scan_runs(paths, exclude=[out_dir])
    where = ", ".join(str(p) for p in paths)
    if not scan.finished:
        if scan.unfinished:
            listed = ", ".join(str(p) for p in scan.unfinished[:5]) + (" ..." if len(scan.unfinished) > 5 else "")
            raise ReportError(
                f"no finished runs under {where}: {len(scan.unfinished)} run folder(s) were started but never "
                f"wrote {RECORD_NAME} (interrupted, failed or still running): {listed}. "
                "Re-run the same command to finish them; finished runs are skipped."
            )
        if scan.foreign:
            raise ReportError(f"no tta-bench runs under {where}; found foreign files: " + "; ".join(scan.foreign[:5]))
        raise ReportError(
            f"no tta-bench runs under {where}: expected run folders holding {RECORD_NAME}, written by "
            "`python -m benchmarks.run` into <paths.output_root>/<name>/<run id>/"
        )
    notes = []
    if scan.unfinished:
        notes.append(f"{len(scan.unfinished)} started run(s) without {RECORD_NAME} (interrupted or running) are not included.")
    if scan.foreign:
        notes.append(f"{len(scan.foreign)} foreign {RECORD_NAME} file(s) ignored.")
    comparison = group_runs(scan.finished, swept)
    groups = comparison.groups
    if len(groups) > 1:
        notes.append(
            f"the runs fall into {len(groups)} protocol groups that differ in keys nobody swept "
            f"({', '.join(comparison.differing_keys) or 'a missing protocol block'}); each group gets its own "
            "tables, so numbers of different protocols are never side by side (keys that may differ within a "
            f"table: {', '.join(comparison.swept_prefixes)}). If a difference is intended, name it with --swept KEY "
            "(a config key such as model, or a protocol key such as model.weights_sha256)."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    sections, tables = [], []
    for number, group in enumerate(groups, start=1):
        table = build_table(group.records)
        tables.append(table)
        suffix = "" if len(groups) == 1 else f"_group{number}"
        plot_files: dict[str, str] = {}
        if plots:
            from benchmarks.app.plots import domain_bars, error_over_stream

            written[f"error_over_stream{suffix}"] = error_over_stream(table, out_dir / f"error_over_stream{suffix}.png")
            written[f"domain_errors{suffix}"] = domain_bars(table, out_dir / f"domain_errors{suffix}.png")
            plot_files = {"error over the stream": f"error_over_stream{suffix}.png", "per-domain error": f"domain_errors{suffix}.png"}
        title = "# tta-bench report" if len(groups) == 1 else f"# Protocol group {number} of {len(groups)}: {group.describe()}"
        sections.append(markdown(table, sources=[str(p) for p in paths], notes=notes if number == 1 else None, plots=plot_files, title=title))
    written["csv"] = atomic_write_text(out_dir / "summary.csv", summary_csv(tables))
    written["markdown"] = atomic_write_text(out_dir / "report.md", "\n".join(sections))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="sweep or run folders (searched recursively for run.json)")
    parser.add_argument("--out", help="output folder (default: <dir>/report, or ./report for several dirs)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--quiet", action="store_true", help="do not print the markdown")
    parser.add_argument(
        "--swept", nargs="*", default=[], metavar="KEY",
        help="more keys the runs may differ in and still share a table (config keys such as model, "
        "or protocol keys such as software.git_commit); method and seeds always may",
    )
    args = parser.parse_args(argv)
    try:
        files = make_report(args.dirs, args.out, plots=not args.no_plots, swept=args.swept)
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(files["markdown"].read_text(encoding="utf-8"))
    print(f"report written to {files['markdown'].parent}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
