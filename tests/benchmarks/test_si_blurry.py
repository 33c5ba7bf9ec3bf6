"""Si-Blurry task splits follow §9.5 (and the official sampler when a checkout is given)."""

from __future__ import annotations

import contextlib
import importlib.util
import io

import numpy as np
import pytest

from benchmarks.streams import si_blurry_split, si_blurry_tasks
from tests.official import checkout_root

# 20 classes x 30 samples, interleaved in dataset order as real datasets are.
LABELS = np.tile(np.arange(20), 30)


def owner_table(split, num_classes=20):
    owner = np.full(num_classes, -1)
    for t, classes in enumerate(split.disjoint_classes):
        owner[classes] = t
    for t, classes in enumerate(split.blurry_classes):
        owner[classes] = t
    return owner


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_stochastic_split_follows_definition(seed):
    split = si_blurry_tasks(LABELS, num_tasks=5, disjoint_pct=50, blurry_pct=10, seed=seed)
    disjoint = np.concatenate(split.disjoint_classes)
    blurry = np.concatenate(split.blurry_classes)
    # D = 10 disjoint classes, Bc = 10 blurry classes, all distinct.
    assert len(disjoint) == 10 and len(blurry) == 10
    assert len(set(disjoint.tolist()) | set(blurry.tolist())) == 20
    every = np.concatenate(split.task_indices)
    assert sorted(every.tolist()) == list(range(len(LABELS)))  # each sample exactly once
    # Disjoint classes appear in exactly one task: their owner's.
    owner = owner_table(split)
    for t, idx in enumerate(split.task_indices):
        for c in np.unique(LABELS[idx]):
            if c in disjoint:
                assert owner[c] == t
    # Blurred-sample counts match the quotas (§9.5 step 4).
    s_total = sum((LABELS == c).sum() for c in blurry)
    assert split.num_blurry_samples == s_total == 300
    assert split.quotas.sum() == s_total * 10 // 100
    own_blurry = np.array([sum((LABELS == c).sum() for c in cls) for cls in split.blurry_classes])
    assert np.array_equal(split.blurred_out, np.minimum(split.quotas, own_blurry))
    assert split.pool_size == split.blurred_out.sum()
    remaining = split.pool_size
    for t in range(5):
        assert split.blurred_in[t] == min(split.quotas[t], remaining)
        remaining -= split.blurred_in[t]
    # A task's samples of blurry classes it does not own all came through the pool.
    for t, idx in enumerate(split.task_indices):
        foreign = np.isin(LABELS[idx], blurry) & (owner[LABELS[idx]] != t)
        assert foreign.sum() <= split.blurred_in[t]
        expected_size = sum((LABELS == c).sum() for c in split.disjoint_classes[t])
        expected_size += own_blurry[t] - split.blurred_out[t] + split.blurred_in[t]
        assert len(idx) == expected_size


def test_stochastic_split_is_random_and_reproducible():
    a = si_blurry_split(LABELS, seed=1)
    b = si_blurry_split(LABELS, seed=1)
    c = si_blurry_split(LABELS, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert any(len(x) != len(y) or not np.array_equal(x, y) for x, y in zip(a, c))
    # Random cut points: class counts per task vary across seeds (tasks may get none).
    counts = {tuple(len(c) for c in si_blurry_tasks(LABELS, seed=s).disjoint_classes) for s in range(1, 9)}
    assert len(counts) > 1


def test_fixed_variant_splits_evenly():
    split = si_blurry_tasks(LABELS, num_tasks=5, disjoint_pct=50, blurry_pct=10, seed=1, stochastic=False)
    assert [len(c) for c in split.disjoint_classes] == [2] * 5
    assert [len(c) for c in split.blurry_classes] == [2] * 5
    # Each task owns 2 blurry classes x 30 = 60 samples, gives floor(60 * 10 / 100) = 6.
    assert split.blurred_out.tolist() == [6] * 5
    assert split.pool_size == 30 and split.blurred_in.tolist() == [6] * 5
    assert [len(idx) for idx in split.task_indices] == [120] * 5
    owner = owner_table(split)
    disjoint = np.concatenate(split.disjoint_classes)
    for t, idx in enumerate(split.task_indices):
        present = np.unique(LABELS[idx])
        assert all(owner[c] == t for c in present if c in disjoint)


def test_fixed_variant_drops_pool_remainder():
    # 2 tasks x 2 blurry classes; class 3 has 5 samples, the others 2. Whatever the class
    # permutation, the task sizes are 4 and 7, giving floor(4/2) + floor(7/2) = 5 to the pool;
    # each task gets floor(5/2) = 2 back and one pool sample is dropped.
    labels = np.repeat(np.arange(4), [2, 2, 2, 5])
    for seed in range(4):
        split = si_blurry_tasks(labels, num_tasks=2, disjoint_pct=0, blurry_pct=50, seed=seed, stochastic=False)
        assert sorted(split.blurred_out.tolist()) == [2, 3]
        assert split.pool_size == 5 and split.blurred_in.tolist() == [2, 2]
        every = np.concatenate(split.task_indices)
        assert len(every) == 10 and len(set(every.tolist())) == 10


def test_edge_percentages():
    no_blur = si_blurry_tasks(LABELS, disjoint_pct=50, blurry_pct=0, seed=3)
    assert no_blur.pool_size == 0 and no_blur.quotas.sum() == 0
    all_disjoint = si_blurry_tasks(LABELS, disjoint_pct=100, blurry_pct=10, seed=3)
    assert sum(len(c) for c in all_disjoint.blurry_classes) == 0 and all_disjoint.num_blurry_samples == 0
    owner = owner_table(all_disjoint)
    for t, idx in enumerate(all_disjoint.task_indices):
        assert np.all(owner[LABELS[idx]] == t)
    # Leftover classes (not a multiple of T) are never used.
    odd = si_blurry_tasks(np.tile(np.arange(23), 4), num_tasks=5, disjoint_pct=50, seed=1)
    used = sum(len(c) for c in odd.disjoint_classes) + sum(len(c) for c in odd.blurry_classes)
    assert used == 10 + 10 and sum(len(i) for i in odd.task_indices) == 20 * 4


# -- the official sampler, from a local checkout -------------------------------------------------


def _official_sampler():
    path = checkout_root("SI_BLURRY_ROOT") / "utils" / "online_sampler.py"
    spec = importlib.util.spec_from_file_location("_si_blurry_online_sampler", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.OnlineSampler


class _Dataset:
    def __init__(self, labels: np.ndarray, num_classes: int) -> None:
        self.targets = labels.tolist()
        self.classes = [str(c) for c in range(num_classes)]

    def __len__(self) -> int:
        return len(self.targets)


@pytest.mark.official
@pytest.mark.parametrize("stochastic", [True, False])
@pytest.mark.parametrize("seed", [1, 2, 5])
def test_matches_official_sampler(stochastic, seed):
    sampler_cls = _official_sampler()
    labels = np.random.default_rng(seed).permutation(np.tile(np.arange(20), 15))
    with contextlib.redirect_stdout(io.StringIO()):
        sampler = sampler_cls(_Dataset(labels, 20), 5, 10, 50, seed, 0, stochastic)
    ours = si_blurry_split(labels, num_tasks=5, disjoint_pct=50, blurry_pct=10, seed=seed, stochastic=stochastic)
    assert [idx.tolist() for idx in ours] == [list(map(int, t)) for t in sampler.indices]
