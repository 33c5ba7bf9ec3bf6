"""The source models committed to the repository (``weights/``), with their checksums.

Training a CIFAR-10 source model takes hours on a CPU, so every model is trained once and its
checkpoint committed under ``weights/`` beside ``weights/MANIFEST.json``: per file its
sha256, size, clean accuracy and training record. A model config names a model by its name
(``checkpoint: ${tta.weights:cifar10_resnet26}``): the committed file when the repository
holds one, else ``<cache>/models/<name>.pt`` (where ``scripts/train_source.py`` writes). A
committed file is verified against its manifest sha256 before it is loaded, so every result
made with it names the same weights (the protocol's ``model.checkpoint_sha256``).

    python -m benchmarks.models.weights add ~/.cache/tta/models/cifar10_resnet26.pt   # commit a trained model
    python -m benchmarks.models.weights verify                                         # check every file
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"
MANIFEST = WEIGHTS_DIR / "MANIFEST.json"


class WeightsMismatch(RuntimeError):
    """A committed weights file does not match its manifest."""


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest() -> dict[str, Any]:
    """``{"models": {name: entry}}`` of the committed weights (empty when there are none)."""
    if not MANIFEST.is_file():
        return {"models": {}}
    return json.loads(MANIFEST.read_text())


def committed_path(name: str) -> Path | None:
    """The committed checkpoint of model ``name``, or None."""
    entry = manifest()["models"].get(name)
    if entry is None:
        return None
    path = WEIGHTS_DIR / entry["file"]
    return path if path.is_file() else None


def resolve(name: str, cache_dir: str) -> str:
    """The checkpoint a model config should load: committed, else the cache's."""
    committed = committed_path(name)
    return str(committed) if committed is not None else str(Path(cache_dir) / "models" / f"{name}.pt")


def verify_file(path: str | Path) -> None:
    """Raise :class:`WeightsMismatch` if ``path`` is a committed file whose bytes differ from
    the manifest (a file outside ``weights/`` is not checked)."""
    path = Path(path).resolve()
    if path.parent != WEIGHTS_DIR.resolve():
        return
    entries = [e for e in manifest()["models"].values() if e["file"] == path.name]
    if not entries:
        raise WeightsMismatch(f"{path} is in weights/ but not in {MANIFEST.name}")
    actual = sha256_of(path)
    if actual != entries[0]["sha256"]:
        raise WeightsMismatch(f"{path} has sha256 {actual}, the manifest says {entries[0]['sha256']}")


def add(checkpoint: str | Path, note: str = "") -> dict[str, Any]:
    """Copy a checkpoint written by ``scripts/train_source.py`` into ``weights/`` and record it."""
    import torch

    source = Path(checkpoint)
    content = torch.load(source, map_location="cpu", weights_only=True)
    config = content.get("config", {})
    name = str(config.get("name") or source.stem)
    WEIGHTS_DIR.mkdir(exist_ok=True)
    target = WEIGHTS_DIR / f"{name}.pt"
    shutil.copyfile(source, target)
    train = config.get("train", {})
    entry = {
        "file": target.name,
        "sha256": sha256_of(target),
        "bytes": target.stat().st_size,
        "clean_accuracy": content.get("clean_accuracy"),
        "arch": config.get("arch"),
        "kwargs": config.get("kwargs"),
        "epochs": train.get("epochs"),
        "training": {
            "recipe": train,
            "data": config.get("data"),
            "device": config.get("device"),
            "threads": config.get("threads"),
            "minutes": round(float(config.get("seconds", 0.0)) / 60, 1),
            "history": content.get("history"),
        },
        "added": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "note": note,
    }
    data = manifest()
    data["models"][name] = entry
    MANIFEST.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.models.weights", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    adding = sub.add_parser("add", help="commit a trained checkpoint into weights/")
    adding.add_argument("checkpoint")
    adding.add_argument("--note", default="")
    sub.add_parser("verify", help="check every committed file against the manifest")
    args = parser.parse_args(argv)
    if args.command == "add":
        entry = add(args.checkpoint, args.note)
        print(f"weights/{entry['file']}: sha256 {entry['sha256']}, clean accuracy {entry['clean_accuracy']}")
        return 0
    failed = 0
    for name, entry in manifest()["models"].items():
        try:
            verify_file(WEIGHTS_DIR / entry["file"])
            print(f"ok {name}: {entry['file']} {entry['sha256'][:12]}")
        except (WeightsMismatch, FileNotFoundError) as error:
            failed += 1
            print(f"FAILED {name}: {error}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
