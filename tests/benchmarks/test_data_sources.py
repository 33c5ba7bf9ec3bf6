"""Tests of the data sources: image folders + cache, the shared CIFAR-10 JPEG tarballs,
torchvision CIFAR errors, and the official CIFAR-10-C / ImageNet-C layouts."""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.data import (
    ImageArrays,
    cifar10_jpeg,
    load_cifar,
    load_cifar_c,
    load_image_folder,
    load_imagenet_c,
)
from benchmarks.data import folder as folder_module
from benchmarks.data.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES
from benchmarks.filelock import exclusive_lock


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("TTA_CACHE_DIR", str(cache))
    return cache


def _write_folder(root: Path, sizes: dict[str, list[tuple[int, int]]], fmt: str = "PNG") -> dict[str, list[np.ndarray]]:
    """Class folders of random images; returns the pixels written, per class."""
    rng = np.random.default_rng(0)
    written: dict[str, list[np.ndarray]] = {}
    for cls, shapes in sizes.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i, (h, w) in enumerate(shapes):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            suffix = ".png" if fmt == "PNG" else ".JPEG"
            Image.fromarray(pixels).save(root / cls / f"{i:03d}{suffix}", fmt)
            written.setdefault(cls, []).append(pixels)
    return written


def test_image_folder_labels_and_cache(tmp_path: Path, _private_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "folder"
    written = _write_folder(root, {"zebra": [(6, 5)] * 2, "ant": [(6, 5)] * 3, "moth": [(6, 5)]})
    (root / "ant" / "notes.txt").write_text("not an image")
    data = load_image_folder(root)
    assert isinstance(data, ImageArrays)
    assert data.classes == ("ant", "moth", "zebra")
    assert data.labels.tolist() == [0, 0, 0, 1, 2, 2]
    expected = np.stack(written["ant"] + written["moth"] + written["zebra"])
    np.testing.assert_array_equal(data.images, expected)
    cached = list((_private_cache / "image_folder").glob("*.npz"))
    assert len(cached) == 1

    def no_decoding(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(folder_module, "_decode", no_decoding)
    again = load_image_folder(root)
    np.testing.assert_array_equal(again.images, data.images)
    assert again.classes == data.classes and again.labels.dtype == np.int64

    monkeypatch.undo()
    monkeypatch.setenv("TTA_CACHE_DIR", str(_private_cache))
    _write_folder(root, {"moth": [(6, 5)] * 2})  # overwrites 000.png, adds 001.png
    changed = load_image_folder(root)
    assert len(changed) == 7 and len(list((_private_cache / "image_folder").glob("*.npz"))) == 2


def test_image_folder_resize_subset_and_errors(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    _write_folder(root, {"a": [(20, 30), (31, 17)], "b": [(16, 16), (40, 20), (25, 25)]})
    with pytest.raises(ValueError, match="size"):
        load_image_folder(root)
    resized = load_image_folder(root, size=16)
    assert resized.images.shape == (5, 16, 16, 3)
    subset = load_image_folder(root, size=16, n_examples=3)
    assert len(subset) == 3 and np.all(np.diff(subset.labels) >= 0)
    assert subset.images.shape == (3, 16, 16, 3)
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        load_image_folder(tmp_path / "empty")


def test_shared_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TTA_SHARED_DATA", raising=False)
    repo_root = Path(folder_module.__file__).resolve().parents[2]
    assert folder_module.shared_data_dir() == repo_root.parent / "shared" / "data"
    monkeypatch.setenv("TTA_SHARED_DATA", str(tmp_path))
    assert folder_module.shared_data_dir() == tmp_path


def _jpeg_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_cifar10_jpeg_from_a_small_tarball(tmp_path: Path, _private_cache: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    rng = np.random.default_rng(1)
    with tarfile.open(shared / "cifar10-jpeg-test.tar.gz", "w:gz") as archive:
        for cls in ("cat", "airplane"):
            for i in range(2):
                data = _jpeg_bytes(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
                info = tarfile.TarInfo(f"test/{cls}/{i:04d}.jpg")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    data = cifar10_jpeg("test", shared_dir=shared)
    assert data.classes == ("airplane", "cat") and data.labels.tolist() == [0, 0, 1, 1]
    assert data.images.shape == (4, 32, 32, 3)
    marker = _private_cache / "cifar10-jpeg" / ".test.extracted"
    stamp = marker.stat().st_mtime_ns
    again = cifar10_jpeg("test", shared_dir=shared)  # no second extraction
    assert marker.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(again.images, data.images)
    with pytest.raises(FileNotFoundError, match="TTA_SHARED_DATA"):
        cifar10_jpeg("train", shared_dir=shared)
    with pytest.raises(ValueError):
        cifar10_jpeg("val", shared_dir=shared)


def test_cifar10_jpeg_extraction_waits_for_a_concurrent_one(tmp_path: Path, _private_cache: Path) -> None:
    """A second loader (another sweep worker) must not extract over a running extraction."""
    shared = tmp_path / "shared"
    shared.mkdir()
    with tarfile.open(shared / "cifar10-jpeg-test.tar.gz", "w:gz") as archive:
        data = _jpeg_bytes(np.zeros((32, 32, 3), dtype=np.uint8))
        info = tarfile.TarInfo("test/cat/0000.jpg")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    target = _private_cache / "cifar10-jpeg"
    target.mkdir(parents=True)
    results: list[ImageArrays] = []
    with exclusive_lock(target / ".test.lock"):
        worker = threading.Thread(target=lambda: results.append(cifar10_jpeg("test", shared_dir=shared)))
        worker.start()
        worker.join(timeout=0.5)
        assert worker.is_alive() and not (target / "test").exists()
    worker.join(timeout=30)
    assert not worker.is_alive() and results[0].classes == ("cat",)


def test_cifar10_jpeg_shared_test_split() -> None:
    tarball = folder_module.shared_data_dir() / "cifar10-jpeg-test.tar.gz"
    if not tarball.is_file():
        pytest.skip(f"{tarball} not present")
    data = cifar10_jpeg("test")
    assert data.images.shape == (10000, 32, 32, 3) and data.images.dtype == np.uint8
    assert data.classes == CIFAR10_CLASSES
    assert np.bincount(data.labels).tolist() == [1000] * 10


def test_load_cifar_missing_dataset_is_explained(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)) as info:
        load_cifar("cifar10", tmp_path, train=False)
    assert "download=True" in str(info.value)
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_cifar("cifar100", tmp_path, train=True)
    with pytest.raises(ValueError):
        load_cifar("mnist", tmp_path, train=True)
    assert len(CIFAR100_CLASSES) == 100 and list(CIFAR100_CLASSES) == sorted(CIFAR100_CLASSES)


def _write_cifar_c(root: Path, name: str, n: int, corruptions: tuple[str, ...]) -> np.ndarray:
    folder = root / name
    folder.mkdir(parents=True)
    labels = np.tile(np.arange(n) % 10, 5).astype(np.uint8)
    np.save(folder / "labels.npy", labels)
    for k, corruption in enumerate(corruptions):
        data = np.zeros((5 * n, 32, 32, 3), dtype=np.uint8)
        for s in range(5):
            for i in range(n):  # pixel value encodes (corruption, severity, index)
                data[s * n + i] = (k * 100 + (s + 1) * 10 + i) % 256
        np.save(folder / f"{corruption}.npy", data)
    return labels


def test_cifar_c_official_layout(tmp_path: Path) -> None:
    labels = _write_cifar_c(tmp_path, "CIFAR-10-C", 7, ("fog", "snow"))
    for severity in range(1, 6):
        data = load_cifar_c(tmp_path, "snow", severity)
        assert data.images.shape == (7, 32, 32, 3) and data.classes == CIFAR10_CLASSES
        assert data.images[:, 0, 0, 0].tolist() == [100 + severity * 10 + i for i in range(7)]
        assert data.labels.tolist() == labels[(severity - 1) * 7 : severity * 7].tolist()
        assert data.labels.dtype == np.int64
    first = load_cifar_c(tmp_path / "CIFAR-10-C", "fog", 4, n_examples=3)  # the folder itself
    assert first.images[:, 0, 0, 0].tolist() == [40, 41, 42]
    assert len(load_cifar_c(tmp_path, "fog", 2, n_examples=100)) == 7
    with pytest.raises(FileNotFoundError, match="fog, snow"):
        load_cifar_c(tmp_path, "frost", 1)
    with pytest.raises(ValueError):
        load_cifar_c(tmp_path, "fog", 6)
    with pytest.raises(FileNotFoundError, match="CIFAR-100-C"):
        load_cifar_c(tmp_path, "fog", 1, dataset="cifar100")
    _write_cifar_c(tmp_path, "CIFAR-100-C", 2, ("fog",))
    assert load_cifar_c(tmp_path, "fog", 1, dataset="cifar100").classes == CIFAR100_CLASSES


def test_cifar_c_generated_sidecar_guards_missing_severities(tmp_path: Path) -> None:
    _write_cifar_c(tmp_path, "CIFAR-10-C", 3, ("fog",))
    (tmp_path / "CIFAR-10-C" / "generation.json").write_text(json.dumps({"severities": {"fog": [2, 5]}}))
    assert len(load_cifar_c(tmp_path, "fog", 5)) == 3
    with pytest.raises(ValueError, match="not generated"):
        load_cifar_c(tmp_path, "fog", 1)


def test_imagenet_c_layout(tmp_path: Path) -> None:
    written = _write_folder(tmp_path / "fog" / "3", {"n02": [(24, 32)] * 2, "n01": [(40, 30)]}, fmt="JPEG")
    data = load_imagenet_c(tmp_path, "fog", 3, size=16)
    assert data.classes == ("n01", "n02") and data.labels.tolist() == [0, 1, 1]
    assert data.images.shape == (3, 16, 16, 3)
    assert len(load_imagenet_c(tmp_path, "fog", 3, size=16, n_examples=2)) == 2
    native = load_imagenet_c(tmp_path, "fog", 3, size=24)
    assert native.images.shape == (3, 24, 24, 3)
    # a 24x32 image at size 24 is only centre-cropped: columns 4..27
    decoded = np.asarray(Image.open(sorted((tmp_path / "fog" / "3" / "n02").iterdir())[0]))
    np.testing.assert_array_equal(native.images[1], decoded[:, 4:28])
    assert written  # the helper wrote what it returned
    with pytest.raises(FileNotFoundError, match="ImageNet-C"):
        load_imagenet_c(tmp_path, "snow", 3)
    assert os.environ["TTA_CACHE_DIR"].endswith("cache")


def test_cifar_c_files_are_verified_against_recorded_and_user_checksums(tmp_path: Path) -> None:
    import hashlib

    from benchmarks.data.corrupted import CHECKSUM_FILE

    _write_cifar_c(tmp_path, "CIFAR-10-C", 3, ("fog", "snow"))
    folder = tmp_path / "CIFAR-10-C"
    sha = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in ("fog.npy", "snow.npy", "labels.npy")}
    (folder / "generation.json").write_text(json.dumps({"severities": {"fog": [1, 2, 3, 4, 5]}, "files": sha}))
    assert len(load_cifar_c(tmp_path, "fog", 2)) == 3
    data = np.load(folder / "fog.npy")
    data[0, 0, 0, 0] ^= 1  # one flipped bit after generation
    np.save(folder / "fog.npy", data)
    with pytest.raises(ValueError, match=r"fog.npy: sha256 [0-9a-f]{64} differs from .* recorded in .*generation.json"):
        load_cifar_c(tmp_path, "fog", 2)

    # official files: the checksums a user gives, as a sha256sum/md5sum file or a dict
    (folder / "generation.json").unlink()
    assert len(load_cifar_c(tmp_path, "fog", 2)) == 3  # nothing to verify against
    md5 = hashlib.md5((folder / "snow.npy").read_bytes()).hexdigest()
    (folder / CHECKSUM_FILE).write_text(f"{sha['fog.npy']}  fog.npy\n{md5}  *snow.npy\n")
    assert len(load_cifar_c(tmp_path, "snow", 1)) == 3
    with pytest.raises(ValueError, match="differs from .*SHA256SUMS"):
        load_cifar_c(tmp_path, "fog", 1)
    with pytest.raises(ValueError, match="the given checksums"):
        load_cifar_c(tmp_path, "snow", 1, checksums={"snow.npy": "0" * 64})
    (folder / CHECKSUM_FILE).write_text("not a checksum line\n")
    with pytest.raises(ValueError, match="expected '<md5 or sha256 hex>  <file name>'"):
        load_cifar_c(tmp_path, "snow", 1)
