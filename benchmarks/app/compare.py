"""Which runs may share a table: equal protocols except for the swept keys.

Runs go side by side in the report only when their protocol blocks
(:mod:`benchmarks.protocol`) agree on every key except the *swept* ones:

* always: ``method`` (the table's rows) and ``setting.seeds`` (replicates of a cell);
* every config key that the runs' Hydra overrides set to different values (a sweep
  ``method=a,b stream.delta=0.1,1`` sweeps ``method`` and ``stream.delta``), mapped to the
  protocol keys it changes by :data:`CONFIG_TO_PROTOCOL`;
* whatever the user names with ``--swept`` (a config key or a protocol prefix).

Runs that disagree on anything else (other weights for the same model name, another data
file, another corruption generator, another library version, another metric definition)
are split into protocol groups; the report shows one set of tables per group and says which
keys tell the groups apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.protocol import fingerprint_of, flatten, matches, protocol_of

ALWAYS_SWEPT: tuple[str, ...] = ("method", "setting.seeds")

#: Protocol keys that change when a config key (or a key below it) changes; the longest
#: matching config prefix wins.
CONFIG_TO_PROTOCOL: dict[str, tuple[str, ...]] = {
    "method": ("method",),
    "seed": ("setting.seeds", "setting.order_sha256"),
    "model": ("model", "input"),
    "dataset": ("data", "input.resolution", "setting.order_sha256"),
    "stream": ("setting", "data", "metric.averaging"),
    "stream.seed": ("setting.seeds", "setting.order_sha256"),
    "stream.corruption_seed": ("setting.seeds", "data.corruption_seed"),
    "stream.batch_size": ("setting.batch_size", "setting.order_sha256"),
    "stream.label_order": ("setting.label_order", "setting.label_order_params", "setting.order_sha256"),
    "stream.delta": ("setting.label_order_params", "setting.order_sha256"),
    "stream.dirichlet_min_chunk": ("setting.label_order_params", "setting.order_sha256"),
    "eval": ("metric",),
    "eval.multi_stream": ("setting.num_streams", "setting.reset_policy"),
    "device": ("software.device",),
}

NO_PROTOCOL = "<no protocol block: written before protocol version 1>"


def protocol_prefixes(key: str) -> tuple[str, ...]:
    """The protocol keys a config key changes; a key that names no config entry is taken as
    a protocol prefix itself (``--swept model.weights_sha256``)."""
    key = key.lstrip("+~")
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in CONFIG_TO_PROTOCOL:
            return CONFIG_TO_PROTOCOL[prefix]
    return (key,)


def _override_values(record: dict[str, Any]) -> dict[str, str]:
    out = {}
    for item in record.get("overrides") or []:
        key, sep, value = str(item).partition("=")
        if sep:
            out[key.lstrip("+~")] = value
    return out


def swept_config_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    """Config keys the runs' overrides set to different values (absent counts as a value)."""
    values = [_override_values(r) for r in records]
    keys = sorted({k for v in values for k in v})
    return [k for k in keys if len({v.get(k, "<default>") for v in values}) > 1]


@dataclass
class ProtocolGroup:
    """Runs whose protocols agree on every key that is not swept."""

    records: list[dict[str, Any]] = field(default_factory=list)
    #: the flattened protocol of the group minus the swept keys (None: no protocol recorded)
    reduced: dict[str, Any] | None = None
    #: ``key -> value`` of the keys that tell this group from the others
    distinct: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        if self.reduced is None:
            return NO_PROTOCOL
        return ", ".join(f"{k}={_short(v)}" for k, v in self.distinct.items()) or f"protocol {fingerprint_of(self.reduced)[:12]}"


@dataclass
class Comparison:
    groups: list[ProtocolGroup]
    #: config keys found swept in the overrides, plus the ones named by the caller
    swept_keys: list[str]
    #: the protocol keys that may differ within a group
    swept_prefixes: tuple[str, ...]

    @property
    def differing_keys(self) -> list[str]:
        return sorted({k for g in self.groups for k in g.distinct})


def group_runs(records: Sequence[dict[str, Any]], swept: Iterable[str] = ()) -> Comparison:
    """Split ``records`` into protocol groups (see the module docstring)."""
    keys = sorted(set(swept_config_keys(records)) | set(swept))
    prefixes = tuple(dict.fromkeys(ALWAYS_SWEPT + tuple(p for k in keys for p in protocol_prefixes(k))))
    groups: dict[str, ProtocolGroup] = {}
    for record in records:
        block = protocol_of(record)
        if block is None:
            groups.setdefault("", ProtocolGroup()).records.append(record)
            continue
        reduced = {k: v for k, v in flatten(block).items() if not matches(k, prefixes)}
        group = groups.setdefault(fingerprint_of(reduced), ProtocolGroup(reduced=reduced))
        group.records.append(record)
    listed = list(groups.values())
    with_protocol = [g for g in listed if g.reduced is not None]
    if len(with_protocol) > 1:
        all_keys = sorted({k for g in with_protocol for k in g.reduced})  # type: ignore[union-attr]
        differing = [k for k in all_keys if len({repr(g.reduced.get(k, "<absent>")) for g in with_protocol}) > 1]  # type: ignore[union-attr]
        for g in with_protocol:
            g.distinct = {k: g.reduced.get(k, "<absent>") for k in differing}  # type: ignore[union-attr]
    return Comparison(listed, keys, prefixes)


def _short(value: Any, width: int = 24) -> str:
    text = str(value)
    return text if len(text) <= width else text[: width - 1] + "…"
