"""Readers for the official corrupted-dataset layouts (Hendrycks & Dietterich, ICLR 2019).

* CIFAR-10-C / CIFAR-100-C: ``<root>/CIFAR-10-C/<corruption>.npy``, uint8
  ``(5 * N, 32, 32, 3)`` with severity ``s`` in rows ``(s - 1) * N .. s * N - 1``, and
  ``labels.npy`` ``(5 * N,)``. Files written by ``scripts/make_cifar_c.py`` have the same
  layout and are read the same way.
* ImageNet-C: ``<root>/<corruption>/<severity>/<class>/*.JPEG``.

Spec ``ALGORITHMS.md`` §9.1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks.data.base import ImageArrays
from benchmarks.data.cifar import CIFAR_CLASSES
from benchmarks.data.folder import load_image_folder

CIFAR_C_DIRS = {"cifar10": "CIFAR-10-C", "cifar100": "CIFAR-100-C"}
N_SEVERITIES = 5
GENERATION_SIDECAR = "generation.json"  # written by scripts/make_cifar_c.py


def _check_severity(severity: int) -> None:
    if isinstance(severity, bool) or severity not in range(1, N_SEVERITIES + 1):
        raise ValueError(f"severity must be in 1..{N_SEVERITIES}, got {severity!r}")


def cifar_c_dir(root: str | Path, dataset: str = "cifar10") -> Path:
    """``<root>/CIFAR-10-C`` (or ``-100-C``); ``root`` may also be that folder itself."""
    if dataset not in CIFAR_C_DIRS:
        raise ValueError(f"dataset must be one of {tuple(CIFAR_C_DIRS)}, got {dataset!r}")
    root = Path(root).expanduser()
    name = CIFAR_C_DIRS[dataset]
    folder = root if root.name == name else root / name
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} not found: download {name} (Hendrycks & Dietterich, zenodo.org/record/2535967 "
            f"for CIFAR-10-C, zenodo.org/record/3555552 for CIFAR-100-C) or generate it with "
            f"scripts/make_cifar_c.py --out {root}"
        )
    return folder


def load_cifar_c(
    root: str | Path,
    corruption: str,
    severity: int,
    n_examples: int | None = None,
    dataset: str = "cifar10",
) -> ImageArrays:
    """One corruption and severity of CIFAR-10-C / CIFAR-100-C, as RobustBench slices it.

    Returns the first ``n_examples`` images (all ``N`` by default) of that severity's block,
    in file order, with their labels. The ``.npy`` files are memory-mapped, so only the
    requested rows are read.
    """
    _check_severity(severity)
    folder = cifar_c_dir(root, dataset)
    path = folder / f"{corruption}.npy"
    if not path.is_file():
        available = sorted(p.stem for p in folder.glob("*.npy") if p.stem != "labels")
        raise FileNotFoundError(f"{path} not found; corruptions in {folder}: {', '.join(available) or 'none'}")
    _check_generated(folder, corruption, severity)
    data = np.load(path, mmap_mode="r")
    labels = np.load(folder / "labels.npy", mmap_mode="r")
    if data.ndim != 4 or data.shape[-1] != 3 or data.shape[0] % N_SEVERITIES:
        raise ValueError(f"{path} has shape {data.shape}; expected (5 * N, H, W, 3)")
    per_severity = data.shape[0] // N_SEVERITIES
    if labels.shape[0] != data.shape[0]:
        raise ValueError(f"labels.npy has {labels.shape[0]} rows but {path.name} has {data.shape[0]}")
    if n_examples is not None and n_examples < 0:
        raise ValueError(f"n_examples must be >= 0, got {n_examples}")
    count = per_severity if n_examples is None else min(int(n_examples), per_severity)
    start = (severity - 1) * per_severity
    images = np.array(data[start : start + count], dtype=np.uint8)
    return ImageArrays(images, np.array(labels[start : start + count], dtype=np.int64), CIFAR_CLASSES[dataset])


def _check_generated(folder: Path, corruption: str, severity: int) -> None:
    """For generated sets, refuse severities the generator left empty (see its sidecar)."""
    sidecar = folder / GENERATION_SIDECAR
    if not sidecar.is_file():
        return  # official files: every severity present
    filled = json.loads(sidecar.read_text()).get("severities", {}).get(corruption)
    if filled is not None and severity not in filled:
        raise ValueError(f"{corruption} severity {severity} was not generated in {folder} (only {filled})")


def load_imagenet_c(
    root: str | Path,
    corruption: str,
    severity: int,
    *,
    size: int = 224,
    n_examples: int | None = None,
    seed: int = 0,
) -> ImageArrays:
    """One corruption and severity of ImageNet-C (``<root>/<corruption>/<severity>/<wnid>/*``).

    Images are decoded with Pillow, resized (shorter side to ``size``, bilinear) and
    centre-cropped to ``size x size`` (the released images are already 224x224, so the
    default is a no-op). Classes are the sorted WordNet-id folders. ``n_examples`` keeps a
    fixed pseudo-random subset (``seed``) in folder order, so it covers all classes; only
    that subset is decoded. Decoded arrays are cached (see ``folder.load_image_folder``).
    """
    _check_severity(severity)
    folder = Path(root).expanduser() / corruption / str(severity)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} not found: expected the ImageNet-C layout <root>/<corruption>/<severity>/<class>/"
        )
    return load_image_folder(folder, size=size, n_examples=n_examples, seed=seed)
