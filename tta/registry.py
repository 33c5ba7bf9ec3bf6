"""The method registry: method names and their classes, in registration order.

It imports no method module (as timm's model registry imports no model): a method module
registers its class with :func:`register_method`, and ``tta/methods/__init__.py``, which the
``tta`` package imports, imports the built-in ones, one line per method. The order of those
lines is the order of :func:`registered_methods`, which tables follow (reports, docs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from tta.methods.base import Method

_REGISTRY: dict[str, type["Method"]] = {}
M = TypeVar("M", bound=type)


def register_method(cls: M) -> M:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    name = cls.name  # type: ignore[attr-defined]
    if "+" in name or "__" in name:
        raise ValueError(f"method names cannot contain '+' or '__': {name!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name].__qualname__}")
    _REGISTRY[name] = cls  # type: ignore[assignment]
    return cls


def available_methods() -> list[str]:
    """Names of the registered methods, sorted (compose them as ``"<statistics>+<method>"``)."""
    return sorted(_REGISTRY)


def registered_methods() -> list[str]:
    """Names of the registered methods in registration order (the order of tables)."""
    return list(_REGISTRY)


class UnknownMethod(ValueError):
    """A method name that is not registered (``name`` holds it)."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"unknown method {name!r}; available: {', '.join(available_methods())} "
            "(or compositions such as 'unmix_tns+tent')"
        )
        self.name = name


def method_class(name: str) -> type["Method"]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethod(name) from None
