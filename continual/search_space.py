"""Declared hyperparameter search spaces, expanded into grids with Hydra's sweeper machinery.

A space maps names to values in Hydra's sweep syntax (the ``-m`` command line): a
comma-separated list ``"0.01,0.03,0.1"``, ``"range(1,4)"``, ``"choice(a,b)"`` or a single
value, or a Python list of values. :func:`grid` parses every entry with Hydra's override
parser and takes the Cartesian product with :meth:`BasicSweeper.split_arguments` (the basic
sweeper's own expansion, in its order), then reads the values back with the same parser,
so a space means exactly what it would mean on a Hydra command line. Continuous sweeps
(``interval(...)``) need a sampler and are refused.

Used by the competition harness's tuning phase (:mod:`continual.harness.tuning`) and the
continual experiments' reality-check protocol (:mod:`continual.experiments.reality_check`).
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: the module-level name under which a submission declares its space.
SPACE_NAME = "SEARCH_SPACE"


def _as_sweep(name: str, values: Any) -> str:
    if not name.isidentifier():
        raise ValueError(f"hyperparameter names must be identifiers, got {name!r}")
    if isinstance(values, (list, tuple)):
        if not values:
            raise ValueError(f"hyperparameter {name!r} has no values")
        # JSON literals are valid Hydra values (strings double-quoted, numbers, true/false/null).
        return f"{name}=choice({','.join(json.dumps(v) for v in values)})"
    if isinstance(values, (str, int, float, bool)) or values is None:
        return f"{name}={values if isinstance(values, str) else json.dumps(values)}"
    raise ValueError(f"hyperparameter {name!r}: expected a sweep string or a list, got {type(values).__name__}")


def grid(space: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every point of ``space`` (a list of ``{name: value}``), in Hydra's basic-sweeper order.

    Raises:
        ValueError: a malformed entry, or a continuous (``interval``) sweep.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if not space:
        return [{}]
    parser = OverridesParser.create()
    try:
        overrides = parser.parse_overrides([_as_sweep(name, values) for name, values in space.items()])
        for override in overrides:
            if override.is_sweep_override() and not override.is_discrete_sweep() and not override.is_range_sweep():
                raise ValueError(f"{override.key_or_group}: only discrete sweeps form a grid (no interval)")
        (batch,) = BasicSweeper.split_arguments(overrides, max_batch_size=None)
        points = []
        for line in batch:
            point = {}
            for parsed in parser.parse_overrides(line):
                point[parsed.key_or_group] = parsed.value()
            points.append(point)
    except HydraException as error:
        raise ValueError(f"bad search space {dict(space)!r}: {error}") from error
    return points


def declared_space(path: str | Path) -> dict[str, Any]:
    """The ``SEARCH_SPACE = {...}`` literal of a Python file, read without running the file
    (the harness must not execute a submission's code in its own process); {} if absent.

    Raises:
        ValueError: ``SEARCH_SPACE`` is assigned something other than a literal dict.
    """
    tree = ast.parse(Path(path).read_text(), filename=str(path))
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == SPACE_NAME for t in targets) and node.value is not None:
            try:
                space = ast.literal_eval(node.value)
            except ValueError as error:
                raise ValueError(f"{SPACE_NAME} in {path} must be a literal dict: {error}") from error
            if not isinstance(space, dict):
                raise ValueError(f"{SPACE_NAME} in {path} must be a dict, got {type(space).__name__}")
            return space
    return {}
