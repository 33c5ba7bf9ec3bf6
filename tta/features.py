"""Logits and penultimate features of any classifier from one forward pass.

Output-only methods (LAME) need the features the classifier layer sees. Rather than asking
users to split their model, :func:`logits_and_features` runs the model's own ``forward``
once and records the *input of the classifier layer* with a forward hook:

* timm models: the module ``model.get_classifier()`` returns (``fc``, ``head``,
  ``head.fc``...); its input is exactly ``model.forward_head(model.forward_features(x),
  pre_logits=True)`` (pooled, normed, after head dropout);
* torchvision: ``model.fc`` (ResNet, ResNeXt, RegNet, GoogLeNet...), ``model.heads``
  (ViT: its last ``Linear``), ``model.classifier`` (VGG, MobileNet, EfficientNet,
  ConvNeXt, DenseNet: its last ``Linear``);
* anything else: the last ``nn.Linear`` in registration order (``named_modules``), which is
  the output layer of ordinary classifiers; pass ``layer=`` (a qualified module name) when
  it is not.

Models whose classifier cannot be hooked (a timm model whose ``get_classifier()`` returns
several heads, e.g. distilled DeiT) fall back to ``forward_features`` once, then
``forward_head(..., pre_logits=True)`` and ``forward_head(...)`` (the head is cheap; the
backbone still runs once).

The logits are the model's real output; the features are flattened to ``(N, D)``. If the
hooked layer runs several times in one forward, the last call's input is used.
"""

from __future__ import annotations

import torch
from torch import nn


def _last_linear(module: nn.Module, prefix: str = "") -> tuple[str, nn.Module] | None:
    found = None
    for name, child in module.named_modules():
        if isinstance(child, nn.Linear):
            found = (".".join(part for part in (prefix, name) if part), child)
    return found


def find_classifier(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(qualified name, module)`` of the layer that maps penultimate features to logits,
    or None when it cannot be determined (see the module docstring for the rules)."""
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        try:
            classifier = get_classifier()
        except Exception:  # noqa: BLE001 - a user's method of the same name may do anything
            classifier = None
        if isinstance(classifier, nn.Module) and not isinstance(classifier, nn.Identity):
            for name, module in model.named_modules():
                if module is classifier:
                    return name, module
        if classifier is not None:
            return None  # several heads or no classifier: use the timm fallback
    for attribute in ("fc", "heads", "classifier", "head"):
        child = getattr(model, attribute, None)
        if isinstance(child, nn.Module):
            if isinstance(child, nn.Linear):
                return attribute, child
            inner = _last_linear(child, attribute)
            if inner is not None:
                return inner
    return _last_linear(model)


def _is_timm_like(model: nn.Module) -> bool:
    return callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))


def logits_and_features(
    model: nn.Module, x: torch.Tensor, layer: str | nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, features)`` of ``model`` on ``x`` from one forward pass.

    Args:
        model: any classifier returning logits ``(N, K)``.
        x: the input batch.
        layer: the classifier layer (qualified name or module) whose input are the features;
            found automatically by default (:func:`find_classifier`).

    Raises:
        ValueError: no classifier layer found, or it did not run during the forward.
    """
    if isinstance(layer, str):
        found: tuple[str, nn.Module] | None = (layer, model.get_submodule(layer))
    elif isinstance(layer, nn.Module):
        found = ("<given>", layer)
    else:
        found = find_classifier(model)
    if found is None:
        if _is_timm_like(model):
            features_map = model.forward_features(x)
            features = model.forward_head(features_map, pre_logits=True)
            logits = model.forward_head(features_map)
            return logits, features.flatten(1)
        raise ValueError(
            "cannot find the classifier layer of this model; pass layer='<name of the module "
            "that maps features to logits>'"
        )
    name, classifier = found
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        captured.append(inputs[0])

    handle = classifier.register_forward_hook(hook)
    try:
        logits = model(x)
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"the classifier layer {name!r} did not run in the model's forward; pass layer=")
    return logits, captured[-1].flatten(1)
