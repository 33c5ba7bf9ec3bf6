"""Avalanche benchmarks built from in-memory arrays: no dataset class, no download.

* :func:`split_digits` — class-incremental Split digits (scikit-learn's bundled digits,
  upsampled to 32x32 RGB by :func:`benchmarks.data.load_digits`).
* :func:`split_cifar10` — class-incremental Split CIFAR-10 from the shared JPEG tarballs
  (:func:`benchmarks.data.folder.cifar10_jpeg`).
* :func:`si_blurry_benchmark` — Si-Blurry task streams (Moon et al., ICCV 2023;
  docs/METHODS.md §9.5) from :func:`benchmarks.streams.si_blurry.si_blurry_split`.
* :func:`online_stream` — the online protocol: a stream cut into small experiences that keep
  their task boundaries, as AdaB²N and the task-end metrics need.

Images stay ``uint8`` in memory and become float32 in [0, 1] per sample, so Split CIFAR-10
costs 150 MB rather than 600 MB.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from avalanche.benchmarks.scenarios import CLScenario, CLStream, class_incremental_benchmark
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.scenarios.online import OnlineCLExperience, split_online_stream
from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
from avalanche.benchmarks.utils import _make_taskaware_classification_dataset
from torch.utils.data import Dataset

from benchmarks.data.base import ImageArrays
from continual.subsets import per_class_subset


class UInt8ImageDataset(Dataset):
    """``(image float32 CHW in [0, 1], label)`` pairs over a uint8 NHWC array."""

    def __init__(self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> None:
        # np.require copies only read-only or non-contiguous input (e.g. arrays off a pipe).
        images_t = torch.as_tensor(np.require(images, requirements=["C", "W"]) if isinstance(images, np.ndarray) else images)
        if images_t.dtype != torch.uint8 or images_t.dim() != 4:
            raise ValueError(f"images must be uint8 (N, H, W, C), got {images_t.dtype} {tuple(images_t.shape)}")
        # Channels-first once, so that __getitem__ is a view and a scale.
        self.images = images_t.permute(0, 3, 1, 2).contiguous()
        self.targets = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        if self.targets.shape != (self.images.shape[0],):
            raise ValueError("one label per image is needed")

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float().div_(255.0), int(self.targets[index])


def as_avalanche_dataset(images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor):
    """An Avalanche classification dataset (task label 0) over uint8 NHWC images."""
    data = UInt8ImageDataset(images, labels)
    return _make_taskaware_classification_dataset(data, targets=data.targets.tolist(), task_labels=0)


def class_incremental(
    train: ImageArrays,
    test: ImageArrays,
    n_experiences: int = 5,
    *,
    class_order: Sequence[int] | None = None,
    seed: int | None = None,
) -> CLScenario:
    """Class-incremental scenario with equal class counts per experience.

    Args:
        train, test: the data.
        n_experiences: number of tasks; must divide the number of classes.
        class_order: order in which classes arrive (default: ascending, as in the mammoth
            Split CIFAR-10 that AdaB²N reports on, unless ``seed`` is given).
        seed: draw a random class order with this seed instead.
    """
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    if num_classes % n_experiences:
        raise ValueError(f"{num_classes} classes do not split into {n_experiences} equal experiences")
    if class_order is None and seed is None:
        class_order = list(range(num_classes))
    return class_incremental_benchmark(
        {
            "train": as_avalanche_dataset(train.images, train.labels),
            "test": as_avalanche_dataset(test.images, test.labels),
        },
        class_order=None if class_order is None else list(class_order),
        num_experiences=n_experiences,
        seed=seed if class_order is None else None,
    )


def split_digits(
    n_experiences: int = 5,
    *,
    class_order: Sequence[int] | None = None,
    seed: int | None = None,
    size: int = 32,
) -> CLScenario:
    """Split digits: 10 digit classes in ``n_experiences`` tasks (1,078 train / 719 test)."""
    from benchmarks.data import load_digits

    return class_incremental(
        load_digits("train", size=size), load_digits("test", size=size), n_experiences,
        class_order=class_order, seed=seed,
    )


def split_cifar10(
    n_experiences: int = 5,
    *,
    class_order: Sequence[int] | None = None,
    seed: int | None = None,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    subset_seed: int = 0,
) -> CLScenario:
    """Split CIFAR-10 (5 tasks x 2 classes by default) from the shared JPEG tarballs.

    ``train_per_class`` / ``test_per_class`` keep a seeded subset of every class for CPU
    budgets. The JPEG (quality 75) copy sits a little below the original CIFAR-10.
    """
    from benchmarks.data.folder import cifar10_jpeg

    train = per_class_subset(cifar10_jpeg("train"), train_per_class, subset_seed)
    test = per_class_subset(cifar10_jpeg("test"), test_per_class, subset_seed)
    return class_incremental(train, test, n_experiences, class_order=class_order, seed=seed)


def si_blurry_benchmark(
    train: ImageArrays,
    test: ImageArrays,
    num_tasks: int = 5,
    disjoint_pct: int = 50,
    blurry_pct: int = 10,
    seed: int = 1,
    stochastic: bool = True,
) -> CLScenario:
    """Si-Blurry tasks as an Avalanche scenario (docs/METHODS.md §9.5).

    ``train_stream[t]`` holds task t's samples in the splitter's presentation order (cut it
    with :func:`online_stream` and ``shuffle=False`` to keep that order). ``test_stream[t]``
    holds the test samples of the classes that *first* appear in task t, so
    ``test_stream[:t + 1]`` covers the classes exposed up to task t; classes that never
    appear in training (the splitter's leftovers) have no test experience.
    """
    from benchmarks.streams.si_blurry import si_blurry_split

    task_indices = si_blurry_split(
        train.labels, num_tasks, disjoint_pct, blurry_pct, seed=seed, stochastic=stochastic,
        num_classes=train.num_classes,
    )
    first_task = np.full(train.num_classes, -1, dtype=np.int64)
    for task in reversed(range(len(task_indices))):
        first_task[np.unique(train.labels[task_indices[task]])] = task
    test_task = first_task[test.labels]
    train_sets = [as_avalanche_dataset(train.images[idx], train.labels[idx]) for idx in task_indices]
    test_sets = [
        as_avalanche_dataset(test.images[test_task == task], test.labels[test_task == task])
        for task in range(len(task_indices))
    ]
    return with_classes_timeline(benchmark_from_datasets(train=train_sets, test=test_sets))


def _split_experience(
    experience: Any, experience_size: int, shuffle: bool, seed: int | None
) -> Iterator[OnlineCLExperience]:
    """Sub-experiences of ``experience_size`` samples (the last may be shorter).

    Avalanche 0.6's own splitter flags ``is_last_subexp`` only on a *partial* last chunk, so
    a task whose size is a multiple of ``experience_size`` would never end; this one flags
    the last chunk always.
    """
    dataset = experience.dataset
    count = len(dataset)
    if shuffle:
        generator = torch.Generator().manual_seed(
            (0 if seed is None else int(seed)) * 1_000_003 + int(experience.current_experience or 0)
        )
        order = torch.randperm(count, generator=generator).tolist()
    else:
        order = list(range(count))
    starts = range(0, count, experience_size)
    for number, start in enumerate(starts):
        yield OnlineCLExperience(
            dataset=dataset.subset(order[start : start + experience_size]),
            origin_experience=experience,
            is_first_subexp=number == 0,
            is_last_subexp=number == len(starts) - 1,
            sub_stream_length=len(starts),
            access_task_boundaries=True,
        )


def online_stream(
    stream: Sequence, experience_size: int = 10, *, shuffle: bool = True, seed: int | None = 0
) -> CLStream:
    """Cut ``stream`` into experiences of ``experience_size`` samples, keeping task boundaries.

    The experiences are Avalanche ``OnlineCLExperience`` objects with
    ``access_task_boundaries=True``, so plugins see ``is_last_subexp`` (the end of a task).
    ``shuffle`` permutes samples within each task first (set False to keep a stream order,
    e.g. Si-Blurry's). The returned stream is lazy and can be iterated once.
    """
    if experience_size < 1:
        raise ValueError(f"experience_size must be >= 1, got {experience_size}")
    return split_online_stream(
        stream,
        experience_size,
        experience_split_strategy=lambda experience, size: _split_experience(experience, size, shuffle, seed),
    )
