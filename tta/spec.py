"""A method with its hyperparameters, parsed once: :class:`MethodSpec`.

``"unmix_tns+sar"`` with ``{"k": 8, "sar__lr": 1e-4}`` becomes the classes of its parts
(statistics first, an objective's default statistics method added when it is used alone),
one checked ``Hparams`` instance per part (each value routed to the part that declares it,
converted, defaults filled in, a statistics method's defaults for the other part of an
explicit composition applied) and the stream count. ``tta.adapt``, :func:`tta.build_method`,
the Hydra app, ``benchmarks.perf`` and the protocol record all start from it, so a name is
split, a hyperparameter routed, type-checked and defaulted in one place, and a run builds
its method once.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Mapping

from tta.hyperparams import Hyperparameter, check_hparams, describe_hparams
from tta.methods.composite import Composite, check_parts
from tta.registry import method_class

if TYPE_CHECKING:
    from tta.methods.base import Method

#: separates the statistics part from the other part of a composition
COMPOSE = "+"
#: separates a part's name from a hyperparameter name where two parts share it (``tent__lr``)
ROUTE = "__"


def split_name(method: str) -> tuple[str, ...]:
    """``"unmix_tns+sar"`` -> ``("unmix_tns", "sar")``; ``"tent"`` -> ``("tent",)``. Checks the
    form only (one or two non-empty names), not that the names are registered."""
    if not isinstance(method, str) or not method:
        raise ValueError(f"method must be a non-empty string, got {method!r}")
    parts = tuple(method.split(COMPOSE))
    if len(parts) > 2:
        raise ValueError(f"a composition has two parts, '<statistics>+<method>', got {method!r}")
    if not all(parts):
        raise ValueError(f"a method is '<method>' or '<statistics>+<method>' with both names given, got {method!r}")
    return parts


def _route(classes: list[type["Method"]], hparams: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each hyperparameter to the part that declares it; ``<method>__<name>`` disambiguates."""
    fields = [{field.name for field in dataclasses.fields(cls.Hparams)} for cls in classes]
    routed: list[dict[str, Any]] = [{} for _ in classes]
    valid = sorted({f"{cls.name}{ROUTE}{f}" for cls, fs in zip(classes, fields) for f in fs} | set().union(*fields))
    for key, value in hparams.items():
        prefix, sep, field = str(key).partition(ROUTE)
        if sep:
            owners = [i for i, cls in enumerate(classes) if cls.name == prefix and field in fields[i]]
        else:
            owners = [i for i, fs in enumerate(fields) if key in fs]
            field = str(key)
        if not owners:
            raise ValueError(f"unknown hyperparameter {key!r}; valid: {valid}")
        if len(owners) > 1:
            names = [f"{classes[i].name}{ROUTE}{field}" for i in owners]
            raise ValueError(f"hyperparameter {key!r} is ambiguous; write one of {names}")
        routed[owners[0]][field] = (key, value)
    return routed


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A parsed method: see the module docstring. Build it with :meth:`parse`."""

    #: the name as given: ``"tent"``, ``"unmix_tns+sar"``
    name: str
    #: the method classes, statistics first (``("norm", "tent")`` for ``"tent"``)
    parts: tuple[type["Method"], ...]
    #: one checked ``Hparams`` instance per part (defaults filled in)
    hparams: tuple[Any, ...]
    #: the hyperparameters as the caller passed them (their keys), converted to the declared types
    given: Mapping[str, Any]
    #: an objective used alone, on its default statistics method
    implicit: bool
    num_streams: int = 1

    @classmethod
    def parse(cls, method: "str | MethodSpec", hparams: Mapping[str, Any] | None = None, *, num_streams: int = 1) -> "MethodSpec":
        """Parse ``method`` (a name or ``"<statistics>+<method>"``) with ``hparams``.

        Raises:
            ValueError: an unknown method or hyperparameter (the message lists the valid
                ones), a value out of range, or streams the method does not support.
            TypeError: a value of the wrong type (the message names it and the accepted ones).
        """
        if isinstance(method, MethodSpec):
            if hparams:
                raise TypeError("a parsed MethodSpec takes no further hyperparameters")
            return method
        names = split_name(method)
        classes = [method_class(name) for name in names]
        implicit = len(classes) == 1 and classes[0].default_statistics is not None
        if implicit:
            classes = [method_class(classes[0].default_statistics), classes[0]]  # type: ignore[arg-type]
        if len(classes) == 2:
            check_parts(*classes)
        for klass in classes:
            klass.check_streams(num_streams)
        routed = _route(classes, dict(hparams or {}))
        given: dict[str, Any] = {}
        instances = []
        for index, (klass, values) in enumerate(zip(classes, routed)):
            checked = check_hparams(klass.name, klass.Hparams, {field: value for field, (_, value) in values.items()})
            given.update({key: checked[field] for field, (key, _) in values.items()})
            if index == 1 and len(classes) == 2 and not implicit:
                declared = {field.name for field in dataclasses.fields(klass.Hparams)}
                for field, value in getattr(classes[0], "objective_defaults", {}).items():
                    if field in declared:
                        checked.setdefault(field, value)
            instances.append(klass.Hparams(**checked))
        return cls(method, tuple(classes), tuple(instances), given, implicit, num_streams)

    @property
    def is_composite(self) -> bool:
        """Two parts: an explicit ``"a+b"`` or an objective on its default statistics method."""
        return len(self.parts) == 2

    def build(self, seed: int | None = None) -> "Method":
        """The method, ready for ``convert``. ``seed`` seeds its generator (the parts of a
        composition share it); None is :data:`tta.methods.base.DEFAULT_SEED`."""
        from tta.methods.base import DEFAULT_SEED

        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an integer, got {seed!r} ({type(seed).__name__})")
        seed = DEFAULT_SEED if seed is None else seed
        # copies: a method may consume a value at conversion (EATA's fisher_loader)
        methods = [
            klass(dataclasses.replace(hparams), num_streams=self.num_streams)
            for klass, hparams in zip(self.parts, self.hparams)
        ]
        if len(methods) == 1:
            methods[0].set_seed(seed)
            return methods[0]
        return Composite(methods[0], methods[1], implicit=self.implicit, seed=seed)

    def hparams_by_part(self) -> dict[str, dict[str, Any]]:
        """``{part name: {hyperparameter: value}}``, defaults included."""
        return {klass.name: dataclasses.asdict(hparams) for klass, hparams in zip(self.parts, self.hparams)}

    def describe_hparams(self) -> list[Hyperparameter]:
        """Every hyperparameter this method accepts, per part, with the values this spec uses
        as defaults (see :func:`tta.hparams`)."""
        return [
            item
            for klass, values in zip(self.parts, self.hparams)
            for item in describe_hparams(klass.name, klass.Hparams, values)
        ]


def hparams(method: str) -> list[Hyperparameter]:
    """The hyperparameters of ``method`` (a registered name or a composition), each with its
    type, default, accepted values, the paper's symbol and a description::

        >>> for h in tta.hparams("sar"): print(h)
        lr: a float or None, > 0; default None. learning rate of the base SGD; ...

    An objective used alone lists its default statistics method's hyperparameters too (they
    are accepted, e.g. ``tta.adapt(model, "tent", momentum=0.1)`` sets ``norm``'s); a
    composition's defaults are its own (``"unmix_tns+tent"`` trains with lr 1e-5)."""
    return MethodSpec.parse(method).describe_hparams()


def build_method(method: str, num_streams: int = 1, seed: int | None = None, **hparams: Any) -> "Method":
    """Build a method from ``"name"`` or ``"statistics+name"`` with routed hyperparameters
    (``MethodSpec.parse(...).build(seed)``).

    ``seed`` seeds the method's generator (``Method.generator``; the parts of a composition
    share it); None is :data:`tta.methods.base.DEFAULT_SEED`. In an explicit composition the
    statistics method's ``objective_defaults`` replace the other part's defaults of the same
    name (``"unmix_tns+tent"`` trains with lr 1e-5, see :class:`tta.methods.unmix_tns.UnMixTNS`);
    a value the caller passes wins.
    """
    return MethodSpec.parse(method, hparams, num_streams=num_streams).build(seed)
