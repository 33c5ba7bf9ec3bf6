"""Choosing a default rule by measurement: regret of candidate rules on dev and eval streams.

A *stream* is everything a result depends on except the method: the run's protocol block
(:mod:`benchmarks.protocol`) without its ``method`` keys. Its fingerprint identifies it; every
method of the pool must have exactly one finished run on every stream.

A *rule* maps what a deployment wrapper knows when ``tta.adapt(model)`` is called to a method
of the pool:

* one method everywhere (``norm``, ``source``, ...);
* a method per value of a *feature* of the model, such as the kind of its normalization layers
  (:data:`FEATURES`); values a rule has no entry for fall back to ``source``;
* ``auto`` as :func:`tta.api.choose_method` decides today (a norm-kind rule read off the code).

Regret of a rule on a stream (in error points, 100 x the run's ``summary.mean_error``):

* vs best: its method's error minus the lowest error of any method of the pool on that stream;
* vs source: its method's error minus the unadapted model's error.

Criterion (:func:`selection_key`): a rule is *feasible* when its regret vs source is at most
``max_source_regret`` points on every development stream (``source`` itself always is); among
feasible rules the lowest maximum over development streams of the regret vs best wins, then
the lowest mean of it, then the rule with fewer distinct methods, then the name. The
evaluation streams are scored, never consulted: :func:`select` chooses from the development
streams alone.

Refusals (:class:`SelectError`): runs without a protocol block; dev and eval runs that differ,
outside the keys their sweeps vary, in anything (other weights, data, library commit: the
report's protocol comparison, :func:`benchmarks.app.compare.group_runs`); a stream that lacks a
method of the pool, or has it twice (the closest run of that method is named with the protocol
keys it differs in); a stream that is both a dev and an eval stream.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.app.compare import group_runs
from benchmarks.protocol import differences, fingerprint_of, flatten, matches, protocol_of

SELECTION_FORMAT = "tta-bench-selection"
SELECTION_VERSION = 1
#: The rule used for feature values that no development stream measured.
FALLBACK = "source"
#: The protocol keys that may differ between the runs of one stream.
METHOD_KEYS: tuple[str, ...] = ("method",)


class SelectError(ValueError):
    """The runs cannot be compared or selected from; the message says why."""


# -- features: what a wrapper knows about the model when it is wrapped ------------------------
def _layer_classes(block: Mapping[str, Any]) -> list[str]:
    """Class names of ``model.normalization_layers`` (``"BatchNorm2d x 20"`` -> ``BatchNorm2d``)."""
    layers = (block.get("model") or {}).get("normalization_layers") or []
    return sorted({str(entry).split(" x ")[0] for entry in layers})


def norm_kind(block: Mapping[str, Any]) -> str:
    """The branches of :func:`tta.api.choose_method`, from the recorded layer class names:
    ``batchnorm`` (any BatchNorm flavour), ``group_layer_norm`` (GroupNorm/LayerNorm and no
    BatchNorm), ``batch_channel_norm`` (batch-channel normalization, before the other two),
    ``none`` (no normalization layer), ``other`` (only other normalization classes)."""
    classes = _layer_classes(block)
    if any("BatchChannelNorm" in name for name in classes):
        return "batch_channel_norm"
    if any("BatchNorm" in name for name in classes):
        return "batchnorm"
    if any("GroupNorm" in name or "LayerNorm" in name for name in classes):
        return "group_layer_norm"
    return "none" if not classes else "other"


def norm_layers(block: Mapping[str, Any]) -> str:
    """The exact set of normalization layer classes (``BatchNorm2d+LayerNorm``), or ``none``."""
    return "+".join(_layer_classes(block)) or "none"


def batch_size(block: Mapping[str, Any]) -> str:
    """The stream's batch size. Not known at wrap time: a rule that uses it needs a wrapper
    that decides at its first batch."""
    return str((block.get("setting") or {}).get("batch_size"))


FEATURES: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "norm_kind": norm_kind, "norm_layers": norm_layers, "batch_size": batch_size,
}


# -- streams ------------------------------------------------------------------------------------
@dataclass
class Stream:
    """One stream and the error (percent) of every method of the pool on it."""

    key: str
    split: str
    protocol: dict[str, Any]
    setting: dict[str, Any]
    seed: Any
    features: dict[str, str]
    errors: dict[str, float] = field(default_factory=dict)
    label: str = ""

    @property
    def best(self) -> tuple[str, float]:
        method = min(self.errors, key=lambda m: (self.errors[m], m))
        return method, self.errors[method]


def _method_label(record: Mapping[str, Any]) -> str:
    return str(record["method"].get("label") or record["method"]["name"])


def stream_key(block: Mapping[str, Any], ignore: Sequence[str] = ()) -> str:
    """Fingerprint of a protocol block without the method keys (and ``ignore``)."""
    reduced = {k: v for k, v in flatten(block).items() if not matches(k, METHOD_KEYS + tuple(ignore))}
    return fingerprint_of(reduced)


def _error(record: Mapping[str, Any]) -> float:
    value = record["summary"].get("mean_error")
    if value is None or not math.isfinite(float(value)):
        raise SelectError(f"{record.get('_dir', record.get('run_id'))}: the run has no finite mean error")
    return 100.0 * float(value)


def build_streams(
    records: Sequence[dict[str, Any]], split: str, *, methods: Sequence[str] | None = None, ignore: Sequence[str] = ()
) -> tuple[list[Stream], list[str]]:
    """The streams of one split and the method pool (every method found, or ``methods``).

    Refuses a stream that lacks a method of the pool or holds one twice.
    """
    if not records:
        raise SelectError(f"no finished runs in the {split} sweep")
    for record in records:
        if protocol_of(record) is None:
            raise SelectError(f"{record.get('_dir')}: run without a protocol block (written before protocol version 1); re-run it")
    pool = sorted(methods) if methods else sorted({_method_label(r) for r in records})
    kept = [r for r in records if _method_label(r) in pool]
    streams: dict[str, Stream] = {}
    runs: dict[tuple[str, str], dict[str, Any]] = {}
    for record in kept:
        block = protocol_of(record)
        assert block is not None
        key = stream_key(block, ignore)
        method = _method_label(record)
        stream = streams.setdefault(key, Stream(
            key=key, split=split, protocol=block, setting=dict(record.get("setting") or {}), seed=record.get("seed"),
            features={name: fn(block) for name, fn in FEATURES.items()},
        ))
        if method in stream.errors:
            raise SelectError(
                f"{split}: {method} ran twice on the same stream ({runs[key, method].get('_dir')} and {record.get('_dir')})"
            )
        stream.errors[method] = _error(record)
        runs[key, method] = record
    problems = []
    for stream in streams.values():
        missing = [m for m in pool if m not in stream.errors]
        for method in missing:
            problems.append(f"{split} stream {_describe(stream)} has no run of {method}" + _closest(stream, method, kept, ignore))
    if problems:
        raise SelectError(
            "every method of the pool must have one run on every stream (a stream is the protocol minus the method keys):\n  "
            + "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        )
    return list(streams.values()), pool


def _describe(stream: Stream) -> str:
    setting = stream.setting
    order = str(setting.get("label_order")) + (f"(delta={setting['delta']:g})" if setting.get("delta") is not None else "")
    return f"[{setting.get('model')} {setting.get('dataset')} {order} batch {setting.get('batch_size')} seed {stream.seed}; {stream.key[:12]}]"


def _closest(stream: Stream, method: str, records: Sequence[dict[str, Any]], ignore: Sequence[str]) -> str:
    """The run of ``method`` whose protocol differs least from the stream's, and how."""
    candidates = []
    for record in records:
        if _method_label(record) != method:
            continue
        diffs = differences(stream.protocol, protocol_of(record) or {}, ignore=METHOD_KEYS + tuple(ignore))
        candidates.append((len(diffs), diffs, record))
    if not candidates:
        return " (no run of it at all)"
    _, diffs, record = min(candidates, key=lambda c: c[0])
    keys = ", ".join(k for k, _, _ in diffs[:6]) + (" ..." if len(diffs) > 6 else "")
    return f"; its closest run {record.get('_dir')} differs in {keys}"


def check_comparable(dev: Sequence[dict[str, Any]], eval_: Sequence[dict[str, Any]], swept: Iterable[str] = ()) -> None:
    """The report's protocol comparison over dev and eval runs together: one protocol group, or
    a refusal naming the keys that differ without being swept."""
    comparison = group_runs(list(dev) + list(eval_), swept)
    if len(comparison.groups) > 1:
        lines = [f"  group {i}: {len(g.records)} run(s), {g.describe()}" for i, g in enumerate(comparison.groups, start=1)]
        raise SelectError(
            f"the dev and eval runs fall into {len(comparison.groups)} protocol groups that differ in keys no sweep "
            f"varied ({', '.join(comparison.differing_keys) or 'a missing protocol block'}); runs of different "
            "protocols are not compared. Name an intended difference with swept=[KEY] (a config key such as model, "
            "or a protocol key such as software.git_commit).\n" + "\n".join(lines)
        )


def label_streams(streams: Sequence[Stream]) -> None:
    """Name each stream by the setting fields (and seed) that differ between all streams."""
    rows = [{**{k: v for k, v in s.setting.items()}, "seed": s.seed} for s in streams]
    keys = sorted({k for r in rows for k in r})
    varying = [k for k in keys if len({repr(r.get(k)) for r in rows}) > 1]
    for stream, row in zip(streams, rows):
        stream.label = ", ".join(f"{k}={row[k]:g}" if isinstance(row.get(k), float) else f"{k}={row.get(k)}"
                                 for k in varying if row.get(k) is not None) or stream.key[:12]
    seen: dict[str, int] = {}
    for stream in streams:
        seen[stream.label] = seen.get(stream.label, 0) + 1
    for stream in streams:
        if seen[stream.label] > 1:
            stream.label += f" [{stream.key[:8]}]"


# -- rules ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """``feature=None``: ``default`` everywhere; else ``choice[feature value]`` or ``default``."""

    name: str
    default: str
    feature: str | None = None
    choice: tuple[tuple[str, str], ...] = ()

    def method_for(self, stream: Stream) -> str:
        if self.feature is None:
            return self.default
        return dict(self.choice).get(stream.features[self.feature], self.default)

    @property
    def methods(self) -> list[str]:
        return sorted({self.default, *dict(self.choice).values()}) if self.feature else [self.default]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "feature": self.feature, "choice": dict(self.choice), "default": self.default}


def single_rules(pool: Sequence[str]) -> list[Rule]:
    return [Rule(name=m, default=m) for m in pool]


def current_auto_rule() -> Rule:
    """:func:`tta.api.choose_method` read off the code: what it picks for a model of each norm kind."""
    from torch import nn

    from tta.api import choose_method
    from tta.layers.bcn import BatchChannelNorm2d

    def classifier(norm: nn.Module | None) -> nn.Module:  # the models of a selection are classifiers
        body = [nn.Conv2d(3, 4, 1)] + ([norm] if norm is not None else [])
        return nn.Sequential(*body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    probes = {
        "batchnorm": classifier(nn.BatchNorm2d(4)),
        "group_layer_norm": classifier(nn.GroupNorm(2, 4)),
        "batch_channel_norm": classifier(BatchChannelNorm2d(4, num_groups=2)),
        "none": classifier(None),
    }
    choice = tuple((kind, choose_method(model)[0]) for kind, model in probes.items())
    return Rule(name="auto (tta.adapt today)", default=FALLBACK, feature="norm_kind", choice=choice)


@dataclass
class Score:
    """A rule on the streams of one split."""

    rule: Rule
    rows: list[dict[str, Any]]
    max_regret_best: float
    mean_regret_best: float
    max_regret_source: float
    feasible: bool


def score(rule: Rule, streams: Sequence[Stream], max_source_regret: float) -> Score:
    rows = []
    for stream in streams:
        method = rule.method_for(stream)
        if method not in stream.errors:
            raise SelectError(f"rule {rule.name!r} picks {method}, which is not in the pool")
        best_method, best = stream.best
        error, source = stream.errors[method], stream.errors["source"]
        rows.append({
            "stream": stream.label, "stream_key": stream.key, "method": method, "error": error,
            "best_method": best_method, "best_error": best, "source_error": source,
            "regret_best": error - best, "regret_source": error - source,
        })
    regrets = [r["regret_best"] for r in rows]
    source_regrets = [r["regret_source"] for r in rows]
    return Score(
        rule=rule, rows=rows, max_regret_best=max(regrets), mean_regret_best=sum(regrets) / len(regrets),
        max_regret_source=max(source_regrets), feasible=max(source_regrets) <= max_source_regret + 1e-9,
    )


def selection_key(s: Score) -> tuple[Any, ...]:
    """Smaller is better: feasible first, then max regret vs best, mean regret, fewer methods,
    a single method before a conditioned rule, then the name."""
    return (not s.feasible, round(s.max_regret_best, 9), round(s.mean_regret_best, 9), len(s.rule.methods),
            s.rule.feature is not None, s.rule.name)


def best_conditioned_rule(feature: str, streams: Sequence[Stream], pool: Sequence[str], max_source_regret: float) -> Rule:
    """The feasible rule conditioned on ``feature`` that is best by :func:`selection_key`.

    The maximum regret is a maximum over feature values, so the optimum is found per value:
    ``bound`` is the largest, over values, of the smallest feasible max regret; each value then
    takes, among its feasible methods whose max regret is within ``bound``, the one with the
    smallest regret sum (the mean over all streams is the sum of those sums over their count).
    """
    cells: dict[str, list[Stream]] = {}
    for stream in streams:
        cells.setdefault(stream.features[feature], []).append(stream)

    def stats(cell: list[Stream], method: str) -> tuple[float, float, bool]:
        regrets = [s.errors[method] - s.best[1] for s in cell]
        feasible = all(s.errors[method] - s.errors["source"] <= max_source_regret + 1e-9 for s in cell)
        return round(max(regrets), 9), round(sum(regrets), 9), feasible

    table = {(value, m): stats(cell, m) for value, cell in cells.items() for m in pool}
    bound = max(min(table[v, m][0] for m in pool if table[v, m][2]) for v in cells)
    choice = []
    for value in sorted(cells):
        allowed = [m for m in pool if table[value, m][2] and table[value, m][0] <= bound]
        choice.append((value, min(allowed, key=lambda m: (table[value, m][1], m))))
    return Rule(name=f"by {feature}", default=FALLBACK, feature=feature, choice=tuple(choice))


# -- the whole selection --------------------------------------------------------------------------
@dataclass
class Selection:
    chosen: Rule
    dev: dict[str, Score]
    eval: dict[str, Score]
    dev_streams: list[Stream]
    eval_streams: list[Stream]
    pool: list[str]
    max_source_regret: float
    target_regret: float
    notes: list[str] = field(default_factory=list)


def candidate_rules(dev_streams: Sequence[Stream], pool: Sequence[str], max_source_regret: float,
                    features: Sequence[str]) -> tuple[list[Rule], list[str]]:
    """Every single method, today's ``auto``, and the best rule per feature (from dev only)."""
    notes = []
    rules = single_rules(pool)
    auto = current_auto_rule()
    kinds = {s.features["norm_kind"] for s in dev_streams}
    if all(auto.method_for(s) in pool for s in dev_streams):
        rules.append(auto)
        if "other" in kinds:
            notes.append("today's auto is probed on BatchNorm, GroupNorm and plain models; streams of other "
                         f"normalization kinds get {FALLBACK}")
    else:
        missing = sorted({auto.method_for(s) for s in dev_streams} - set(pool))
        notes.append(f"today's auto is not scored: it picks {', '.join(missing)} for these models, which is not in the pool")
    for feature in features:
        if feature not in FEATURES:
            raise SelectError(f"unknown feature {feature!r} (known: {', '.join(FEATURES)})")
        rules.append(best_conditioned_rule(feature, dev_streams, pool, max_source_regret))
    return rules, notes


def select(
    dev_records: Sequence[dict[str, Any]],
    eval_records: Sequence[dict[str, Any]],
    *,
    methods: Sequence[str] | None = None,
    swept: Sequence[str] = (),
    ignore: Sequence[str] = (),
    max_source_regret: float = 0.5,
    target_regret: float = 2.0,
    features: Sequence[str] = ("norm_kind",),
) -> Selection:
    """Choose a rule on the dev runs and score every candidate on the dev and eval runs."""
    if max_source_regret < 0:
        raise SelectError(f"max_source_regret must be >= 0 points, got {max_source_regret}")
    check_comparable(dev_records, eval_records, [*swept, *ignore])
    dev_streams, pool = build_streams(dev_records, "dev", methods=methods, ignore=ignore)
    eval_streams, eval_pool = build_streams(eval_records, "eval", methods=pool, ignore=ignore)
    if "source" not in pool:
        raise SelectError("the pool has no source run: the regret vs the unadapted model needs method=source")
    shared = {s.key for s in dev_streams} & {s.key for s in eval_streams}
    if shared:
        raise SelectError(f"{len(shared)} stream(s) are both dev and eval streams; an eval stream must not be used to choose")
    label_streams([*dev_streams, *eval_streams])
    dev_streams.sort(key=lambda s: s.label)
    eval_streams.sort(key=lambda s: s.label)
    rules, notes = candidate_rules(dev_streams, pool, max_source_regret, features)
    dev = {r.name: score(r, dev_streams, max_source_regret) for r in rules}
    # the choice reads dev scores only; eval is scored afterwards
    chosen = min(dev.values(), key=selection_key).rule
    scored = {r.name: score(r, eval_streams, max_source_regret) for r in rules}
    return Selection(chosen, dev, scored, dev_streams, eval_streams, pool, max_source_regret, target_regret, notes)


# -- output -----------------------------------------------------------------------------------------
CRITERION = (
    "feasible: error - source error <= {limit:g} points on every dev stream; among feasible rules, the lowest "
    "max over dev streams of (error - best method's error), then the lowest mean of it, then fewer methods"
)


def _summary(s: Score, target: float) -> dict[str, Any]:
    return {
        "max_regret_best": s.max_regret_best, "mean_regret_best": s.mean_regret_best,
        "max_regret_source": s.max_regret_source, "feasible": s.feasible,
        "streams_over_target": sum(r["regret_best"] > target + 1e-9 for r in s.rows),
    }


def rule_json(sel: Selection, sources: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    chosen = sel.chosen.name
    return {
        "format": SELECTION_FORMAT,
        "version": SELECTION_VERSION,
        "rule": sel.chosen.to_dict(),
        "criterion": CRITERION.format(limit=sel.max_source_regret),
        "max_source_regret_points": sel.max_source_regret,
        "target_regret_points": sel.target_regret,
        "dev": _summary(sel.dev[chosen], sel.target_regret),
        "eval": _summary(sel.eval[chosen], sel.target_regret),
        "pool": sel.pool,
        "candidates": [{**sel.dev[name].rule.to_dict(), "dev": _summary(sel.dev[name], sel.target_regret),
                        "eval": _summary(sel.eval[name], sel.target_regret)} for name in sel.dev],
        "dev_streams": [_stream_json(s) for s in sel.dev_streams],
        "eval_streams": [_stream_json(s) for s in sel.eval_streams],
        "sources": {k: list(v) for k, v in sources.items()},
        "notes": sel.notes,
    }


def _stream_json(s: Stream) -> dict[str, Any]:
    best_method, best = s.best
    return {"label": s.label, "key": s.key, "features": s.features, "best_method": best_method, "best_error": best,
            "source_error": s.errors["source"], "errors": s.errors}


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _rule_text(rule: Rule) -> str:
    if rule.feature is None:
        return rule.default
    return ", ".join(f"{v}: {m}" for v, m in rule.choice) + f"; else {rule.default}"


def markdown(sel: Selection, sources: Mapping[str, Sequence[str]]) -> str:
    order = sorted(sel.dev, key=lambda n: selection_key(sel.dev[n]))
    lines = [
        "# Default-rule selection", "",
        f"Dev runs: {', '.join(sources.get('dev', []))}. Eval runs: {', '.join(sources.get('eval', []))}.",
        f"Pool: {', '.join(sel.pool)}. {len(sel.dev_streams)} dev stream(s), {len(sel.eval_streams)} eval stream(s).", "",
        "Criterion: " + CRITERION.format(limit=sel.max_source_regret) + ". The eval streams are scored, never used "
        f"to choose. Regrets in error points; target on eval: within {sel.target_regret:g} of the best method.", "",
        f"**Chosen: {sel.chosen.name}** ({_rule_text(sel.chosen)}).",
    ]
    for note in sel.notes:
        lines += ["", f"Note: {note}"]
    lines += ["", "## Summary", "",
              _row(["rule", "methods", "dev max regret vs best", "dev mean regret vs best", "dev max regret vs source",
                    "dev feasible", "eval max regret vs best", "eval mean regret vs best", "eval max regret vs source",
                    f"eval streams > {sel.target_regret:g} pts"]),
              _row(["---"] * 10)]
    for name in order:
        d, e = sel.dev[name], sel.eval[name]
        lines.append(_row([("**" + name + "**") if name == sel.chosen.name else name, _rule_text(d.rule),
                           f"{d.max_regret_best:.2f}", f"{d.mean_regret_best:.2f}", f"{d.max_regret_source:+.2f}",
                           "yes" if d.feasible else "no", f"{e.max_regret_best:.2f}", f"{e.mean_regret_best:.2f}",
                           f"{e.max_regret_source:+.2f}", str(_summary(e, sel.target_regret)["streams_over_target"])]))
    for split, streams, scores in (("dev", sel.dev_streams, sel.dev), ("eval", sel.eval_streams, sel.eval)):
        lines += ["", f"## {split} streams: regret vs best / vs source (points)", "",
                  _row(["rule"] + [s.label for s in streams]), _row(["---"] * (len(streams) + 1)),
                  _row(["best method (error %)"] + [f"{s.best[0]} ({s.best[1]:.2f})" for s in streams]),
                  _row(["source (error %)"] + [f"{s.errors['source']:.2f}" for s in streams])]
        for name in order:
            lines.append(_row([name] + [f"{r['method']}: {r['regret_best']:.2f} / {r['regret_source']:+.2f}"
                                        for r in scores[name].rows]))
    return "\n".join(lines) + "\n"


def streams_csv(sel: Selection) -> str:
    buffer = io.StringIO()
    fields = ["split", "rule", "chosen", "stream", "stream_key", "method", "error", "best_method", "best_error",
              "source_error", "regret_best", "regret_source"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for split, scores in (("dev", sel.dev), ("eval", sel.eval)):
        for name, s in scores.items():
            for row in s.rows:
                writer.writerow({"split": split, "rule": name, "chosen": name == sel.chosen.name, **row})
    return buffer.getvalue()


def summary_csv(sel: Selection) -> str:
    buffer = io.StringIO()
    fields = ["split", "rule", "chosen", "methods", "max_regret_best", "mean_regret_best", "max_regret_source",
              "feasible", "streams_over_target"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for split, scores in (("dev", sel.dev), ("eval", sel.eval)):
        for name, s in scores.items():
            writer.writerow({"split": split, "rule": name, "chosen": name == sel.chosen.name,
                             "methods": _rule_text(s.rule), **_summary(s, sel.target_regret)})
    return buffer.getvalue()
