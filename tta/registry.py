"""Method registry and composition parsing (``"unmix_tns+sar"``).

A method registers itself with :func:`register_method`; ``tta/methods/__init__.py`` imports
each method module once, so adding a method is one file plus one import line there.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from tta.methods.base import Method

_REGISTRY: dict[str, type["Method"]] = {}
M = TypeVar("M", bound=type)


def register_method(cls: M) -> M:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    name = cls.name  # type: ignore[attr-defined]
    if "+" in name:
        raise ValueError(f"method names cannot contain '+': {name!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name].__qualname__}")
    _REGISTRY[name] = cls  # type: ignore[assignment]
    return cls


def _ensure_loaded() -> None:
    import tta.methods  # noqa: F401  (registers the built-in methods)


def available_methods() -> list[str]:
    """Names of the registered methods (compose them as ``"<statistics>+<method>"``)."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def method_class(name: str) -> type["Method"]:
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown method {name!r}; available: {', '.join(available_methods())} "
            "(or compositions such as 'unmix_tns+tent')"
        ) from None


def _split_hparams(classes: list[type["Method"]], hparams: dict[str, Any]) -> list[dict[str, Any]]:
    """Route each hyperparameter to the part that declares it; ``<method>__<name>`` disambiguates."""
    fields = [{field.name for field in dataclasses.fields(cls.Hparams)} for cls in classes]
    routed: list[dict[str, Any]] = [{} for _ in classes]
    valid = sorted({f"{cls.name}__{f}" for cls, fs in zip(classes, fields) for f in fs} | set().union(*fields))
    for key, value in hparams.items():
        prefix, sep, field = key.partition("__")
        if sep:
            owners = [i for i, cls in enumerate(classes) if cls.name == prefix and field in fields[i]]
        else:
            owners = [i for i, fs in enumerate(fields) if key in fs]
            field = key
        if not owners:
            raise ValueError(f"unknown hyperparameter {key!r}; valid: {valid}")
        if len(owners) > 1:
            names = [f"{classes[i].name}__{field}" for i in owners]
            raise ValueError(f"hyperparameter {key!r} is ambiguous; write one of {names}")
        routed[owners[0]][field] = value
    return routed


def build_method(spec: str, num_streams: int = 1, seed: int | None = None, **hparams: Any) -> "Method":
    """Build a method from ``"name"`` or ``"statistics+name"`` with routed hyperparameters.

    ``seed`` seeds the method's generator (``Method.generator``; the parts of a composition
    share it); None is :data:`tta.methods.base.DEFAULT_SEED`. In an explicit composition the
    statistics method's ``objective_defaults`` replace the other part's defaults of the same
    name (``"unmix_tns+tent"`` trains with lr 1e-5, see :class:`tta.methods.unmix_tns.UnMixTNS`);
    a value the caller passes wins.
    """
    from tta.methods.base import DEFAULT_SEED
    from tta.methods.composite import Composite

    if not isinstance(spec, str) or not spec:
        raise ValueError(f"method must be a non-empty string, got {spec!r}")
    parts = spec.split("+")
    if len(parts) > 2:
        raise ValueError(f"a composition has two parts, '<statistics>+<method>', got {spec!r}")
    classes = [method_class(part) for part in parts]
    if len(parts) == 1 and classes[0].default_statistics is not None:
        classes = [method_class(classes[0].default_statistics), classes[0]]
        implicit = True
    else:
        implicit = False
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an integer, got {seed!r} ({type(seed).__name__})")
    routed = _split_hparams(classes, hparams)
    if len(classes) == 2 and not implicit:
        declared = {field.name for field in dataclasses.fields(classes[1].Hparams)}
        for name, value in getattr(classes[0], "objective_defaults", {}).items():
            if name in declared:
                routed[1].setdefault(name, value)
    methods = [cls(num_streams=num_streams, **kw) for cls, kw in zip(classes, routed)]
    seed = DEFAULT_SEED if seed is None else seed
    if len(methods) == 1:
        methods[0].set_seed(seed)
        return methods[0]
    return Composite(methods[0], methods[1], implicit=implicit, seed=seed)
