"""Global class imbalance (TRIBE's GLI-TTA long-tailed test distribution) under the label orders."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.streams import (
    GeneratedSource,
    StreamConfig,
    long_tailed_counts,
    long_tailed_subset,
    mean_run_length,
    plan_stream,
    segment_order,
)
from tests.benchmarks.test_streams import tiny_arrays

BALANCED = np.repeat(np.arange(10), 100)  # N = 1000, C = 10


def test_long_tailed_counts_on_hand_computed_cases():
    # int(100 * 0.1 ** (k / 9)): 10 ** (-k/9) = 1, .7743, .5995, .4642, .3594, .2783, .2154, .1668, .1292, .1
    assert long_tailed_counts(100, 10, 10) == [100, 77, 59, 46, 35, 27, 21, 16, 12, 10]
    # factor 100 over 3 classes: 1, 0.1, 0.01 of 200
    assert long_tailed_counts(200, 3, 100) == [200, 20, 2]
    assert long_tailed_counts(40, 4, 1) == [40, 40, 40, 40]  # factor 1: balanced at class 0's count
    assert long_tailed_counts(7, 1, 10) == [7]
    with pytest.raises(ValueError, match="imbalance_factor"):
        long_tailed_counts(100, 10, 0.5)


def test_long_tailed_subset_keeps_the_counts_of_each_class():
    labels = np.random.default_rng(0).permutation(BALANCED)
    kept = long_tailed_subset(labels, 10, 10, np.random.default_rng(1))
    assert np.bincount(labels[kept], minlength=10).tolist() == [100, 77, 59, 46, 35, 27, 21, 16, 12, 10]
    assert np.all(np.diff(kept) > 0)  # positions in file order, no repeats
    # GLI-TTA-V: the same counts, shuffled over the classes
    kept_v = long_tailed_subset(labels, 10, 10, np.random.default_rng(1), class_order="random")
    counts_v = np.bincount(labels[kept_v], minlength=10)
    assert sorted(counts_v.tolist()) == sorted([100, 77, 59, 46, 35, 27, 21, 16, 12, 10])
    assert counts_v.tolist() != [100, 77, 59, 46, 35, 27, 21, 16, 12, 10]
    # classes smaller than their count are kept whole; the head count is class 0's size
    short = np.concatenate([np.zeros(10, int), np.ones(3, int), np.full(10, 2)])
    assert np.bincount(short[long_tailed_subset(short, 3, 4, np.random.default_rng(0))]).tolist() == [10, 3, 2]


def test_imbalance_composes_with_the_dirichlet_order():
    labels = np.random.default_rng(0).permutation(BALANCED)
    order = segment_order(labels, "dirichlet", 3, num_classes=10, delta=0.1, imbalance_factor=10)
    assert len(set(order.tolist())) == len(order)  # a subset, each sample once
    assert np.bincount(labels[order], minlength=10).tolist() == [100, 77, 59, 46, 35, 27, 21, 16, 12, 10]
    # the Dirichlet order on top: long single-class runs, unlike the i.i.d. order of the same subset
    iid = segment_order(labels, "iid", 3, num_classes=10, imbalance_factor=10)
    assert sorted(iid.tolist()) == sorted(order.tolist())
    assert mean_run_length(labels[order]) > 5 * mean_run_length(labels[iid])
    # and exactly: the same subset, then the library's Dirichlet order over it
    rng = np.random.default_rng(3)
    keep = long_tailed_subset(labels, 10, 10, rng)
    from benchmarks.streams import order_labels

    assert np.array_equal(order, keep[order_labels(labels[keep], "dirichlet", rng, num_classes=10, delta=0.1)])
    sorted_ = segment_order(labels, "sorted", 3, num_classes=10, imbalance_factor=10)
    assert np.all(np.diff(labels[sorted_]) >= 0)


def test_imbalanced_stream_is_deterministic_and_seeded():
    config = StreamConfig(
        domains=("fog", "snow"), label_order="dirichlet", delta=0.1, imbalance_factor=5, seed=2, batch_size=16
    )
    source = GeneratedSource(tiny_arrays(n=300, num_classes=3))
    plan = plan_stream(config, source)
    again = plan_stream(config, source)
    assert np.array_equal(plan.base_index, again.base_index) and np.array_equal(plan.labels, again.labels)
    per_domain = plan.num_samples // 2
    assert per_domain == sum(long_tailed_counts(100, 3, 5))  # 100 + 44 + 20
    # every domain presents the same imbalanced order (the segment generator is reseeded)
    assert np.array_equal(plan.base_index[:per_domain], plan.base_index[per_domain:])
    other = plan_stream(config.replace(seed=3), source)
    assert not np.array_equal(plan.base_index, other.base_index)
    assert config.to_dict()["imbalance_factor"] == 5
    for bad in (dict(imbalance_factor=0.5), dict(imbalance_order="sorted")):
        with pytest.raises(ValueError, match="imbalance"):
            StreamConfig(**bad)


def test_imbalance_off_leaves_the_stream_unchanged():
    source = GeneratedSource(tiny_arrays(n=90, num_classes=3))
    config = StreamConfig(domains=("fog",), label_order="dirichlet", delta=1.0, seed=4, batch_size=8, dirichlet_min_chunk=5)
    plan = plan_stream(config, source)
    rng = np.random.default_rng(4)
    from benchmarks.streams import order_labels

    expected = order_labels(source.load("fog", 5).labels, "dirichlet", rng, num_classes=3, delta=1.0, min_chunk_size=5)
    assert np.array_equal(plan.base_index, expected)


def test_hydra_stream_option_composes_to_an_imbalanced_stream():
    from hydra import compose, initialize_config_module

    import benchmarks.app  # noqa: F401  (schema + resolvers)
    from benchmarks.app.checks import stream_config

    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["stream=imbalanced", "stream.imbalance_order=random"])
        official = compose(config_name="config", overrides=["stream.seeding=official"])
    config = stream_config(cfg)
    assert config.imbalance_factor == 10 and config.imbalance_order == "random"
    assert config.label_order == "dirichlet" and config.delta == 0.1
    assert stream_config(official).seeding == "official" and stream_config(official).imbalance_factor is None
