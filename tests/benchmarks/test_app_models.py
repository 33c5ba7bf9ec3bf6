"""Models from config: timm, torchvision, project checkpoints, RobustBench; never a download."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from benchmarks.app.errors import BenchConfigError
from benchmarks.app.models import (
    Normalized,
    build_model,
    check_model_config,
    extract_state_dict,
)
from benchmarks.app.schema import ModelConfig


def cfg(**values):  # noqa: ANN003, ANN201
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), values)


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a model factory tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _same_outputs(a: nn.Module, b: nn.Module, size: int = 32) -> bool:
    x = torch.rand(4, 3, size, size)
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x))


def test_timm_with_local_checkpoint(tmp_path: Path) -> None:
    import timm
    source = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)  # DataParallel-style
    model = build_model(cfg(kind="timm", arch="test_resnet", checkpoint=str(path)), num_classes=10)
    assert _same_outputs(model, source)


def test_torchvision_with_local_checkpoint(tmp_path: Path) -> None:
    import torchvision

    source = torchvision.models.get_model("resnet18", weights=None, num_classes=10)
    path = tmp_path / "rn18.pt"
    torch.save(source.state_dict(), path)
    model = build_model(cfg(kind="torchvision", arch="resnet18", checkpoint=str(path)), num_classes=10)
    assert _same_outputs(model, source)


def test_project_checkpoint_and_input_normalization(tmp_path: Path) -> None:
    from benchmarks.models.cifar_resnet import cifar_resnet

    source = cifar_resnet(depth=8, num_classes=10)
    path = tmp_path / "resnet8.pt"
    torch.save({"state_dict": source.state_dict(), "accuracy": 0.5}, path)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    model = build_model(
        cfg(kind="project", arch="cifar_resnet", kwargs={"depth": 8}, checkpoint=str(path), input_mean=mean, input_std=std),
        num_classes=10,
    )
    assert isinstance(model, Normalized)
    x = torch.rand(2, 3, 32, 32)
    expected = source.eval()((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-6)
    # the full "module:callable" form works too
    same = build_model(cfg(kind="project", arch="benchmarks.models.cifar_resnet:cifar_resnet", kwargs={"depth": 8},
                           checkpoint=str(path)), num_classes=10)
    assert _same_outputs(same, source)


def test_missing_weights_name_the_path_and_how_to_produce_them(tmp_path: Path) -> None:
    path = tmp_path / "models" / "cifar10_resnet26.pt"
    config = cfg(kind="project", arch="cifar_resnet", checkpoint=str(path), hint="Train it with scripts/train_x.py.")
    with pytest.raises(BenchConfigError) as info:
        build_model(config, num_classes=10)
    message = str(info.value)
    assert f"model weights not found: {path}" in message
    assert "Train it with scripts/train_x.py." in message and "Nothing is downloaded" in message
    assert any(str(path) in p for p in check_model_config(config))
    with pytest.raises(BenchConfigError, match="torch.save"):
        build_model(cfg(kind="timm", arch="test_resnet", checkpoint=str(path)), num_classes=10)


def test_a_checkpoint_of_another_architecture_is_a_clear_error(tmp_path: Path) -> None:
    from benchmarks.models.cifar_resnet import cifar_resnet

    path = tmp_path / "resnet8.pt"
    torch.save(cifar_resnet(depth=8).state_dict(), path)
    with pytest.raises(BenchConfigError, match="do not fit model.arch=cifar_resnet"):
        build_model(cfg(kind="project", arch="cifar_resnet", kwargs={"depth": 14}, checkpoint=str(path)), num_classes=10)
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(BenchConfigError, match="cannot read model weights"):
        build_model(cfg(kind="project", arch="cifar_resnet", checkpoint=str(tmp_path / "junk.pt")), num_classes=10)


def test_unknown_architectures_and_options() -> None:
    assert any("unknown timm architecture" in p for p in check_model_config(cfg(kind="timm", arch="resnet_nonexistent")))
    assert any("unknown torchvision architecture" in p for p in check_model_config(cfg(kind="torchvision", arch="nope")))
    assert any("cannot import model factory" in p for p in check_model_config(cfg(kind="project", arch="nowhere.mod:f")))
    assert any("not digits training options" in p for p in check_model_config(cfg(kind="digits", kwargs={"nrom": "bn"})))
    assert any("model.arch is required" in p for p in check_model_config(cfg(kind="timm")))


def test_random_init_is_explicit() -> None:
    assert check_model_config(cfg(kind="timm", arch="test_resnet")) != []
    model = build_model(cfg(kind="timm", arch="test_resnet", random_init=True), num_classes=7)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)


def test_robustbench_without_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "robustbench", None)  # import fails like an absent package
    (tmp_path / "cifar10" / "corruptions").mkdir(parents=True)
    (tmp_path / "cifar10" / "corruptions" / "Standard.pt").write_bytes(b"")
    with pytest.raises(BenchConfigError, match="needs the robustbench package"):
        build_model(cfg(kind="robustbench", arch="Standard", model_dir=str(tmp_path)), num_classes=10)


def _fake_robustbench(monkeypatch: pytest.MonkeyPatch, architecture: type[nn.Module]) -> None:
    import enum

    class BenchmarkDataset(enum.Enum):
        cifar_10 = "cifar10"

    class ThreatModel(enum.Enum):
        corruptions = "corruptions"

    zoo = types.ModuleType("robustbench.model_zoo")
    zoo.model_dicts = {BenchmarkDataset.cifar_10: {ThreatModel.corruptions: {"Standard": {"model": architecture, "gdrive_id": "x"}}}}
    enums = types.ModuleType("robustbench.model_zoo.enums")
    enums.BenchmarkDataset, enums.ThreatModel = BenchmarkDataset, ThreatModel
    monkeypatch.setitem(sys.modules, "robustbench", types.ModuleType("robustbench"))
    monkeypatch.setitem(sys.modules, "robustbench.model_zoo", zoo)
    monkeypatch.setitem(sys.modules, "robustbench.model_zoo.enums", enums)


def test_robustbench_loads_the_local_file_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from benchmarks.models.cifar_resnet import cifar_resnet

    class Standard(nn.Module):  # stands in for the zoo's WideResNet-28-10
        def __init__(self) -> None:
            super().__init__()
            self.net = cifar_resnet(depth=8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    _fake_robustbench(monkeypatch, Standard)
    config = cfg(kind="robustbench", arch="Standard", model_dir=str(tmp_path))
    with pytest.raises(BenchConfigError) as info:
        build_model(config, num_classes=10)
    expected = tmp_path / "cifar10" / "corruptions" / "Standard.pt"
    assert f"model weights not found: {expected}" in str(info.value) and "load_model('Standard'" in str(info.value)

    source = Standard()
    expected.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, expected)  # RobustBench layout
    assert _same_outputs(build_model(config, num_classes=10), source)


def test_extract_state_dict_layouts() -> None:
    state = {"a": torch.zeros(1)}
    for wrapped in (state, {"state_dict": state}, {"model": state}, {"model_state_dict": state}, {"module.a": torch.zeros(1)}):
        assert list(extract_state_dict(wrapped)) == ["a"]
    with pytest.raises(BenchConfigError):
        extract_state_dict([1, 2])
