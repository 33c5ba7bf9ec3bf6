"""Si-Blurry task boundaries (Moon et al., ICCV 2023, "Online Continual Learning on a
Contaminated Data Stream with Blurry Task Boundaries"; docs/METHODS.md §9.5).

Classes are split into *disjoint* classes (each seen in exactly one task) and *blurry*
classes (each owned by one task, but a share of their samples is moved to random other
tasks). The stochastic variant draws random class counts per task and random blurred-sample
quotas; the fixed variant splits evenly (i-Blurry-like).

All randomness comes from one ``torch.Generator`` seeded with ``seed``, consumed in the
order of §9.5 (class permutation, disjoint cut points, blurry cut points, quota cut points,
pool permutation, one permutation per task), which the official sampler needs for exact
reproduction. The function is framework-free: it returns index arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class BlurrySplit:
    """The outcome of a Si-Blurry split.

    Attributes:
        task_indices: per task, the sample indices of its stream in presentation order.
        disjoint_classes: per task, its disjoint classes.
        blurry_classes: per task, the blurry classes it owns.
        blurred_out: per task, how many of its own blurry samples went into the pool.
        blurred_in: per task, how many pool samples it received.
        quotas: per task, the drawn quota (stochastic) or the per-task hand-back size (fixed).
        num_blurry_samples: S, all samples of blurry classes.
        pool_size: number of samples moved through the pool.
    """

    task_indices: list[np.ndarray]
    disjoint_classes: list[np.ndarray]
    blurry_classes: list[np.ndarray]
    blurred_out: np.ndarray
    blurred_in: np.ndarray
    quotas: np.ndarray
    num_blurry_samples: int
    pool_size: int

    @property
    def num_tasks(self) -> int:
        return len(self.task_indices)

    def task_classes(self, labels: np.ndarray) -> list[np.ndarray]:
        """Classes actually present in each task's stream."""
        return [np.unique(np.asarray(labels)[idx]) for idx in self.task_indices]


def _cut_points(total: int, num_tasks: int, generator: torch.Generator) -> list[int]:
    """``[0, sorted T-1 uniform draws from [0, total), total]``: random split of ``total``."""
    draws = torch.randint(0, total, (num_tasks - 1,), generator=generator).sort().values.tolist()
    return [0, *draws, total]


def _permute(values: np.ndarray, generator: torch.Generator) -> np.ndarray:
    return values[torch.randperm(len(values), generator=generator).numpy()]


def si_blurry_tasks(
    labels: np.ndarray,
    num_tasks: int = 5,
    disjoint_pct: int = 50,
    blurry_pct: int = 10,
    seed: int = 1,
    stochastic: bool = True,
    num_classes: int | None = None,
) -> BlurrySplit:
    """Split a labelled training set into Si-Blurry tasks (§9.5), with bookkeeping.

    Args:
        labels: int label of every training sample (index order is the dataset order).
        num_tasks: T.
        disjoint_pct: N, percentage of classes that are disjoint.
        blurry_pct: M, percentage of blurry-class samples that are blurred across tasks.
        seed: seed of the ``torch.Generator``.
        stochastic: random per-task class counts and quotas (Si-Blurry, what the official
            trainer runs); ``False`` gives the fixed, even, i-Blurry-like split.
        num_classes: number of classes (default ``labels.max() + 1``).
    """
    labels = np.asarray(labels, dtype=np.int64)
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    if not 0 <= disjoint_pct <= 100 or not 0 <= blurry_pct <= 100:
        raise ValueError("disjoint_pct and blurry_pct must be percentages in [0, 100]")
    n_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    generator = torch.Generator().manual_seed(int(seed))

    # Class counts, rounded down to multiples of T (§9.5 "Counts").
    n_disjoint = (n_classes * disjoint_pct // 100) // num_tasks * num_tasks
    n_blurry = (n_classes - n_disjoint) // num_tasks * num_tasks

    order = torch.randperm(n_classes, generator=generator).numpy()
    disjoint_pool, blurry_pool = order[:n_disjoint], order[n_disjoint : n_disjoint + n_blurry]
    if stochastic:
        disjoint_classes = _split_by_cuts(disjoint_pool, num_tasks, generator)
        blurry_classes = _split_by_cuts(blurry_pool, num_tasks, generator)
    else:
        disjoint_classes = list(disjoint_pool.reshape(num_tasks, -1))
        blurry_classes = list(blurry_pool.reshape(num_tasks, -1))

    # Scan the training set in index order (§9.5 step 3): a class -> (task, kind) table.
    owner = np.full(n_classes, -1, dtype=np.int64)
    is_blurry = np.zeros(n_classes, dtype=bool)
    for task, classes in enumerate(disjoint_classes):
        owner[classes] = task
    for task, classes in enumerate(blurry_classes):
        owner[classes] = task
        is_blurry[classes] = True
    sample_owner, sample_blurry = owner[labels], is_blurry[labels]
    disjoint_idx = [np.flatnonzero((sample_owner == t) & ~sample_blurry) for t in range(num_tasks)]
    blurry_idx = [np.flatnonzero((sample_owner == t) & sample_blurry) for t in range(num_tasks)]
    num_blurry_samples = int(sum(len(b) for b in blurry_idx))

    if stochastic:
        blurry_idx, out, inn, quotas, pool_size = _blur_stochastic(
            blurry_idx, num_blurry_samples * blurry_pct // 100, generator
        )
    else:
        blurry_idx, out, inn, quotas, pool_size = _blur_fixed(blurry_idx, blurry_pct, generator)

    task_indices = [
        _permute(np.concatenate([disjoint_idx[t], blurry_idx[t]]).astype(np.int64), generator)
        for t in range(num_tasks)
    ]
    return BlurrySplit(
        task_indices=task_indices,
        disjoint_classes=[np.asarray(c, dtype=np.int64) for c in disjoint_classes],
        blurry_classes=[np.asarray(c, dtype=np.int64) for c in blurry_classes],
        blurred_out=out,
        blurred_in=inn,
        quotas=quotas,
        num_blurry_samples=num_blurry_samples,
        pool_size=pool_size,
    )


def _split_by_cuts(classes: np.ndarray, num_tasks: int, generator: torch.Generator) -> list[np.ndarray]:
    """Random contiguous split of ``classes`` into T (possibly empty) groups; no draw if empty."""
    if len(classes) == 0:
        return [classes[:0] for _ in range(num_tasks)]
    cuts = _cut_points(len(classes), num_tasks, generator)
    return [classes[cuts[t] : cuts[t + 1]] for t in range(num_tasks)]


def _blur_stochastic(
    blurry_idx: list[np.ndarray], total_quota: int, generator: torch.Generator
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray, int]:
    """§9.5 step 4: random quotas; each task gives its first quota_t blurry samples to a pool,
    the permuted pool is handed back front-first, quota_t samples per task in order."""
    num_tasks = len(blurry_idx)
    zeros = np.zeros(num_tasks, dtype=np.int64)
    if total_quota <= 0:
        return blurry_idx, zeros, zeros.copy(), zeros.copy(), 0
    cuts = _cut_points(total_quota, num_tasks, generator)
    quotas = np.diff(np.asarray(cuts, dtype=np.int64))
    given = [b[:q] for b, q in zip(blurry_idx, quotas)]
    kept = [b[q:] for b, q in zip(blurry_idx, quotas)]
    pool = _permute(np.concatenate(given).astype(np.int64), generator)
    received, offset = [], 0
    for q in quotas:
        received.append(pool[offset : offset + q])
        offset += len(received[-1])
    out = np.array([len(g) for g in given], dtype=np.int64)
    inn = np.array([len(r) for r in received], dtype=np.int64)
    return [np.concatenate([k, r]) for k, r in zip(kept, received)], out, inn, quotas, len(pool)


def _blur_fixed(
    blurry_idx: list[np.ndarray], blurry_pct: int, generator: torch.Generator
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray, int]:
    """Fixed variant: each task gives its first floor(n_t * M / 100) blurry samples; the
    permuted pool is handed back in equal shares of floor(pool / T) (remainder dropped)."""
    num_tasks = len(blurry_idx)
    give = np.array([len(b) * blurry_pct // 100 for b in blurry_idx], dtype=np.int64)
    given = [b[:g] for b, g in zip(blurry_idx, give)]
    kept = [b[g:] for b, g in zip(blurry_idx, give)]
    pool = _permute(np.concatenate(given).astype(np.int64), generator)
    share = len(pool) // num_tasks
    received = [pool[t * share : (t + 1) * share] for t in range(num_tasks)]
    inn = np.full(num_tasks, share, dtype=np.int64)
    quotas = inn.copy()
    return [np.concatenate([k, r]) for k, r in zip(kept, received)], give, inn, quotas, len(pool)


def si_blurry_split(
    labels: np.ndarray,
    num_tasks: int = 5,
    disjoint_pct: int = 50,
    blurry_pct: int = 10,
    seed: int = 1,
    stochastic: bool = True,
    num_classes: int | None = None,
) -> list[np.ndarray]:
    """Per-task sample index arrays of a Si-Blurry split (§9.5).

    See :func:`si_blurry_tasks` for the arguments and for the per-task class sets and
    blurred-sample counts.
    """
    return si_blurry_tasks(
        labels, num_tasks, disjoint_pct, blurry_pct, seed=seed, stochastic=stochastic, num_classes=num_classes
    ).task_indices
