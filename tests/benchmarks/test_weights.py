"""Committed source models: manifest, checksum verification, and the config resolver."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.models import weights


def test_every_committed_file_matches_its_manifest() -> None:
    data = weights.manifest()
    assert "cifar10_resnet26" in data["models"]
    for entry in data["models"].values():
        path = weights.WEIGHTS_DIR / entry["file"]
        assert weights.sha256_of(path) == entry["sha256"] and path.stat().st_size == entry["bytes"]
        content = torch.load(path, map_location="cpu", weights_only=True)  # no pickled code
        assert content["clean_accuracy"] == entry["clean_accuracy"]
    assert weights.main(["verify"]) == 0


def test_a_changed_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setattr(weights, "MANIFEST", tmp_path / "MANIFEST.json")
    trained = tmp_path / "cache" / "m.pt"
    trained.parent.mkdir()
    torch.save({"state_dict": {"w": torch.ones(2)}, "clean_accuracy": 0.5, "config": {"name": "m"}}, trained)
    entry = weights.add(trained)
    path = tmp_path / "m.pt"
    assert weights.committed_path("m") == path and entry["sha256"] == weights.sha256_of(path)
    weights.verify_file(path)
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(weights.WeightsMismatch, match="manifest"):
        weights.verify_file(path)
    from benchmarks.app.models import load_weights
    from benchmarks.app.errors import BenchConfigError

    with pytest.raises(BenchConfigError, match="sha256"):
        load_weights(torch.nn.Linear(2, 1), path, {"kind": "project"})
    assert weights.resolve("not-committed", str(tmp_path / "cache")) == str(tmp_path / "cache" / "models" / "not-committed.pt")
    assert json.loads((tmp_path / "MANIFEST.json").read_text())["models"]["m"]["file"] == "m.pt"


def test_configs_load_the_committed_model_and_training_refuses_to_repeat_it() -> None:
    from omegaconf import OmegaConf

    from benchmarks.training.source import AlreadyTrained, train_source
    from tests.benchmarks.test_app_config import make

    cfg = make(["model=cifar10_resnet26", "dataset=cifar10"])
    assert OmegaConf.to_container(cfg.model, resolve=True)["checkpoint"] == str(weights.WEIGHTS_DIR / "cifar10_resnet26.pt")
    with pytest.raises(AlreadyTrained, match="force=true"):
        train_source({"source_model": {"name": "cifar10_resnet26"}, "data": {"source": "cifar10_jpeg"}})
