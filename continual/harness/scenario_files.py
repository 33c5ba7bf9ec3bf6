"""Scenario files: a competition stream frozen on disk, with checksums the harness verifies.

An organiser builds the stream once and publishes its checksums; every run then loads the
same bytes, and the harness refuses to run or to score when the files or the labels in
memory do not match (a silently changed scenario file would make earlier and later
leaderboard entries incomparable). A scenario folder holds::

    scenario.npz    the public part: training stream in presentation order, its task sizes,
                    test images in canonical order, class names, the settings it was built with
    labels.npy      the hidden test labels (canonical order)
    manifest.json   SHA-256 of both files, and of their contents (``scenario_sha256``,
                    ``labels_sha256``, the values the run records carry)

Write one with ``python -m continual.harness.scenario_files <folder> key=value ...`` (the
harness keys, e.g. ``benchmark=split_digits seed=0``), run on it with
``scenario_dir=<folder>`` and, to pin the published values, ``scenario_sha256=...
labels_sha256=...``. The harness adds the folder to the paths a submission may not read.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from continual.harness.config import HarnessConfig, parse_overrides
from continual.harness.task import CompetitionTask, ScenarioMismatch, assemble_task, build_task

#: the settings that define a scenario's content; a scenario folder fixes them.
SCENARIO_SETTINGS = ("benchmark", "data_part", "num_tasks", "seed", "train_per_class", "test_per_class")
_FILES = ("scenario.npz", "labels.npy")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_scenario(config: HarnessConfig, folder: str | Path) -> dict[str, Any]:
    """Build the stream of ``config`` and write it to ``folder``; returns the manifest."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    task = build_task(config, rng_seed=0)
    canonical = np.argsort(task.test_order)
    settings = {name: getattr(config, name) for name in SCENARIO_SETTINGS}
    with open(folder / "scenario.npz", "wb") as stream:
        np.savez(
            stream, train_images=task.train_images, train_labels=task.train_labels,
            task_sizes=np.asarray(task.task_sizes, dtype=np.int64), test_images=task.test_images[canonical],
            class_names=np.asarray(task.class_names), num_classes=np.int64(task.num_classes),
            settings=np.asarray(json.dumps(settings, sort_keys=True)),
        )
    np.save(folder / "labels.npy", task.test_labels[canonical])
    manifest = {
        "files": {name: _file_sha256(folder / name) for name in _FILES},
        "scenario_sha256": task.scenario_sha256,
        "labels_sha256": task.labels_sha256,
        "settings": settings,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def load_scenario(folder: str | Path, rng_seed: int | None = None) -> tuple[CompetitionTask, dict[str, Any]]:
    """The task stored in ``folder`` (test set freshly and secretly shuffled) and its settings.

    Raises:
        ScenarioMismatch: a file is missing or its bytes or contents differ from the manifest.
    """
    folder = Path(folder)
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ScenarioMismatch(f"no readable manifest.json in {folder}: {error}") from error
    for name in _FILES:
        path = folder / name
        if not path.is_file():
            raise ScenarioMismatch(f"scenario file {path} is missing")
        actual = _file_sha256(path)
        if actual != manifest["files"].get(name):
            raise ScenarioMismatch(f"{path} has sha256 {actual}, the manifest says {manifest['files'].get(name)}")
    with np.load(folder / "scenario.npz", allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    labels = np.load(folder / "labels.npy", allow_pickle=False)
    task = assemble_task(
        arrays["train_images"], arrays["train_labels"], tuple(int(n) for n in arrays["task_sizes"]),
        arrays["test_images"], labels, int(arrays["num_classes"]), tuple(str(c) for c in arrays["class_names"]), rng_seed,
    )
    # The bytes matched; the decoded contents must too (guards against a forged manifest
    # whose file hashes were updated but whose published content checksums were not).
    task.verify(manifest["scenario_sha256"], manifest["labels_sha256"])
    return task, json.loads(str(arrays["settings"]))


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if not arguments or arguments[0] in ("-h", "--help"):
        print(__doc__, file=sys.stdout if arguments else sys.stderr)
        return 0 if arguments else 2
    try:
        config = parse_overrides(["submission=-", *arguments[1:]])
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    manifest = save_scenario(config, arguments[0])
    print(json.dumps({k: manifest[k] for k in ("scenario_sha256", "labels_sha256", "settings")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
