"""Seeded per-class subsets of image arrays, for CPU-sized benchmarks."""

from __future__ import annotations

import numpy as np

from benchmarks.data.base import ImageArrays


def per_class_subset(arrays: ImageArrays, per_class: int | None, seed: int = 0) -> ImageArrays:
    """The first ``per_class`` samples of every class after a seeded shuffle (all if None).

    The kept samples stay in their original order.
    """
    if per_class is None:
        return arrays
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    order = np.random.default_rng(seed).permutation(len(arrays))
    labels = arrays.labels[order]
    # Rank of every sample among the samples of its class, in shuffled order.
    by_class = np.argsort(labels, kind="stable")
    first_of_class = np.searchsorted(labels[by_class], labels[by_class])
    rank = np.empty_like(by_class)
    rank[by_class] = np.arange(len(by_class)) - first_of_class
    return arrays.subset(np.sort(order[rank < per_class]))


#: parts of a dataset for :func:`class_half`.
PARTS = ("all", "a", "b")
_HALF_SEED = 20240  # fixed: the two halves must not depend on any run's seed


def class_half(arrays: ImageArrays, part: str) -> ImageArrays:
    """Half ``"a"`` or ``"b"`` of every class (a fixed random split, disjoint and together
    covering every sample), or everything for ``"all"``. Samples stay in their order.

    Two halves of one dataset give a tuning and an evaluation scenario on disjoint images of
    the same classes (the reality-check protocol, docs/COMPETITION.md).
    """
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    if part == "all":
        return arrays
    order = np.random.default_rng(_HALF_SEED).permutation(len(arrays))
    labels = arrays.labels[order]
    by_class = np.argsort(labels, kind="stable")
    first_of_class = np.searchsorted(labels[by_class], labels[by_class])
    rank = np.empty_like(by_class)
    rank[by_class] = np.arange(len(by_class)) - first_of_class
    half = np.bincount(labels)[labels] // 2
    keep = rank < half if part == "a" else rank >= half
    return arrays.subset(np.sort(order[keep]))
