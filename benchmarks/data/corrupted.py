"""Readers for the official corrupted-dataset layouts (Hendrycks & Dietterich, ICLR 2019).

* CIFAR-10-C / CIFAR-100-C: ``<root>/CIFAR-10-C/<corruption>.npy``, uint8
  ``(5 * N, 32, 32, 3)`` with severity ``s`` in rows ``(s - 1) * N .. s * N - 1``, and
  ``labels.npy`` ``(5 * N,)``. Files written by ``scripts/make_cifar_c.py`` have the same
  layout and are read the same way.
* ImageNet-C: ``<root>/<corruption>/<severity>/<class>/*.JPEG``.

Spec: docs/METHODS.md §9.1.
"""

from __future__ import annotations

import hashlib
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
    checksums: str | Path | dict[str, str] | None = None,
) -> ImageArrays:
    """One corruption and severity of CIFAR-10-C / CIFAR-100-C, as RobustBench slices it.

    Returns the first ``n_examples`` images (all ``N`` by default) of that severity's block,
    in file order, with their labels. The ``.npy`` files are memory-mapped, so only the
    requested rows are read.

    Checksums (:func:`verify_files`): files written by ``scripts/make_cifar_c.py`` are checked
    against the sha256 recorded in its ``generation.json``; official files against the
    checksums a user gives, as ``checksums`` (a ``{file name: hex digest}`` dict or a file in
    ``sha256sum``/``md5sum`` format) or as a :data:`CHECKSUM_FILE` in the folder. A mismatch
    raises ``ValueError``.
    """
    _check_severity(severity)
    folder = cifar_c_dir(root, dataset)
    path = folder / f"{corruption}.npy"
    if not path.is_file():
        available = sorted(p.stem for p in folder.glob("*.npy") if p.stem != "labels")
        raise FileNotFoundError(f"{path} not found; corruptions in {folder}: {', '.join(available) or 'none'}")
    _check_generated(folder, corruption, severity)
    verify_files(folder, [path.name, "labels.npy"], checksums)
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


#: A user's checksums of official files in a CIFAR-C folder (``sha256sum`` or ``md5sum`` format).
CHECKSUM_FILE = "SHA256SUMS"

#: Files already verified in this process: (path, size, mtime) -> digest.
_VERIFIED: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file (``algorithm``: ``sha256`` or ``md5``), read in 1 MiB chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_checksums(source: str | Path | dict[str, str]) -> dict[str, str]:
    """``{file name: hex digest}`` from a dict or a ``sha256sum``/``md5sum``-style file."""
    if isinstance(source, dict):
        return {Path(k).name: str(v).lower() for k, v in source.items()}
    out = {}
    for number, line in enumerate(Path(source).read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) not in (32, 64):
            raise ValueError(f"{source}:{number}: expected '<md5 or sha256 hex>  <file name>', got {line!r}")
        out[Path(parts[1].lstrip("*")).name] = parts[0].lower()
    return out


def expected_checksums(folder: Path, checksums: str | Path | dict[str, str] | None = None) -> tuple[dict[str, str], str]:
    """The checksums to verify a folder's files against, and where they come from."""
    if checksums is not None:
        return read_checksums(checksums), str(checksums) if not isinstance(checksums, dict) else "the given checksums"
    sidecar = folder / GENERATION_SIDECAR
    if sidecar.is_file():
        recorded = json.loads(sidecar.read_text()).get("files")
        if recorded:
            return dict(recorded), str(sidecar)
    user = folder / CHECKSUM_FILE
    if user.is_file():
        return read_checksums(user), str(user)
    return {}, ""


def verify_files(folder: Path, names: list[str], checksums: str | Path | dict[str, str] | None = None) -> None:
    """Raise ``ValueError`` when a file's digest differs from the expected one (files without
    an expected digest pass; each file is hashed once per process while it is unchanged)."""
    expected, origin = expected_checksums(folder, checksums)
    for name in names:
        want = expected.get(name)
        if want is None:
            continue
        path = folder / name
        stat = path.stat()
        algorithm = "md5" if len(want) == 32 else "sha256"
        key = (f"{path.resolve()}:{algorithm}", stat.st_size, stat.st_mtime_ns)
        if key not in _VERIFIED:
            _VERIFIED[key] = file_digest(path, algorithm)
        if _VERIFIED[key] != want:
            raise ValueError(
                f"{path}: {algorithm} {_VERIFIED[key]} differs from {want} recorded in {origin}; the file is "
                "corrupt or was changed (download or generate it again)"
            )


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
