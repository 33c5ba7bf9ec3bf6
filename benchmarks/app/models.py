"""Source models from config: the digits CNN, project checkpoints, timm, torchvision, RobustBench.

Nothing here downloads: timm models are built with ``pretrained=False`` and torchvision
models with ``weights=None``, then the weights are loaded from a local file. A missing file
is a :class:`BenchConfigError` that names the path and how to produce it.

``model.kind``:

* ``digits``: :func:`benchmarks.models.digits.digits_source_model` (trained once, ~15 s,
  cached in ``$TTA_CACHE_DIR``); ``model.kwargs`` are its training-config fields; or a
  given ``model.checkpoint`` of a :class:`~benchmarks.models.digits.DigitsCNN`.
* ``project``: ``model.arch`` is a factory ``"package.module:callable"`` (or a short alias,
  see :data:`PROJECT_ARCHS`) called with ``num_classes`` and ``model.kwargs``; weights from
  ``model.checkpoint``.
* ``timm`` / ``torchvision``: ``model.arch`` is the architecture name.
* ``robustbench``: ``model.arch`` is a RobustBench model-zoo name (``Standard``); needs the
  ``robustbench`` package and ``<model_dir>/<dataset>/<threat_model>/<arch>.pt`` on disk.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.app.errors import BenchConfigError
from benchmarks.app.identity import abspath

logger = logging.getLogger(__name__)

#: Short names of project architectures for ``model.kind=project``.
PROJECT_ARCHS: dict[str, str] = {
    "digits_cnn": "benchmarks.models.digits:DigitsCNN",
    "cifar_resnet": "benchmarks.models.cifar_resnet:cifar_resnet",
    "cifar_vit": "benchmarks.models.cifar_vit:cifar_vit",
}

_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "network")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    value = cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)
    return getattr(value, "value", value)  # Enum -> its value


def _plain_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return dict(OmegaConf.to_container(value, resolve=True))  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover
        pass
    return dict(value)


def checkpoint_path(cfg: Any) -> Path | None:
    """The weights file a model config needs, or None when it needs none."""
    kind = _get(cfg, "kind")
    if kind == "robustbench":
        model_dir = _get(cfg, "model_dir") or "models"
        return Path(abspath(model_dir)) / _get(cfg, "robustbench_dataset", "cifar10") / _get(cfg, "threat_model", "corruptions") / f"{_get(cfg, 'arch')}.pt"
    checkpoint = _get(cfg, "checkpoint")
    return Path(abspath(checkpoint)) if checkpoint else None


def _how_to_produce(cfg: Any, path: Path) -> str:
    hint = _get(cfg, "hint")
    if hint:
        return str(hint)
    kind = _get(cfg, "kind")
    if kind == "robustbench":
        return (
            "RobustBench stores its weights there when it downloads them. On a machine with "
            "internet run: python -c \"from robustbench.utils import load_model; "
            f"load_model('{_get(cfg, 'arch')}', model_dir='<dir>', dataset='{_get(cfg, 'robustbench_dataset', 'cifar10')}', "
            f"threat_model='{_get(cfg, 'threat_model', 'corruptions')}')\" and copy the .pt file it writes under "
            "<dir> to the path above (or point model.model_dir at a folder with RobustBench's layout)."
        )
    return (
        "Train or convert a model and save its weights there, e.g. torch.save(model.state_dict(), "
        f"'{path}'), or point model.checkpoint at an existing file."
    )


def missing_weights_error(cfg: Any, path: Path) -> BenchConfigError:
    return BenchConfigError(
        f"model weights not found: {path}\n"
        f"  (model.kind={_get(cfg, 'kind')}, model.arch={_get(cfg, 'arch')}). {_how_to_produce(cfg, path)}\n"
        "  Nothing is downloaded at run time."
    )


def check_model_config(cfg: Any) -> list[str]:
    """Problems that can be seen without building the model (used before any work starts)."""
    kind = _get(cfg, "kind")
    problems: list[str] = []
    arch = _get(cfg, "arch")
    if kind in ("project", "timm", "torchvision", "robustbench") and not arch:
        problems.append(f"model.arch is required for model.kind={kind}")
        return problems
    if kind == "digits":
        from benchmarks.models.digits import DigitsTrainConfig

        valid = {f.name for f in dataclasses.fields(DigitsTrainConfig)}
        unknown = sorted(set(_plain_dict(_get(cfg, "kwargs"))) - valid)
        if unknown:
            problems.append(f"model.kwargs {unknown} are not digits training options; valid: {sorted(valid)}")
    elif kind == "timm":
        try:
            import timm
        except ImportError:
            problems.append("model.kind=timm needs the timm package (pip install timm)")
        else:
            if not timm.is_model(arch):
                problems.append(f"unknown timm architecture model.arch={arch!r}")
    elif kind == "torchvision":
        import torchvision

        if arch not in torchvision.models.list_models():
            problems.append(f"unknown torchvision architecture model.arch={arch!r}")
    elif kind == "project":
        try:
            resolve_factory(arch)
        except BenchConfigError as error:
            problems.append(str(error))
    elif kind == "robustbench" and not _importable("robustbench"):
        problems.append("model.kind=robustbench needs the robustbench package (pip install robustbench)")
    path = checkpoint_path(cfg)
    if path is None:
        if kind in ("project", "timm", "torchvision") and not _get(cfg, "random_init", False):
            problems.append(
                f"model.checkpoint is required for model.kind={kind} (a local weights file; nothing is "
                "downloaded). Set model.random_init=true to run with random weights (smoke tests only)."
            )
    elif not path.is_file():
        problems.append(str(missing_weights_error(cfg, path)))
    return problems


def _importable(name: str) -> bool:
    if name in sys.modules:
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None


def resolve_factory(arch: str) -> Any:
    target = PROJECT_ARCHS.get(arch, arch)
    module_name, sep, attr = target.partition(":")
    if not sep:
        module_name, _, attr = target.rpartition(".")
    if not module_name or not attr:
        raise BenchConfigError(
            f"model.arch={arch!r} is neither a project alias ({', '.join(sorted(PROJECT_ARCHS))}) nor 'module:callable'"
        )
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise BenchConfigError(f"cannot import model factory {target!r} (model.arch={arch!r}): {error}") from None


def extract_state_dict(checkpoint: Any) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint file's content, with ``module.`` prefixes removed."""
    state = checkpoint
    if isinstance(state, Mapping):
        for key in _STATE_KEYS:
            if key in state and isinstance(state[key], Mapping):
                state = state[key]
                break
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if not isinstance(state, Mapping):
        raise BenchConfigError(f"checkpoint holds no state dict (got {type(checkpoint).__name__})")
    prefix = "module."
    if state and all(str(k).startswith(prefix) for k in state):
        state = {str(k)[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def load_weights(model: nn.Module, path: Path, cfg: Any) -> nn.Module:
    if not path.is_file():
        raise missing_weights_error(cfg, path)
    from benchmarks.models.weights import WeightsMismatch, verify_file

    try:
        verify_file(path)  # a committed file must be the one its manifest names
    except WeightsMismatch as error:
        raise BenchConfigError(str(error)) from None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise BenchConfigError(f"cannot read model weights {path}: {error}") from None
    state = extract_state_dict(checkpoint)
    try:
        result = model.load_state_dict(state, strict=bool(_get(cfg, "strict", True)))
    except RuntimeError as error:
        first = str(error).splitlines()[:4]
        raise BenchConfigError(
            f"weights in {path} do not fit model.arch={_get(cfg, 'arch')}: " + " ".join(s.strip() for s in first)
        ) from None
    if result.missing_keys or result.unexpected_keys:
        logger.warning("non-strict load of %s: missing %s, unexpected %s", path, result.missing_keys[:5], result.unexpected_keys[:5])
    return model


class Normalized(nn.Module):
    """``model((x - mean) / std)`` for inputs in [0, 1]; exposes the inner model's
    ``forward_features`` / ``forward_head`` so feature-based methods still find them."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


def _robustbench_model(cfg: Any, path: Path) -> nn.Module:
    try:
        from robustbench.model_zoo import model_dicts
        from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    except ImportError:
        raise BenchConfigError(
            "model.kind=robustbench needs the robustbench package (pip install robustbench) and its weights "
            f"on disk at {path}"
        ) from None
    if not path.is_file():
        raise missing_weights_error(cfg, path)
    name = _get(cfg, "arch")
    try:
        zoo = model_dicts[BenchmarkDataset(_get(cfg, "robustbench_dataset", "cifar10"))][ThreatModel(_get(cfg, "threat_model", "corruptions"))]
        entry = zoo[name]
    except (KeyError, ValueError):
        raise BenchConfigError(f"RobustBench has no model {name!r} for {_get(cfg, 'robustbench_dataset')}/{_get(cfg, 'threat_model')}") from None
    # Build the architecture from the zoo entry and load the local file ourselves: RobustBench's
    # own load_model() downloads whatever is missing, which must never happen at run time.
    model = entry["model"]()
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = extract_state_dict(checkpoint)
    if state and all(str(k).startswith("model.") for k in state) and not any(k.startswith("model.") for k in model.state_dict()):
        state = {k[len("model."):]: v for k, v in state.items()}
    model.load_state_dict(state, strict=bool(_get(cfg, "strict", True)))
    return model


def build_model(cfg: Any, *, num_classes: int, device: str | torch.device = "cpu", progress: bool = False) -> nn.Module:
    """The source model of a ``model`` config, in eval mode on ``device``."""
    kind = _get(cfg, "kind")
    problems = check_model_config(cfg)
    if problems:
        raise BenchConfigError("\n".join(problems))
    classes = int(_get(cfg, "num_classes") or num_classes)
    kwargs = _plain_dict(_get(cfg, "kwargs"))
    path = checkpoint_path(cfg)
    arch = _get(cfg, "arch")
    if kind == "digits":
        from benchmarks.models.digits import (
            DigitsCNN,
            DigitsTrainConfig,
            digits_source_model,
        )

        train = DigitsTrainConfig(**kwargs)
        if path is None:
            model: nn.Module = digits_source_model(train, progress=progress)
        else:
            model = load_weights(DigitsCNN(classes, train.width, train.norm), path, cfg)
    elif kind == "robustbench":
        assert path is not None
        model = _robustbench_model(cfg, path)
    else:
        if kind == "timm":
            import timm

            model = timm.create_model(arch, pretrained=False, num_classes=classes, **kwargs)
        elif kind == "torchvision":
            import torchvision

            model = torchvision.models.get_model(arch, weights=None, num_classes=classes, **kwargs)
        elif kind == "project":
            model = resolve_factory(arch)(num_classes=classes, **kwargs)
        else:  # pragma: no cover - the schema's enum rejects anything else
            raise BenchConfigError(f"unknown model.kind={kind!r}")
        if path is not None:
            load_weights(model, path, cfg)
        else:
            logger.warning("model %s:%s has RANDOM weights (model.random_init=true)", kind, arch)
    mean, std = _get(cfg, "input_mean"), _get(cfg, "input_std")
    if (mean is None) != (std is None):
        raise BenchConfigError("set both model.input_mean and model.input_std, or neither")
    if mean is not None:
        model = Normalized(model, list(mean), list(std))
    return model.to(device).eval()


def model_label(cfg: Any) -> str:
    """A short human-readable name of a model config (for tables and logs)."""
    kind = _get(cfg, "kind")
    if kind == "digits":
        kwargs = _plain_dict(_get(cfg, "kwargs"))
        return f"digits_cnn({kwargs.get('norm', 'bn')})" + (f":{os.path.basename(str(_get(cfg, 'checkpoint')))}" if _get(cfg, "checkpoint") else "")
    arch = _get(cfg, "arch")
    checkpoint = _get(cfg, "checkpoint")
    suffix = f":{Path(str(checkpoint)).stem}" if checkpoint and kind != "robustbench" else ""
    return f"{kind}:{arch}{suffix}"
