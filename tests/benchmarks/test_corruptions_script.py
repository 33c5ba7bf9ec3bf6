"""scripts/make_cifar_c.py writes the official layout that load_cifar_c reads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.corruptions import corrupt_uint8
from benchmarks.data import load_cifar_c, load_digits

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_cifar_c.py"


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These tests run many small tensor ops; on a shared 2-core machine, intra-op threads
    spend far more time waiting for each other than computing, so use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def make_cifar_c():
    spec = importlib.util.spec_from_file_location("make_cifar_c", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_subset_is_read_back(make_cifar_c, tmp_path: Path) -> None:
    common = ["--source", "digits", "--out", str(tmp_path), "--n-examples", "10"]
    common += ["--batch-size", "4", "--device", "cpu", "--seed", "3"]
    make_cifar_c.main(common + ["--corruptions", "fog", "contrast", "--severities", "2", "4"])
    folder = tmp_path / "CIFAR-10-C"
    fog = np.load(folder / "fog.npy")
    assert fog.shape == (50, 32, 32, 3) and fog.dtype == np.uint8
    assert not fog[:10].any() and fog[10:20].any()  # severity 1 not generated: zeros
    labels = np.load(folder / "labels.npy")
    source = load_digits("test").subset(np.arange(10))
    np.testing.assert_array_equal(labels, np.tile(source.labels, 5))
    sidecar = json.loads((folder / "generation.json").read_text())
    assert sidecar["severities"] == {"fog": [2, 4], "contrast": [2, 4]} and not sidecar["complete"]
    import hashlib

    for name in ("fog.npy", "contrast.npy", "labels.npy"):  # checksums the loaders verify
        assert sidecar["files"][name] == hashlib.sha256((folder / name).read_bytes()).hexdigest()
    assert sidecar["generator_version"].startswith("code-sha256:")

    loaded = load_cifar_c(tmp_path, "fog", 4)
    expected = corrupt_uint8(source.to_tensor(), "fog", 4, seed=3).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(loaded.images, expected)  # batches of 4 == one batch of 10
    np.testing.assert_array_equal(loaded.labels, source.labels)
    with pytest.raises(ValueError, match="not generated"):
        load_cifar_c(tmp_path, "fog", 1)

    make_cifar_c.main(common + ["--corruptions", "fog", "--severities", "1"])  # fill a block
    refilled = np.load(folder / "fog.npy")
    np.testing.assert_array_equal(refilled[10:], fog[10:])
    assert refilled[:10].any()
    refilled_sidecar = json.loads((folder / "generation.json").read_text())
    assert refilled_sidecar["severities"]["fog"] == [1, 2, 4]
    assert refilled_sidecar["files"]["contrast.npy"] == sidecar["files"]["contrast.npy"]
    assert refilled_sidecar["files"]["fog.npy"] != sidecar["files"]["fog.npy"]
    with pytest.raises(SystemExit):  # other settings must not be mixed into the same set
        make_cifar_c.main(["--source", "digits", "--out", str(tmp_path), "--n-examples", "5", "--corruptions", "fog"])
    with pytest.raises(SystemExit):
        make_cifar_c.parse_args(["--out", str(tmp_path), "--corruptions", "speckle_noise"])
    assert torch.equal(torch.from_numpy(loaded.images), torch.from_numpy(np.load(folder / "fog.npy")[30:40]))
