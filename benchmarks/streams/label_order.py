"""Label orders of a test stream: i.i.d., class-sorted and Dirichlet-correlated (§9.2).

All functions return an *index order* into the label vector they are given and take an
explicit NumPy random generator, so a stream is reproducible from its seed alone.

The Dirichlet sampler follows the procedure of NOTE (Gong et al., NeurIPS 2022) as used by the
mariodoebler test-time-adaptation benchmark and UnMix-TNS (docs/METHODS.md §9.2). The official
code draws from NumPy's *global* RNG (seeded per domain with the run seed); here the generator
is passed in. Passing ``np.random.RandomState(seed)`` consumes randomness in the same order as
the official code after ``np.random.seed(seed)``; the library itself uses a seeded
``np.random.Generator`` by default. :func:`official_order` rebuilds the exact order the
official loader gives for a run seed (its Python ``random`` shuffle, then the global NumPy
generator), and :func:`segment_order` adds TRIBE's global class imbalance (a long-tailed
subsample) under any of these label orders. :func:`class_temporal_order` is the other
Dirichlet sampler of the literature, RoTTA's and PeTTA's "class_temporal" one (docs/BENCHMARKS.md, "Long streams").
"""

from __future__ import annotations

import random
import time

import numpy as np

RandomSource = np.random.Generator | np.random.RandomState


def iid_order(n: int, rng: RandomSource) -> np.ndarray:
    """A seeded uniform shuffle of ``range(n)``."""
    return np.asarray(rng.permutation(n), dtype=np.int64)


def sorted_order(labels: np.ndarray) -> np.ndarray:
    """Indices that sort ``labels`` by class, keeping the existing order inside a class.

    Stable, like the official ``list.sort(key=label)`` applied to an already shuffled list.
    """
    return np.argsort(np.asarray(labels), kind="stable").astype(np.int64)


def dirichlet_chunks(
    labels: np.ndarray,
    num_classes: int,
    delta: float,
    rng: RandomSource,
    *,
    min_chunk_size: int = 10,
    timeout_s: float = 120.0,
) -> list[list[np.ndarray]]:
    """Step 1 of §9.2: assign every sample to one of ``num_classes`` chunks.

    Each class's samples are shuffled and spread over the chunks with proportions drawn from
    ``Dir(delta * 1)``; chunks that already hold at least ``N / num_classes`` samples get no
    more (their proportion is zeroed). The whole assignment is redrawn until every chunk holds
    at least ``min_chunk_size`` samples (``ValueError`` after ``timeout_s`` seconds).

    Returns:
        ``pieces[j][k]``: the positions (into ``labels``) of class ``k`` in chunk ``j``.
    """
    if delta <= 0:
        raise ValueError(f"delta must be > 0 (use sorted_order for delta == 0), got {delta}")
    labels = np.asarray(labels)
    n = len(labels)
    num_chunks = int(num_classes)
    if num_chunks < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    # Positions of each class in the given order (np.flatnonzero keeps that order).
    per_class = [np.flatnonzero(labels == k) for k in range(num_chunks)]
    alpha = np.full(num_chunks, float(delta))
    capacity = n / num_chunks
    start = time.monotonic()
    while True:
        chunk_sizes = np.zeros(num_chunks, dtype=np.int64)
        pieces: list[list[np.ndarray]] = [[] for _ in range(num_chunks)]
        for k in range(num_chunks):
            members = per_class[k].copy()
            rng.shuffle(members)
            proportions = rng.dirichlet(alpha) * (chunk_sizes < capacity)
            total = proportions.sum()
            if total > 0:
                proportions = proportions / total
            else:
                # Every open chunk drew an exact 0 (float underflow at tiny delta); the official
                # code would divide by zero here. Spread evenly over the open chunks instead.
                open_chunks = chunk_sizes < capacity
                proportions = open_chunks / open_chunks.sum()
            cuts = (np.cumsum(proportions) * len(members)).astype(np.int64)[:-1]
            for j, piece in enumerate(np.split(members, cuts)):
                pieces[j].append(piece)
                chunk_sizes[j] += len(piece)
        if chunk_sizes.min() >= min_chunk_size:
            return pieces
        if time.monotonic() - start > timeout_s:
            raise ValueError(
                f"no Dirichlet order with >= {min_chunk_size} samples per chunk found in "
                f"{timeout_s:.0f} s for delta={delta}, N={n}, C={num_chunks}; try another delta "
                "or a smaller min_chunk_size"
            )


def dirichlet_order(
    labels: np.ndarray,
    num_classes: int,
    delta: float,
    rng: RandomSource,
    *,
    min_chunk_size: int = 10,
    timeout_s: float = 120.0,
) -> np.ndarray:
    """Label-correlated order of ``labels`` with Dirichlet concentration ``delta`` (§9.2).

    Chunks come from :func:`dirichlet_chunks` and are emitted in order; inside a chunk the
    classes come in a fresh random order, each class's piece contiguously.

    Small ``delta`` puts each class into few chunks, giving long single-class runs; large
    ``delta`` spreads classes evenly, but each chunk is still emitted class by class, so the
    stream stays label-correlated (``delta -> inf`` is not i.i.d.).

    Args:
        labels: int labels in stream order (usually already shuffled).
        num_classes: number of classes C (also the number of chunks).
        delta: concentration δ > 0.
        rng: ``np.random.Generator`` or ``np.random.RandomState``.
        min_chunk_size: minimum samples per chunk (10 in the official code).
        timeout_s: seconds before the retry loop gives up (120 in the official code).

    Returns:
        int64 index array, a permutation of ``range(len(labels))``.
    """
    pieces = dirichlet_chunks(
        labels, num_classes, delta, rng, min_chunk_size=min_chunk_size, timeout_s=timeout_s
    )
    emitted = [chunk[k] for chunk in pieces for k in rng.permutation(len(chunk))]
    return np.concatenate(emitted).astype(np.int64) if emitted else np.zeros(0, dtype=np.int64)


def class_temporal_order(
    labels: np.ndarray, num_classes: int, gamma: float, rng: RandomSource, num_slots: int | None = None
) -> np.ndarray:
    """RoTTA's and PeTTA's temporally correlated label order (the "class_temporal" sampler,
    ``LabelDirichletDomainSequence`` of BIT-DA/RoTTA and hthieu166/petta, ``ttasampler.py``).

    The stream of one domain is cut into ``num_slots`` consecutive slots (``num_classes``, at
    most 100). Each class ``k`` splits its samples, in the given order, over the slots with
    proportions drawn from ``Dir(gamma * 1)`` (one draw per class, ``C x slots`` in all; the
    split points are ``floor(cumsum(p)[:-1] * n_k)``); each slot then emits its classes' pieces
    in a random order of the classes. A small ``gamma`` puts most of a class into one slot:
    long runs of one class, the classes taking turns. Unlike :func:`dirichlet_order` nothing is
    shuffled first and no chunk has a minimum size, as in the official sampler. Passing
    ``np.random.RandomState(s)`` draws in the official order after ``np.random.seed(s)``.

    Returns:
        int64 positions into ``labels`` (every sample exactly once).
    """
    if gamma <= 0:
        raise ValueError(f"the class_temporal order needs a concentration > 0, got {gamma}")
    labels = np.asarray(labels)
    slots = num_slots or min(num_classes, 100)
    proportions = rng.dirichlet([gamma] * slots, num_classes)  # (C, slots)
    pieces: list[list[np.ndarray]] = [[] for _ in range(slots)]
    for k in range(num_classes):  # one split per class (C <= 1000), not per sample
        members = np.flatnonzero(labels == k)
        cuts = (np.cumsum(proportions[k])[:-1] * len(members)).astype(int)
        for slot, part in enumerate(np.split(members, cuts)):
            pieces[slot].append(part)
    emitted = [slot[i] for slot in pieces for i in rng.permutation(len(slot))]
    return np.concatenate(emitted).astype(np.int64) if emitted else np.zeros(0, dtype=np.int64)


def order_labels(
    labels: np.ndarray,
    kind: str,
    rng: RandomSource,
    *,
    num_classes: int,
    delta: float = 0.1,
    min_chunk_size: int = 10,
    timeout_s: float = 120.0,
) -> np.ndarray:
    """The index order of one stream segment: shuffle, then apply the label order.

    Mirrors the official loaders (§9.3): the sample list is always shuffled with the seeded
    generator first; ``"sorted"`` then sorts it stably by class and ``"dirichlet"`` reorders
    it with :func:`dirichlet_order` (δ = 0 means sorted). ``"class_temporal"`` is
    :func:`class_temporal_order` with concentration ``delta`` over the list as given (its
    official sampler does not shuffle first).
    """
    if kind == "class_temporal":
        return class_temporal_order(labels, num_classes, delta, rng)
    shuffled = iid_order(len(labels), rng)
    if kind == "iid":
        return shuffled
    if kind == "sorted" or (kind == "dirichlet" and delta == 0):
        return shuffled[sorted_order(np.asarray(labels)[shuffled])]
    if kind == "dirichlet":
        inner = dirichlet_order(
            np.asarray(labels)[shuffled],
            num_classes,
            delta,
            rng,
            min_chunk_size=min_chunk_size,
            timeout_s=timeout_s,
        )
        return shuffled[inner]
    raise ValueError(f"unknown label order {kind!r}")


def label_runs(labels: np.ndarray) -> np.ndarray:
    """Lengths of the maximal runs of identical consecutive labels, in stream order."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return np.zeros(0, dtype=np.int64)
    change = np.flatnonzero(labels[1:] != labels[:-1]) + 1
    bounds = np.concatenate(([0], change, [labels.size]))
    return np.diff(bounds).astype(np.int64)


def mean_run_length(labels: np.ndarray) -> float:
    """Mean length of identical-label runs: about C/(C-1) for an i.i.d. balanced stream,
    the class size for a sorted one (a measure of temporal label correlation, §9.2)."""
    runs = label_runs(labels)
    return float(runs.mean()) if runs.size else 0.0


SEEDINGS: tuple[str, ...] = ("library", "official")
IMBALANCE_ORDERS: tuple[str, ...] = ("constant", "random")


def long_tailed_counts(n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """Per-class sample counts of a long-tailed label distribution (TRIBE's GLI-TTA protocol).

    Class ``k`` keeps ``int(n_max * (1 / imbalance_factor) ** (k / (C - 1)))`` samples: the
    head class ``n_max``, the tail class ``n_max / imbalance_factor`` (truncated), and an
    exponential decay in between, as in Gorilla-Lab-SCUT/TRIBE's
    ``LabelDirichletDomainSequenceLongTailed.gen_imbalanced_data`` (Su et al., AAAI 2024).
    Computed with Python floats in the same order, so the truncations agree.
    """
    if imbalance_factor < 1:
        raise ValueError(f"imbalance_factor must be >= 1, got {imbalance_factor}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if num_classes == 1:
        return [int(n_max)]
    ratio = 1.0 / float(imbalance_factor)
    return [int(n_max * (ratio ** (k / (num_classes - 1.0)))) for k in range(num_classes)]


def long_tailed_subset(
    labels: np.ndarray,
    num_classes: int,
    imbalance_factor: float,
    rng: RandomSource,
    *,
    class_order: str = "constant",
) -> np.ndarray:
    """Positions of a long-tailed subsample of ``labels`` (global class imbalance, GLI-TTA).

    As TRIBE: the head count ``n_max`` is the number of samples of class 0 in ``labels``; the
    per-class counts come from :func:`long_tailed_counts`; with ``class_order="random"``
    (their GLI-TTA-V) the counts are first shuffled over the classes, with ``"constant"``
    (GLI-TTA-F) class 0 is the head and class C-1 the tail. Each class's positions are then
    shuffled and the first ``count`` kept (all of them when the class has fewer). TRIBE
    special-cases MNIST (``n_max = 980`` becomes 1000); that is not reproduced.

    Returns:
        int64 positions into ``labels``, ascending (so a later shuffle sees file order).
    """
    if class_order not in IMBALANCE_ORDERS:
        raise ValueError(f"class_order must be one of {IMBALANCE_ORDERS}, got {class_order!r}")
    labels = np.asarray(labels)
    per_class = [np.flatnonzero(labels == k) for k in range(int(num_classes))]
    counts = long_tailed_counts(len(per_class[0]), int(num_classes), imbalance_factor)
    if class_order == "random":
        counts = list(np.asarray(counts)[rng.permutation(len(counts))])
    kept = []
    for members, count in zip(per_class, counts):  # one step per class, as the reference
        members = members.copy()
        rng.shuffle(members)
        kept.append(members[: int(count)])
    return np.sort(np.concatenate(kept)).astype(np.int64)


def official_order(
    labels: np.ndarray,
    kind: str,
    seed: int,
    *,
    num_classes: int,
    delta: float = 0.1,
    min_chunk_size: int = 10,
    timeout_s: float = 120.0,
) -> np.ndarray:
    """The order mariodoebler's test loader gives a domain for run seed ``seed`` (§9.2, §9.3).

    That loader calls ``random.seed(seed)`` and ``np.random.seed(seed)``, shuffles the sample
    list with Python's ``random.shuffle``, and then sorts it stably by label (``"sorted"``,
    or Dirichlet with ``delta == 0``) or reorders it with the Dirichlet sampler drawing from
    NumPy's global generator (``"dirichlet"``). Here the same two generators are created
    locally (``random.Random(seed)``, ``np.random.RandomState(seed)``), so a published
    stream can be rebuilt from its seed without touching global state.
    """
    positions = list(range(len(labels)))
    random.Random(seed).shuffle(positions)
    shuffled = np.asarray(positions, dtype=np.int64)
    if kind == "iid":
        return shuffled
    labels = np.asarray(labels)
    if kind == "sorted" or (kind == "dirichlet" and delta == 0):
        return shuffled[sorted_order(labels[shuffled])]
    if kind == "dirichlet":
        inner = dirichlet_order(
            labels[shuffled],
            num_classes,
            delta,
            np.random.RandomState(seed),
            min_chunk_size=min_chunk_size,
            timeout_s=timeout_s,
        )
        return shuffled[inner]
    raise ValueError(f"unknown label order {kind!r}")


def segment_order(
    labels: np.ndarray,
    kind: str,
    seed: int,
    *,
    num_classes: int,
    delta: float = 0.1,
    seeding: str = "library",
    imbalance_factor: float | None = None,
    imbalance_order: str = "constant",
    min_chunk_size: int = 10,
    timeout_s: float = 120.0,
) -> np.ndarray:
    """The sample order of one stream segment: optional global imbalance, then the label order.

    1. Global class imbalance (``imbalance_factor`` not ``None``): a long-tailed subsample
       (:func:`long_tailed_subset`) drawn with ``np.random.default_rng(seed)``.
    2. Local label order over the (sub)sample: with ``seeding="library"`` (the default)
       :func:`order_labels` with the same generator; with ``seeding="official"``
       :func:`official_order`, the order mariodoebler's loader gives for ``seed``.

    This is how TRIBE's GLI-TTA composes the two: the long-tailed subset first, the local
    (Dirichlet) correlation over it. TRIBE uses its own Dirichlet variant (slots without
    NOTE's capacity rule); here the library's label orders apply, so any of
    ``iid``/``sorted``/``dirichlet`` can sit on top of the imbalance.

    Returns:
        int64 positions into ``labels`` in stream order (a subset when imbalanced).
    """
    if seeding not in SEEDINGS:
        raise ValueError(f"seeding must be one of {SEEDINGS}, got {seeding!r}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    if imbalance_factor is None:
        keep = np.arange(len(labels), dtype=np.int64)
    else:
        keep = long_tailed_subset(labels, num_classes, imbalance_factor, rng, class_order=imbalance_order)
    common = dict(num_classes=num_classes, delta=delta, min_chunk_size=min_chunk_size, timeout_s=timeout_s)
    if seeding == "official":
        inner = official_order(labels[keep], kind, seed, **common)
    else:
        inner = order_labels(labels[keep], kind, rng, **common)
    return keep[inner]
