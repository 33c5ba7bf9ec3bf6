"""Source-model training: batched augmentation, the recipe, checkpoints, the Hydra script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.data import load_digits
from benchmarks.models.cifar_resnet import cifar_resnet
from benchmarks.training import (
    TrainConfig,
    evaluate_accuracy,
    random_crop_flip,
    read_checkpoint_info,
    save_if_better,
    train_classifier,
)

ROOT = Path(__file__).resolve().parents[2]


def test_random_crop_flip_is_a_crop_of_the_reflect_padded_image() -> None:
    images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(images, 2, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = F.pad(images.float(), (2,) * 4, mode="reflect")
    flipped_count = 0
    for i in range(len(images)):
        candidates = {
            (dy, dx, flip)
            for dy in range(5)
            for dx in range(5)
            for flip in (False, True)
            if torch.equal(out[i].float(), (lambda c: c.flip(-1) if flip else c)(padded[i, :, dy : dy + 8, dx : dx + 8]))
        }
        assert candidates, f"sample {i} is no crop/flip of its padded input"
        flipped_count += all(flip for *_, flip in candidates)
    assert 0 < flipped_count < len(images)  # both flipped and unflipped samples occur


def test_random_crop_flip_is_reproducible_and_identity_without_padding() -> None:
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    a = random_crop_flip(images, 4, torch.Generator().manual_seed(3))
    b = random_crop_flip(images, 4, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    plain = random_crop_flip(images, 0, torch.Generator().manual_seed(1))
    assert all(torch.equal(p, x) or torch.equal(p, x.flip(-1)) for p, x in zip(plain, images))
    with pytest.raises(ValueError, match="N, C, H, W"):
        random_crop_flip(images[0], 4)


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"weight": torch.full((2,), value)}


def test_a_better_checkpoint_is_never_replaced_silently(tmp_path: Path) -> None:
    path = tmp_path / "models" / "m.pt"
    first = save_if_better(path, _state(1.0), 0.8, {"run": 1})
    assert first.replaced_best and first.previous_accuracy is None
    worse = save_if_better(path, _state(2.0), 0.7, {"run": 2})
    assert not worse.replaced_best and "kept" in worse.message and worse.written.name == "m.rejected.pt"
    assert torch.load(path, weights_only=True)["state_dict"]["weight"][0] == 1.0
    assert read_checkpoint_info(worse.written)["clean_accuracy"] == pytest.approx(0.7)
    better = save_if_better(path, _state(3.0), 0.9, {"run": 3})
    assert better.replaced_best and better.previous_accuracy == pytest.approx(0.8)
    forced = save_if_better(path, _state(4.0), 0.5, {"run": 4}, force=True)
    assert forced.replaced_best and "force-replaced" in forced.message
    info = read_checkpoint_info(path)
    assert info["clean_accuracy"] == pytest.approx(0.5) and info["config"] == {"run": 4}
    with pytest.raises(ValueError, match="clean_accuracy"):
        save_if_better(path, _state(0.0), 1.5, {})


@pytest.mark.parametrize(
    "bad",
    [{"epochs": 0}, {"optimizer": "lbfgs"}, {"amp": "fp8"}, {"warmup_fraction": 1.0}, {"lr": 0.0}, {"label_smoothing": 1.0}],
)
def test_train_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_training_learns_digits_and_reports_history() -> None:
    torch.manual_seed(0)
    train, test = load_digits("train", size=16), load_digits("test", size=16)
    model = cifar_resnet(depth=8, width=8)
    before = evaluate_accuracy(model, test)
    config = TrainConfig(epochs=4, batch_size=64, lr=0.05, amp="bf16", eval_every=2, crop_padding=2)
    result = train_classifier(model, train, test, config, progress=False)
    assert result.clean_accuracy > max(0.4, before + 0.25), (before, result.clean_accuracy)  # 0.13 -> 0.51
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert "test_accuracy" in result.history[1] and "test_accuracy" not in result.history[0]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert not model.training


@pytest.mark.parametrize("norm", ["gn", "bcn_ws"])
def test_cifar_resnet_norm_variants(norm: str) -> None:
    from tta.layers.bcn import BatchChannelNorm2d

    model = cifar_resnet(depth=8, width=8, norm=norm, groups=4)
    kinds = {type(m) for m in model.modules()}
    assert torch.nn.BatchNorm2d not in kinds
    assert (BatchChannelNorm2d in kinds) == (norm == "bcn_ws") and (torch.nn.GroupNorm in kinds) == (norm == "gn")
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 10)
    # the factory rebuilds the same structure, so its checkpoints load strictly
    cifar_resnet(depth=8, width=8, norm=norm, groups=4).load_state_dict(model.state_dict())


def test_cifar_vit_exposes_features_for_feature_methods() -> None:
    from benchmarks.models.cifar_vit import cifar_vit

    model = cifar_vit(embed_dim=32, depth=2, num_heads=2).eval()
    x = torch.rand(3, 3, 32, 32)
    features = model.forward_head(model.forward_features(x), pre_logits=True)
    assert features.shape == (3, 32) and model(x).shape == (3, 10)


def test_train_source_script_writes_a_checkpoint_the_benchmarks_load(tmp_path: Path) -> None:
    command = [
        sys.executable, str(ROOT / "scripts" / "train_source.py"),
        "data.source=digits", "data.limit_train=256", "data.limit_test=128", "threads=1", "progress=false",
        "source_model.kwargs.depth=8", "+source_model.kwargs.width=8",
        "source_model.train.epochs=1", "source_model.train.batch_size=64",
        f"output={tmp_path / 'model.pt'}", f"hydra.run.dir={tmp_path / 'run'}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "clean test accuracy" in done.stdout
    info = read_checkpoint_info(tmp_path / "model.pt")
    config = info["config"]
    assert config["data"] == {"source": "digits", "n_train": 256, "n_test": 128}
    assert config["train"]["epochs"] == 1 and config["kwargs"] == {"depth": 8, "norm": "bn", "width": 8}
    assert 0.0 <= info["clean_accuracy"] <= 1.0 and len(info["history"]) == 1

    from benchmarks.app.models import build_model

    cfg = {"kind": "project", "arch": "cifar_resnet", "kwargs": config["kwargs"], "checkpoint": str(tmp_path / "model.pt")}
    model = build_model(cfg, num_classes=10)
    digits = load_digits("test", size=32)
    sample = digits.subset(np.arange(128))
    accuracy = evaluate_accuracy(model, sample)
    assert 0.0 <= accuracy <= 1.0
