"""Avalanche benchmarks built without downloads: Split digits, Split CIFAR-10, Si-Blurry, online."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.data import load_digits
from benchmarks.data.base import ImageArrays
from continual.scenarios import (
    UInt8ImageDataset,
    class_incremental,
    online_stream,
    si_blurry_benchmark,
    split_cifar10,
    split_digits,
)
from continual.subsets import per_class_subset


def test_split_digits_is_class_incremental() -> None:
    scenario = split_digits(n_experiences=5)
    train, test = list(scenario.train_stream), list(scenario.test_stream)
    assert [sorted(e.classes_in_this_experience) for e in train] == [[2 * t, 2 * t + 1] for t in range(5)]
    assert sum(len(e.dataset) for e in train) == 1078 and sum(len(e.dataset) for e in test) == 719
    x, y, task_label = train[1].dataset[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= float(x.min()) <= float(x.max()) <= 1
    assert y in (2, 3) and task_label == 0
    shuffled = split_digits(n_experiences=2, seed=3)
    assert sorted(shuffled.train_stream[0].classes_in_this_experience) != [0, 1, 2, 3, 4]


def test_online_stream_flags_every_task_end() -> None:
    labels = np.repeat(np.arange(4), 10)  # tasks of exactly 20 samples: a multiple of 10
    images = np.zeros((40, 2, 2, 3), dtype=np.uint8)
    arrays = ImageArrays(images, labels, tuple("abcd"))
    scenario = class_incremental(arrays, arrays, n_experiences=2)
    experiences = list(online_stream(scenario.train_stream, 10, seed=0))
    assert [len(e.dataset) for e in experiences] == [10, 10, 10, 10]
    assert [e.is_last_subexp for e in experiences] == [False, True, False, True]
    assert [e.is_first_subexp for e in experiences] == [True, False, True, False]
    assert all(e.access_task_boundaries for e in experiences)
    # Unshuffled: the stream order within a task is kept.
    ordered = list(online_stream(scenario.train_stream, 7, shuffle=False))
    assert [len(e.dataset) for e in ordered] == [7, 7, 6, 7, 7, 6]


def test_si_blurry_benchmark_matches_the_splitter() -> None:
    from benchmarks.streams.si_blurry import si_blurry_split

    train, test = load_digits("train"), load_digits("test")
    scenario = si_blurry_benchmark(train, test, num_tasks=5, disjoint_pct=50, blurry_pct=10, seed=1)
    tasks = si_blurry_split(train.labels, 5, 50, 10, seed=1, num_classes=10)
    train_stream = list(scenario.train_stream)
    assert [len(e.dataset) for e in train_stream] == [len(t) for t in tasks]
    for experience, indices in zip(train_stream, tasks):
        labels = [int(experience.dataset[i][1]) for i in range(len(experience.dataset))]
        assert labels == train.labels[indices].tolist()  # the splitter's presentation order
    # Test experience t: the classes first seen in task t; together, every class seen.
    first_seen: dict[int, int] = {}
    for task, indices in enumerate(tasks):
        for c in np.unique(train.labels[indices]):
            first_seen.setdefault(int(c), task)
    for task, experience in enumerate(scenario.test_stream):
        expected = {c for c, t in first_seen.items() if t == task}
        assert set(experience.classes_in_this_experience) == expected
    assert sum(len(e.dataset) for e in scenario.test_stream) == int(np.isin(test.labels, list(first_seen)).sum())


def test_per_class_subset_is_balanced_and_seeded() -> None:
    digits = load_digits("train")
    subset = per_class_subset(digits, 7, seed=0)
    assert np.bincount(subset.labels).tolist() == [7] * 10
    assert np.array_equal(subset.labels, per_class_subset(digits, 7, seed=0).labels)
    assert not np.array_equal(subset.images, per_class_subset(digits, 7, seed=1).images)


def test_dataset_rejects_float_images() -> None:
    with pytest.raises(ValueError, match="uint8"):
        UInt8ImageDataset(np.zeros((2, 4, 4, 3), dtype=np.float32), np.zeros(2))


def _cifar_available() -> bool:
    from benchmarks.data.folder import shared_data_dir

    return all((Path(shared_data_dir()) / f"cifar10-jpeg-{s}.tar.gz").is_file() for s in ("train", "test"))


@pytest.mark.skipif(not _cifar_available(), reason="shared CIFAR-10 JPEG tarballs not found")
def test_split_cifar10_from_shared_data() -> None:
    scenario = split_cifar10(5, train_per_class=20, test_per_class=10)
    assert [sorted(e.classes_in_this_experience) for e in scenario.train_stream] == [[2 * t, 2 * t + 1] for t in range(5)]
    assert [len(e.dataset) for e in scenario.train_stream] == [40] * 5
    assert [len(e.dataset) for e in scenario.test_stream] == [20] * 5
