"""The input a model config expects, checked against what the dataset delivers.

Every stream of this project delivers float RGB images in [0, 1] at ``dataset.image_size``.
A model config states what its checkpoint expects (``model.preprocessing``):

* ``auto`` (default): from the model kind. A timm architecture expects the mean/std (and,
  where ``fixed_input_size`` is set, the resolution) of its ``pretrained_cfg``; a torchvision
  architecture expects ImageNet's mean/std (its weights' transforms); the project models,
  the digits CNN and RobustBench models take [0, 1] inputs and normalize inside the network
  if at all (RobustBench style; ``scripts/train_source.py`` trains on [0, 1] inputs).
* ``unit``: the checkpoint takes [0, 1] inputs directly; ``model.input_mean/input_std``
  must then be unset (setting them would normalize twice).
* ``normalized``: the checkpoint takes inputs normalized with ``model.input_mean/input_std``,
  which the app applies (:class:`benchmarks.app.models.Normalized`); both must be set.

``model.input_size`` states the resolution the checkpoint was trained at; a dataset of another
``image_size`` is refused. :func:`check_preprocessing` returns one message per disagreement,
naming the two sides and the override that fixes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: torchvision's ImageNet weights all normalize with these (their ``transforms()``).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ExpectedInput:
    """What a checkpoint expects, and where that knowledge comes from."""

    #: mean/std the inputs must be normalized with before the network (None: [0, 1] inputs)
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    #: resolution the network requires (None: any)
    size: int | None
    origin: str


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    value = cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)
    return getattr(value, "value", value)


def _floats(values: Any) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)


def expected_input(cfg: Any) -> ExpectedInput:
    """The input a model config's checkpoint expects (see the module docstring)."""
    kind = _get(cfg, "kind")
    mode = _get(cfg, "preprocessing", "auto") or "auto"
    size = _get(cfg, "input_size")
    mean, std = _floats(_get(cfg, "input_mean")), _floats(_get(cfg, "input_std"))
    if mode == "unit":
        return ExpectedInput(None, None, size, "model.preprocessing=unit")
    if mode == "normalized":
        return ExpectedInput(mean, std, size, "model.preprocessing=normalized")
    if kind == "timm":
        try:
            import timm

            pretrained = timm.models.get_pretrained_cfg(_get(cfg, "arch"))
        except Exception:  # noqa: BLE001 - no timm or an unknown arch: check_model_config says so
            pretrained = None
        if pretrained is not None and pretrained.mean is not None:
            fixed = pretrained.input_size[-1] if getattr(pretrained, "fixed_input_size", False) else None
            return ExpectedInput(
                _floats(pretrained.mean), _floats(pretrained.std), size or fixed, f"timm pretrained_cfg of {_get(cfg, 'arch')}"
            )
    if kind == "torchvision":
        return ExpectedInput(IMAGENET_MEAN, IMAGENET_STD, size, "torchvision ImageNet weights' transforms")
    return ExpectedInput(None, None, size, f"model.kind={kind} takes [0, 1] inputs")


def _fmt(values: tuple[float, ...] | None) -> str:
    return "null" if values is None else "[" + ",".join(f"{v:g}" for v in values) + "]"


def _close(a: tuple[float, ...] | None, b: tuple[float, ...] | None) -> bool:
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(abs(x - y) <= _TOLERANCE for x, y in zip(a, b))


def check_preprocessing(cfg: Any, *, image_size: int, dataset: str | None = None) -> list[str]:
    """Disagreements between a model config's expected input and the dataset's images."""
    problems: list[str] = []
    expected = expected_input(cfg)
    mode = _get(cfg, "preprocessing", "auto") or "auto"
    mean, std = _floats(_get(cfg, "input_mean")), _floats(_get(cfg, "input_std"))
    what = f"model.kind={_get(cfg, 'kind')} model.arch={_get(cfg, 'arch')}"
    data = f"dataset {dataset}" if dataset else "the dataset"
    if mode == "normalized" and (mean is None or std is None):
        problems.append(
            f"{what}: model.preprocessing=normalized needs model.input_mean and model.input_std (the mean/std the "
            "checkpoint was trained with); the app applies them to the [0, 1] images of the stream"
        )
    elif expected.mean is None and mean is not None:
        problems.append(
            f"{what} takes [0, 1] inputs ({expected.origin}) but model.input_mean={_fmt(mean)} model.input_std={_fmt(std)} "
            "would normalize them first. Remove model.input_mean/input_std, or set model.preprocessing=normalized if "
            "this checkpoint was trained on normalized inputs."
        )
    elif expected.mean is not None and not (_close(expected.mean, mean) and _close(expected.std, std)):
        given = "are not set" if mean is None else f"are {_fmt(mean)} / {_fmt(std)}"
        problems.append(
            f"{what} expects inputs normalized with mean={_fmt(expected.mean)} std={_fmt(expected.std)} "
            f"({expected.origin}), but {data} delivers [0, 1] images and model.input_mean/input_std {given}. "
            f"Set model.input_mean={_fmt(expected.mean)} model.input_std={_fmt(expected.std)} (the app then "
            "normalizes), or model.preprocessing=unit if this checkpoint was trained on [0, 1] inputs."
        )
    if expected.size is not None and int(expected.size) != int(image_size):
        problems.append(
            f"{what} expects {expected.size}x{expected.size} inputs ({'model.input_size' if _get(cfg, 'input_size') else expected.origin}) "
            f"but {data} delivers {image_size}x{image_size} (dataset.image_size). Use a dataset at {expected.size} px, "
            f"or set model.input_size={image_size} if the checkpoint was trained at that resolution."
        )
    return problems


def input_protocol_fields(cfg: Any, image_size: int) -> dict[str, Any]:
    """The ``input`` block of the protocol for a checked model config."""
    mean, std = _floats(_get(cfg, "input_mean")), _floats(_get(cfg, "input_std"))
    if mean is not None:
        normalization = "wrapper"
    elif _get(cfg, "kind") == "robustbench":
        normalization = "model"
    else:
        normalization = "none"
    return {"value_range": (0.0, 1.0), "resolution": int(image_size), "mean": mean, "std": std, "normalization": normalization}
