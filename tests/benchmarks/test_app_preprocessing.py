"""The app refuses model/dataset pairs whose preprocessing disagrees, and says how to fix it."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module

import benchmarks.app  # noqa: F401
from benchmarks.app.checks import check_config
from benchmarks.app.errors import BenchConfigError
from benchmarks.app.preprocessing import check_preprocessing, expected_input
from benchmarks.app.schema import ModelConfig, ModelKind, Preprocessing

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def model(**values) -> ModelConfig:  # noqa: ANN003
    return ModelConfig(**values)


def test_timm_model_without_its_normalization_is_refused_with_the_fix() -> None:
    problems = check_preprocessing(model(kind=ModelKind.timm, arch="resnet18"), image_size=32, dataset="digits")
    assert len(problems) == 1
    assert "expects inputs normalized with mean=[0.485,0.456,0.406] std=[0.229,0.224,0.225]" in problems[0]
    assert "timm pretrained_cfg of resnet18" in problems[0]
    assert "set model.input_mean=[0.485,0.456,0.406] model.input_std=[0.229,0.224,0.225]" in problems[0].replace("Set", "set")
    assert "model.preprocessing=unit" in problems[0]
    fixed = model(kind=ModelKind.timm, arch="resnet18", input_mean=IMAGENET[0], input_std=IMAGENET[1])
    assert check_preprocessing(fixed, image_size=32) == []
    unit = model(kind=ModelKind.timm, arch="resnet18", preprocessing=Preprocessing.unit)
    assert check_preprocessing(unit, image_size=32) == []
    wrong = model(kind=ModelKind.timm, arch="resnet18", input_mean=[0.5] * 3, input_std=[0.5] * 3)
    assert "are [0.5,0.5,0.5] / [0.5,0.5,0.5]" in check_preprocessing(wrong, image_size=32)[0]


def test_fixed_size_timm_model_refuses_another_resolution() -> None:
    vit = model(kind=ModelKind.timm, arch="vit_tiny_patch16_224", input_mean=[0.5] * 3, input_std=[0.5] * 3)
    problems = check_preprocessing(vit, image_size=32, dataset="cifar10")
    assert len(problems) == 1 and "expects 224x224 inputs" in problems[0] and "delivers 32x32" in problems[0]
    assert check_preprocessing(vit, image_size=224) == []


def test_models_that_take_unit_inputs_refuse_a_second_normalization() -> None:
    project = model(kind=ModelKind.project, arch="cifar_resnet", input_mean=[0.49, 0.48, 0.45], input_std=[0.25] * 3)
    problems = check_preprocessing(project, image_size=32)
    assert len(problems) == 1 and "takes [0, 1] inputs" in problems[0] and "would normalize them first" in problems[0]
    declared = model(kind=ModelKind.project, arch="cifar_resnet", preprocessing=Preprocessing.normalized,
                     input_mean=[0.49, 0.48, 0.45], input_std=[0.25] * 3)
    assert check_preprocessing(declared, image_size=32) == []
    assert "needs model.input_mean" in check_preprocessing(
        model(kind=ModelKind.project, arch="cifar_resnet", preprocessing=Preprocessing.normalized), image_size=32
    )[0]
    assert expected_input(model(kind=ModelKind.torchvision, arch="resnet18")).mean == tuple(IMAGENET[0])


def test_the_app_refuses_a_dataset_at_another_resolution_than_the_model() -> None:
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=digits_quick", "dataset.image_size=28"])
    with pytest.raises(BenchConfigError, match=r"expects 32x32 inputs \(model.input_size\) but dataset digits delivers 28x28"):
        check_config(cfg)


def test_negative_checkpoint_interval_is_refused_before_any_work() -> None:
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=digits_quick", "runtime.checkpoint_every=-1"])
    with pytest.raises(BenchConfigError, match="runtime.checkpoint_every=-1 must be >= 0"):
        check_config(cfg)
