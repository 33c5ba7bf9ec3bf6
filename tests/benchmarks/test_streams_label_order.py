"""Label orders (§9.2): Dirichlet correlation vs delta, sorted, i.i.d., run statistics."""

from __future__ import annotations

import ast

import numpy as np
import pytest

from tests.official import checkout_root
from benchmarks.streams import (
    dirichlet_chunks,
    dirichlet_order,
    iid_order,
    label_runs,
    mean_run_length,
    order_labels,
    segment_order,
    sorted_order,
)

BALANCED = np.repeat(np.arange(10), 200)  # N = 2000, C = 10


def mean_runs(delta: float, seeds=range(4)) -> float:
    return float(
        np.mean(
            [
                mean_run_length(BALANCED[order_labels(BALANCED, "dirichlet", np.random.default_rng(s), num_classes=10, delta=delta)])
                for s in seeds
            ]
        )
    )


def test_run_statistics_helpers():
    labels = np.array([2, 2, 0, 1, 1, 1, 2])
    assert label_runs(labels).tolist() == [2, 1, 3, 1]
    assert mean_run_length(labels) == pytest.approx(7 / 4)
    assert label_runs(np.array([], dtype=np.int64)).size == 0


def test_dirichlet_order_is_a_permutation_with_full_chunks():
    rng = np.random.default_rng(0)
    order = dirichlet_order(BALANCED, 10, 0.1, rng)
    assert sorted(order.tolist()) == list(range(len(BALANCED)))


def test_smaller_delta_gives_longer_class_runs():
    runs = {delta: mean_runs(delta) for delta in (0.01, 0.1, 1.0, 100.0)}
    iid = mean_run_length(BALANCED[iid_order(len(BALANCED), np.random.default_rng(0))])
    # Monotone: strong correlation at small delta.
    assert runs[0.01] > runs[0.1] > runs[1.0] > runs[100.0]
    # Tiny delta: a class lands in ~one chunk, so runs approach the class size (200).
    assert runs[0.01] > 80
    # Large delta spreads every class over all 10 chunks, but chunks are still emitted class
    # by class: runs stay near N / C^2 = 20, an order of magnitude above i.i.d. (~1.1).
    assert runs[100.0] == pytest.approx(20, rel=0.15)
    assert iid < 1.3 and runs[100.0] > 10 * iid


def test_dirichlet_chunks_respect_minimum_and_capacity():
    labels = np.repeat(np.arange(5), 40)
    pieces = dirichlet_chunks(labels, 5, 0.3, np.random.default_rng(7), min_chunk_size=25)
    sizes = [sum(len(p) for p in chunk) for chunk in pieces]
    assert min(sizes) >= 25 and sum(sizes) == 200
    for chunk in pieces:
        assert len(chunk) == 5
        for k, piece in enumerate(chunk):
            assert np.all(labels[piece] == k)
    # The emitted order is chunk by chunk, each class piece contiguous.
    order = dirichlet_order(labels, 5, 0.3, np.random.default_rng(7), min_chunk_size=25)
    assert np.array_equal(np.sort(order[: sizes[0]]), np.sort(np.concatenate(pieces[0])))
    assert len(label_runs(labels[order[: sizes[0]]])) <= 5


def test_dirichlet_gives_up_after_timeout():
    labels = np.repeat(np.arange(4), 3)  # 12 samples can never fill 4 chunks with 10 each
    with pytest.raises(ValueError, match="Dirichlet"):
        dirichlet_order(labels, 4, 0.1, np.random.default_rng(0), timeout_s=0.05)


def test_sorted_and_iid_orders():
    labels = np.array([1, 0, 1, 0, 2])
    assert sorted_order(labels).tolist() == [1, 3, 0, 2, 4]  # stable within a class
    a = iid_order(50, np.random.default_rng(3))
    assert np.array_equal(a, iid_order(50, np.random.default_rng(3)))
    assert sorted(a.tolist()) == list(range(50))
    shuffled_sorted = order_labels(labels, "sorted", np.random.default_rng(0), num_classes=3)
    assert np.all(np.diff(labels[shuffled_sorted]) >= 0)
    assert np.array_equal(
        order_labels(labels, "dirichlet", np.random.default_rng(0), num_classes=3, delta=0.0), shuffled_sorted
    )


def _official_sort_by_dirichlet():
    """``sort_by_dirichlet`` read from a local mariodoebler/test-time-adaptation checkout.

    Set TTA_BENCHMARK_ROOT to the checkout; the function is extracted from the file's syntax
    tree (the module itself needs packages we do not install).
    """
    path = checkout_root("TTA_BENCHMARK_ROOT") / "classification" / "datasets" / "data_loading.py"
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "sort_by_dirichlet")
    namespace = {"np": np, "time": __import__("time")}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["sort_by_dirichlet"]


@pytest.mark.official
@pytest.mark.parametrize("delta", [0.01, 0.1, 1.0])
def test_dirichlet_matches_official_code_with_legacy_rng(delta):
    official = _official_sort_by_dirichlet()
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 10, size=1500)
    samples = [(f"img{i}.png", int(y)) for i, y in enumerate(labels)]
    state = np.random.get_state()
    try:
        np.random.seed(11)
        expected = official(delta, samples)
    finally:
        np.random.set_state(state)
    order = dirichlet_order(labels, 10, delta, np.random.RandomState(11))
    assert [samples[i] for i in order] == expected


# -- the official seeding (mariodoebler's test loader) -------------------------------------------


def _loader_order(labels: np.ndarray, seed: int, sort_key=None) -> list[int]:
    """What the official loader does to a domain's sample list for run seed ``seed``:
    ``random.seed(seed)`` then ``random.shuffle(samples)`` (and, when sorting, a stable sort
    by label). Written from the loader's documented steps, with positions as samples."""
    import random

    state = random.getstate()
    try:
        random.seed(seed)
        positions = list(range(len(labels)))
        random.shuffle(positions)
    finally:
        random.setstate(state)
    if sort_key == "label":
        positions.sort(key=lambda i: labels[i])
    return positions


def test_official_seeding_shuffles_like_the_official_loader():
    labels = np.random.default_rng(3).integers(0, 5, size=97)
    for seed in (1, 2, 2020):
        iid = segment_order(labels, "iid", seed, num_classes=5, seeding="official")
        assert iid.tolist() == _loader_order(labels, seed)
        sorted_ = segment_order(labels, "sorted", seed, num_classes=5, seeding="official")
        assert sorted_.tolist() == _loader_order(labels, seed, sort_key="label")
        assert np.array_equal(segment_order(labels, "dirichlet", seed, num_classes=5, delta=0.0, seeding="official"), sorted_)
        # the library default draws from np.random.default_rng(seed): another order
        assert segment_order(labels, "iid", seed, num_classes=5).tolist() != iid.tolist()


def test_official_seeding_draws_the_dirichlet_order_from_a_fresh_global_numpy_state():
    labels = np.repeat(np.arange(10), 30)
    shuffled = np.asarray(_loader_order(labels, 7))
    expected = shuffled[dirichlet_order(labels[shuffled], 10, 0.1, np.random.RandomState(7))]
    got = segment_order(labels, "dirichlet", 7, num_classes=10, delta=0.1, seeding="official")
    assert np.array_equal(got, expected)
    state = np.random.get_state()
    segment_order(labels, "dirichlet", 7, num_classes=10, delta=0.1, seeding="official")
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state()[1:2], state[1:2]))  # global RNG untouched


def test_official_seeding_in_a_stream_plan():
    from benchmarks.streams import GeneratedSource, StreamConfig, plan_stream
    from tests.benchmarks.test_streams import tiny_arrays

    arrays = tiny_arrays(n=120, num_classes=4)
    for order in ("iid", "sorted"):
        config = StreamConfig(domains=("fog", "snow"), label_order=order, seeding="official", seed=5, batch_size=16)
        plan = plan_stream(config, GeneratedSource(arrays))
        expected = _loader_order(arrays.labels, 5, sort_key="label" if order == "sorted" else None)
        for start in (0, 120):  # both domains present the loader's order for the seed
            assert plan.base_index[start : start + 120].tolist() == expected
    with pytest.raises(ValueError, match="seeding"):
        StreamConfig(seeding="numpy")


@pytest.mark.official
@pytest.mark.parametrize("delta", [0.1, 1.0])
def test_official_seeding_matches_the_official_loader_steps(delta):
    """Differential: the official ``sort_by_dirichlet`` after the loader's seeding and shuffle."""
    import random

    official = _official_sort_by_dirichlet()
    labels = np.random.default_rng(5).integers(0, 10, size=1500)
    samples = [(f"img{i}.png", int(y)) for i, y in enumerate(labels)]
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        random.seed(3)
        np.random.seed(3)
        shuffled = list(samples)
        random.shuffle(shuffled)
        expected = official(delta, shuffled)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    order = segment_order(labels, "dirichlet", 3, num_classes=10, delta=delta, seeding="official")
    assert [samples[i] for i in order] == expected
