"""Hyperparameters: declared once per method as a dataclass, checked and described from it.

A method's ``Hparams`` dataclass is the single source of truth for its hyperparameters:
names, types (the annotations), defaults, accepted ranges or values (:func:`hparam`
metadata), the paper's symbol (``symbol=``) and a one-line description (the ``#:`` comment
above the field, as Sphinx reads it)::

    @dataclasses.dataclass
    class MyHparams:
        #: learning rate (official 1e-3)
        lr: float = hparam(1e-3, low=0.0, low_open=True)          # a float > 0
        #: gradient steps per batch
        steps: int = hparam(1, low=1)                            # a positive integer
        optimizer: str = hparam("adam", choices=("adam", "sgd"))
        momentum: float | None = hparam(None, low=0.0, high=1.0, symbol="m")  # None or in [0, 1]
        exclude: tuple[str, ...] = ()                            # lists become tuples

        def __post_init__(self) -> None:  # checks across fields (optional)
            ...

:func:`check_hparams` is the one type and range check (``tta.adapt``, :func:`tta.build_method`
and the Hydra app all go through :class:`tta.spec.MethodSpec`, which calls it): a wrong type
raises ``TypeError``, a value out of range ``ValueError``, both naming the method, the
parameter and the accepted values. Ints are accepted for float fields (converted), integral
floats for int fields; bools are never numbers; a list (or one string) for a tuple field.
:func:`describe_hparams` lists the same facts for users (``tta.hparams("sar")``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import numbers
import re
import types
import typing
from typing import Any, Callable, Iterable, Sequence


def hparam(
    default: Any = dataclasses.MISSING,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    choices: Sequence[Any] | None = None,
    symbol: str | None = None,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with a range (``[low, high]``, ends open when ``*_open``) or a set of
    accepted values, checked by :func:`check_hparams`, and the paper's ``symbol`` for it.
    ``None`` passes when the annotation allows it."""
    metadata = {
        "low": low, "high": high, "low_open": low_open, "high_open": high_open, "choices": choices, "symbol": symbol,
    }
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# -- describing a field ---------------------------------------------------------------------
def _fmt(value: float) -> str:
    return repr(value) if not isinstance(value, float) or not value.is_integer() else str(int(value))


def _range_text(kind: type, meta: dict[str, Any]) -> str | None:
    """``"be > 0"``, ``"lie in [0, 1)"``, ``"be one of [...]"``: what a value must satisfy."""
    low, high = meta.get("low"), meta.get("high")
    low_open, high_open = meta.get("low_open", False), meta.get("high_open", False)
    if meta.get("choices") is not None:
        return f"be one of {list(meta['choices'])}"
    if low is None and high is None:
        return None
    if kind is int and high is None and not low_open and low == 1:
        return "be a positive integer"
    if high is None:
        return f"be {'>' if low_open else '>='} {_fmt(low)}"
    if low is None:
        return f"be {'<' if high_open else '<='} {_fmt(high)}"
    return f"lie in {'(' if low_open else '['}{_fmt(low)}, {_fmt(high)}{')' if high_open else ']'}"


def _short_rule(rule: str | None) -> str:
    """``"be > 0"`` -> ``"> 0"``, ``"lie in [0, 1]"`` -> ``"in [0, 1]"``, ``"be one of [...]"`` ->
    ``"one of [...]"``, ``"be a positive integer"`` -> ``">= 1"``."""
    if rule == "be a positive integer":
        return ">= 1"
    return (rule or "").removeprefix("be ").removeprefix("lie ")


def _in_range(value: Any, meta: dict[str, Any]) -> bool:
    if meta.get("choices") is not None:
        return value in meta["choices"]
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (value < low or (meta.get("low_open") and value == low)):
        return False
    if high is not None and (value > high or (meta.get("high_open") and value == high)):
        return False
    return value == value  # NaN is in no range


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    if origin is tuple:
        args = typing.get_args(annotation)
        plural = {str: "strings", int: "integers", float: "floats", bool: "bools"}
        return f"a list of {plural.get(args[0], _type_name(args[0]))}" if args else "a list"
    if annotation is int:
        return "an integer"
    if annotation is Any:
        return "any value"
    return {float: "a float", bool: "a bool", str: "a string"}.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _base_type(annotation: Any) -> type:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return args[0] if args else type(None)
    return annotation if isinstance(annotation, type) else object


# -- converting a value ---------------------------------------------------------------------
class _TypeMismatch(Exception):
    pass


def _convert(annotation: Any, value: Any) -> Any:
    """``value`` converted to ``annotation`` (numbers widen, lists become tuples);
    :class:`_TypeMismatch` when it does not fit. Unknown annotations accept anything."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value)
            except _TypeMismatch:
                continue
        raise _TypeMismatch
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _TypeMismatch
    if annotation is int:
        if isinstance(value, bool):
            raise _TypeMismatch
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, numbers.Real) and float(value).is_integer():
            return int(value)
        raise _TypeMismatch
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _TypeMismatch
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise _TypeMismatch
        return value
    if origin is tuple:
        args = typing.get_args(annotation)
        item = args[0] if args else Any
        if isinstance(value, str) and item is str:
            return (value,)  # one pattern/name for a list of them
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise _TypeMismatch
        return tuple(_convert(item, element) for element in value)
    if annotation is type(None):
        if value is None:
            return None
        raise _TypeMismatch
    return value


def _hints(hparams_cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(hparams_cls)
    except Exception:  # noqa: BLE001 - annotations we cannot resolve are not type-checked
        return {}


def check_hparams(method: str, hparams_cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Check ``values`` against the fields of ``hparams_cls``; returns them converted.

    Raises:
        ValueError: an unknown name (the message lists the valid ones) or a value outside
            the field's range/choices.
        TypeError: a value of the wrong type.
    """
    fields = {field.name: field for field in dataclasses.fields(hparams_cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {unknown} for method {method!r}; valid: {sorted(fields) or 'none'}"
        )
    hints = _hints(hparams_cls)
    converted: dict[str, Any] = {}
    for name, value in values.items():
        meta = dict(fields[name].metadata)
        annotation = hints.get(name, Any)
        try:
            value = _convert(annotation, value)
        except _TypeMismatch:
            hint = _short_rule(_range_text(_base_type(annotation), meta))
            detail = f" ({hint})" if hint else ""
            raise TypeError(
                f"method {method!r}: hyperparameter {name} must be {_type_name(annotation)}{detail}, "
                f"got {value!r} ({type(value).__name__})"
            ) from None
        if value is not None and meta and not _in_range(value, meta):
            rule = _range_text(_base_type(annotation), meta)
            raise ValueError(f"method {method!r}: {name} must {rule}, got {value!r}")
        converted[name] = value
    return converted


# -- describing the hyperparameters of a method ---------------------------------------------
@dataclasses.dataclass(frozen=True)
class Hyperparameter:
    """One hyperparameter of a method, as :func:`tta.hparams` lists it."""

    #: the method (part) that declares it
    method: str
    name: str
    #: accepted type, in words ("a float", "a float or None", "a list of strings")
    type: str
    default: Any
    #: accepted values or range in words ("> 0", "in [0, 1]", "one of ['adam', 'sgd']"), "" if any
    accepts: str
    #: the symbol of the method's paper ("rho", "E_0"), "" where the paper has none
    symbol: str
    #: what it does (the comment above the field in the method's ``Hparams``)
    doc: str

    def __str__(self) -> str:
        symbol = f", symbol {self.symbol}" if self.symbol else ""
        accepts = f", {self.accepts}" if self.accepts else ""
        return f"{self.name} ({self.method}{symbol}): {self.type}{accepts}; default {self.default!r}. {self.doc}".rstrip()


_COMMENT = re.compile(r"^\s*#:\s?(.*)$")
_FIELD = re.compile(r"^\s*([A-Za-z_]\w*)\s*:")


@functools.lru_cache(maxsize=None)
def _field_comments(hparams_cls: type) -> dict[str, str]:
    """``{field: text of the "#:" comment lines above it}`` over the class and its bases."""
    comments: dict[str, str] = {}
    for klass in reversed(hparams_cls.__mro__):
        if klass is object:
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):  # no source (e.g. built interactively): no descriptions
            continue
        pending: list[str] = []
        for line in lines[1:]:
            comment = _COMMENT.match(line)
            if comment:
                pending.append(comment.group(1).strip())
                continue
            field = _FIELD.match(line)
            if field and pending:
                comments[field.group(1)] = " ".join(pending)
            pending = []
    return comments


def describe_hparams(method: str, hparams_cls: type, values: Any = None) -> list[Hyperparameter]:
    """The hyperparameters of ``hparams_cls`` (a method's ``Hparams``), in declaration order;
    the defaults are those of ``values`` (an ``Hparams`` instance) when given."""
    hints = _hints(hparams_cls)
    comments = _field_comments(hparams_cls)
    described = []
    for field in dataclasses.fields(hparams_cls):
        meta = dict(field.metadata)
        annotation = hints.get(field.name, Any)
        if values is not None:
            default = getattr(values, field.name)
        elif field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = field.default_factory()  # type: ignore[misc]
        else:
            default = None
        described.append(
            Hyperparameter(
                method=method,
                name=field.name,
                type=_type_name(annotation),
                default=default,
                accepts=_short_rule(_range_text(_base_type(annotation), meta)),
                symbol=meta.get("symbol") or "",
                doc=comments.get(field.name, ""),
            )
        )
    return described


@dataclasses.dataclass
class NoHparams:
    """A method without hyperparameters."""
