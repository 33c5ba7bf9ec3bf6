"""Long-horizon streams: PeTTA's recurring protocol and RoTTA's class-temporal label order."""

from __future__ import annotations

import ast

import numpy as np
import pytest

from benchmarks.streams import (
    GeneratedSource,
    StreamConfig,
    build_segments,
    class_temporal_order,
    mean_run_length,
    plan_stream,
)
from tests.benchmarks.test_streams import tiny_arrays
from tests.official import checkout_root

DOMAINS = ("fog", "snow", "contrast")


def test_recurrences_repeat_the_schedule_with_its_resets() -> None:
    continual = build_segments(StreamConfig(domains=DOMAINS, recurrences=3))
    assert [s.domains[0] for s in continual] == list(DOMAINS) * 3
    assert [s.recurrence for s in continual] == [0] * 3 + [1] * 3 + [2] * 3
    assert [s.reset for s in continual] == [True] + [False] * 8
    per_shift = build_segments(StreamConfig(domains=DOMAINS, recurrences=2, schedule="reset_each_shift"))
    assert all(s.reset for s in per_shift) and len(per_shift) == 6
    mixed = build_segments(StreamConfig(domains=DOMAINS, recurrences=2, schedule="mixed", severities=(3, 5)))
    assert [(s.severity, s.recurrence) for s in mixed] == [(3, 0), (5, 0), (3, 1), (5, 1)]
    with pytest.raises(ValueError, match="recurrences"):
        StreamConfig(recurrences=0)


@pytest.mark.parametrize("label_order", ["iid", "class_temporal"])
def test_every_visit_shows_the_same_images_in_a_new_order(label_order: str) -> None:
    arrays = tiny_arrays(n=200, num_classes=4)
    config = StreamConfig(domains=DOMAINS, batch_size=16, label_order=label_order, delta=0.1)
    once = plan_stream(config, GeneratedSource(arrays))
    thrice = plan_stream(config.replace(recurrences=3), GeneratedSource(arrays))
    n = once.num_samples
    assert thrice.num_samples == 3 * n and np.array_equal(thrice.recurrence(), np.repeat([0, 1, 2], n))
    if label_order == "iid":  # the first visit is exactly the stream without recurrences
        for name in ("labels", "base_index", "sample_id", "domain_id"):
            assert np.array_equal(getattr(thrice, name)[:n], getattr(once, name))
    for visit in (1, 2):
        part = slice(visit * n, (visit + 1) * n)
        for d in range(len(DOMAINS)):
            same_domain = thrice.domain_id[part] == d
            first = thrice.domain_id[:n] == d
            # the same corruption draws (sample ids) ...
            assert sorted(thrice.sample_id[part][same_domain]) == sorted(thrice.sample_id[:n][first])
        # ... in another order
        assert not np.array_equal(thrice.sample_id[part], thrice.sample_id[:n])


def test_class_temporal_order_is_a_correlated_permutation() -> None:
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 100))
    order = class_temporal_order(labels, 10, 0.1, np.random.default_rng(1))
    assert sorted(order.tolist()) == list(range(1000))
    assert mean_run_length(labels[order]) > 10 * mean_run_length(labels)
    # members of a class keep their given order inside the class (no shuffle first)
    for k in range(10):
        positions = order[labels[order] == k]
        assert np.all(np.diff(positions) > 0)
    assert not np.array_equal(order, class_temporal_order(labels, 10, 0.1, np.random.default_rng(2)))
    with pytest.raises(ValueError, match="concentration"):
        class_temporal_order(labels, 10, 0.0, np.random.default_rng(1))


def test_class_temporal_draws_afresh_for_every_segment() -> None:
    config = StreamConfig(domains=DOMAINS, label_order="class_temporal", delta=0.1, batch_size=10)
    plan = plan_stream(config, GeneratedSource(tiny_arrays(n=200, num_classes=4)))
    per_domain = [plan.base_index[plan.domain_id == d] for d in range(3)]
    assert not np.array_equal(per_domain[0], per_domain[1])
    with pytest.raises(ValueError, match="class_temporal"):
        StreamConfig(label_order="class_temporal", delta=0.0)


def _official_sampler(variable: str, relative: str):
    """The official ``LabelDirichletDomainSequence`` class, read from its file's syntax tree
    (the module imports torch's Sampler and the data stack)."""
    path = checkout_root(variable) / relative
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LabelDirichletDomainSequence")
    node.bases = []
    namespace = {"np": np, "dirichlet": np.random.dirichlet, "defaultdict": __import__("collections").defaultdict,
                 "List": list, "DatumBase": object, "Sampler": object}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["LabelDirichletDomainSequence"]


class _Datum:
    def __init__(self, label: int, domain: int) -> None:
        self.label, self.domain = label, domain


@pytest.mark.official
@pytest.mark.parametrize(("variable", "relative"), [("PETTA_OFFICIAL_SRC", "src/data/ttasampler.py"),
                                                    ("ROTTA_OFFICIAL_SRC", "core/data/ttasampler.py")])
@pytest.mark.parametrize("gamma", [0.1, 1.0])
def test_class_temporal_matches_the_official_sampler(variable: str, relative: str, gamma: float) -> None:
    sampler_cls = _official_sampler(variable, relative)
    rng = np.random.default_rng(7)
    labels = [rng.integers(0, 10, size=300) for _ in range(3)]  # three domains, file order
    source = [_Datum(int(y), d) for d, domain_labels in enumerate(labels) for y in domain_labels]
    state = np.random.get_state()
    try:
        np.random.seed(5)
        expected = list(iter(sampler_cls(source, gamma, 64)))
    finally:
        np.random.set_state(state)
    generator = np.random.RandomState(5)  # the same draws, in the same order, domain by domain
    ours = [300 * d + class_temporal_order(domain_labels, 10, gamma, generator) for d, domain_labels in enumerate(labels)]
    assert np.concatenate(ours).tolist() == [int(i) for i in expected]


def test_results_give_the_error_of_every_visit() -> None:
    """The per-visit rows and the per-visit headline agree with the records split by the plan's
    visit of every sample (a model whose prediction changes from batch to batch)."""
    import torch

    from benchmarks.evaluation import evaluate
    from benchmarks.streams import build_stream
    from tests.benchmarks.test_streams import RecordingCorruption

    arrays = tiny_arrays(n=96, num_classes=4)
    config = StreamConfig(domains=DOMAINS, batch_size=16, recurrences=3)
    stream = build_stream(config, GeneratedSource(arrays), corrupt_fn=RecordingCorruption())
    calls = []

    def varying(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        logits = torch.zeros(x.shape[0], 4)
        logits[:, (len(calls) * 7) % 5 % 4] = 1.0
        return logits

    result = evaluate(varying, stream, progress=False)
    visit = result.sample_recurrence()
    assert np.array_equal(visit, stream.plan.recurrence())
    r = result.records
    expected = []
    for v in range(3):
        inside = visit == v
        expected.append(np.mean([1 - r.correct[inside & (r.domain_id == d)].mean() for d in range(len(DOMAINS))]))
    assert result.recurrence_errors() == pytest.approx(expected)
    rows = [row for row in result.rows() if row["scope"] == "recurrence"]
    n = stream.num_samples // 3
    assert [(row["recurrence"], row["window_start"], row["window_stop"]) for row in rows] == [(v, v * n, (v + 1) * n) for v in range(3)]
    assert all(row["recurrence"] is not None for row in result.rows() if row["scope"] == "segment")
    assert result.summary()["recurrence_errors"] == pytest.approx(expected)
    once = evaluate(varying, build_stream(config.replace(recurrences=1), GeneratedSource(arrays),
                                            corrupt_fn=RecordingCorruption()), progress=False)
    assert once.recurrence_errors() == [] and "recurrence_errors" not in once.summary()
    assert not [row for row in once.rows() if row["scope"] == "recurrence" or row["recurrence"] is not None]
