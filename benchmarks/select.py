"""Choose a default rule by measurement: a development sweep chooses, an evaluation sweep scores.

    python -m benchmarks.select dev=outputs/dev eval=outputs/eval out=outputs/selection
    python -m benchmarks.select 'dev=[a,b]' 'eval=[c]' 'methods=[source,norm,roid]' max_source_regret=0.5

Reads the ``run.json`` records under ``dev`` and ``eval`` (written by ``python -m
benchmarks.run``), scores every candidate rule (each method alone, today's ``auto``, the best
rule per model feature) on every stream, chooses on the dev streams alone and writes into
``out``:

* ``rule.json``: the chosen rule, the criterion, its dev and eval summary, every candidate;
* ``regret.md``: summary and per-stream tables (regret vs the best method and vs source);
* ``regret_streams.csv`` (one row per split, rule and stream) and ``regret_summary.csv``.

The criterion and the refusals are in :mod:`benchmarks.app.selection`. Configs:
``conf/select.yaml``. Exit status 2 with a message when the runs cannot be compared.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

import benchmarks.app  # noqa: F401  (registers the tta.* resolvers)
from benchmarks.app.records import RECORD_NAME, scan_runs
from benchmarks.app.selection import SelectError, Selection, markdown, rule_json, select, streams_csv, summary_csv
from benchmarks.files import atomic_write_text

logger = logging.getLogger("benchmarks.select")


def _dirs(value: Any, name: str) -> list[Path]:
    items = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    paths = [Path(str(v)) for v in items if v is not None and str(v)]
    if not paths:
        raise SelectError(f"{name}: no folder given")
    for path in paths:
        if not path.is_dir():
            raise SelectError(f"{name}: not a directory: {path}")
    return paths


def _finished(paths: Sequence[Path], name: str, out: Path) -> list[dict[str, Any]]:
    scan = scan_runs(list(paths), exclude=[out])
    if scan.unfinished:
        logger.warning("%s: %d started run(s) without %s are not read", name, len(scan.unfinished), RECORD_NAME)
    if not scan.finished:
        raise SelectError(f"{name}: no finished runs ({RECORD_NAME}) under {', '.join(map(str, paths))}")
    return scan.finished


def run_selection(
    dev: Any, eval_: Any, out: str | Path, **options: Any
) -> tuple[Selection, dict[str, Path]]:
    """Select from the runs under ``dev``, score on ``eval_``, write the files into ``out``."""
    out_dir = Path(out)
    dev_dirs, eval_dirs = _dirs(dev, "dev"), _dirs(eval_, "eval")
    overlap = {p.resolve() for p in dev_dirs} & {p.resolve() for p in eval_dirs}
    if overlap:
        raise SelectError(f"the same folder is given as dev and eval: {', '.join(map(str, sorted(overlap)))}")
    dev_records = _finished(dev_dirs, "dev", out_dir)
    eval_records = _finished(eval_dirs, "eval", out_dir)
    selection = select(dev_records, eval_records, **options)
    sources = {"dev": [str(p) for p in dev_dirs], "eval": [str(p) for p in eval_dirs]}
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "rule": atomic_write_text(out_dir / "rule.json", json.dumps(rule_json(selection, sources), indent=2) + "\n"),
        "markdown": atomic_write_text(out_dir / "regret.md", markdown(selection, sources)),
        "streams_csv": atomic_write_text(out_dir / "regret_streams.csv", streams_csv(selection)),
        "summary_csv": atomic_write_text(out_dir / "regret_summary.csv", summary_csv(selection)),
    }
    return selection, files


def task(cfg: DictConfig) -> int:
    missing = [key for key in ("dev", "eval") if OmegaConf.is_missing(cfg, key)]
    if missing:
        print(f"error: give {' and '.join(f'{k}=<folder or [folders]>' for k in missing)} (see conf/select.yaml)", file=sys.stderr)
        sys.exit(2)
    methods = list(cfg.methods) if cfg.methods is not None else None
    try:
        _, files = run_selection(
            cfg.dev, cfg.eval, cfg.out, methods=methods, swept=list(cfg.swept), ignore=list(cfg.ignore),
            max_source_regret=float(cfg.max_source_regret), target_regret=float(cfg.target_regret),
            features=list(cfg.features),
        )
    except SelectError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if not cfg.quiet:
        print(files["markdown"].read_text(encoding="utf-8"))
    print(f"selection written to {files['rule'].parent}", file=sys.stderr)
    return 0


def main() -> None:
    hydra.main(config_path="pkg://conf", config_name="select", version_base="1.3")(task)()


if __name__ == "__main__":
    main()
