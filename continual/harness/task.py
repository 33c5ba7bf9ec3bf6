"""The competition stream, built and held by the harness process.

The test labels live only here. The submission receives the training stream piece by piece
and the test images in a secret random order (so that the order of the test set, often
grouped by class on disk, tells nothing), and answers with scores.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import numpy as np

from benchmarks.data.base import ImageArrays
from continual.harness.config import HarnessConfig
from continual.subsets import class_half, per_class_subset


@dataclass(frozen=True)
class Segment:
    """One training experience handed to the submission.

    ``[start, end)`` indexes the training stream; ``periodic_eval`` / ``task_end_eval`` say
    whether predictions are requested after it (anytime accuracy / end of task).
    """

    start: int
    end: int
    task: int
    first_in_task: bool
    last_in_task: bool
    periodic_eval: bool

    @property
    def evaluates(self) -> bool:
        return self.periodic_eval or self.last_in_task


class ScenarioMismatch(ValueError):
    """A scenario's data or hidden labels do not match their published checksum."""


def array_digest(*arrays: np.ndarray) -> str:
    """SHA-256 over the dtype, shape and bytes of every array, in order."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def scenario_digest(
    train_images: np.ndarray, train_labels: np.ndarray, task_sizes: tuple[int, ...], test_images: np.ndarray,
    class_names: tuple[str, ...],
) -> str:
    """Checksum of everything public about a scenario (test images in their canonical order)."""
    names = np.frombuffer("\n".join(class_names).encode(), dtype=np.uint8)
    return array_digest(train_images, train_labels, np.asarray(task_sizes, dtype=np.int64), test_images, names)


@dataclass(frozen=True)
class CompetitionTask:
    """Training stream in presentation order and a privately shuffled test set.

    ``scenario_sha256`` / ``labels_sha256`` are the checksums of the scenario and of the
    hidden test labels, both taken in the canonical (unshuffled) test order, so that they do
    not depend on the secret per-run permutation ``test_order``.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    task_sizes: tuple[int, ...]
    test_images: np.ndarray
    test_labels: np.ndarray  # private: never sent to the submission
    num_classes: int
    class_names: tuple[str, ...]
    test_order: np.ndarray  # private: canonical index of every shuffled test sample
    scenario_sha256: str
    labels_sha256: str

    @property
    def num_tasks(self) -> int:
        return len(self.task_sizes)

    def _canonical(self, shuffled: np.ndarray) -> np.ndarray:
        canonical = np.empty_like(shuffled)
        canonical[self.test_order] = shuffled
        return canonical

    def verify(self, scenario_sha256: str = "", labels_sha256: str = "") -> None:
        """Recompute both checksums from the arrays held now and compare them with the
        recorded ones and, if given, with the published ones.

        Raises:
            ScenarioMismatch: the data or the labels changed, or differ from the published ones.
        """
        scenario = scenario_digest(
            self.train_images, self.train_labels, self.task_sizes, self._canonical(self.test_images), self.class_names
        )
        labels = array_digest(self._canonical(self.test_labels))
        for what, actual, recorded, published in (
            ("scenario", scenario, self.scenario_sha256, scenario_sha256),
            ("hidden labels", labels, self.labels_sha256, labels_sha256),
        ):
            if actual != recorded:
                raise ScenarioMismatch(f"the {what} changed since the task was built (sha256 {actual}, built {recorded})")
            if published and actual != published:
                raise ScenarioMismatch(f"the {what} do not match the published checksum (sha256 {actual}, published {published})")

    def segments(self, experience_size: int, eval_period: int) -> list[Segment]:
        """Cut every task into experiences of ``experience_size`` samples, also cutting at every
        multiple of ``eval_period`` seen samples, where an anytime evaluation follows."""
        cuts: list[Segment] = []
        start = 0
        for task, size in enumerate(self.task_sizes):
            end_of_task = start + size
            position = start
            while position < end_of_task:
                next_eval = (position // eval_period + 1) * eval_period
                end = min(position + experience_size, end_of_task, next_eval)
                cuts.append(
                    Segment(position, end, task, position == start, end == end_of_task, end % eval_period == 0)
                )
                position = end
            start = end_of_task
        return cuts


def _load(config: HarnessConfig) -> tuple[ImageArrays, ImageArrays]:
    if config.benchmark.endswith("digits"):
        from benchmarks.data import load_digits

        train, test = load_digits("train"), load_digits("test")
    else:
        from benchmarks.data.folder import cifar10_jpeg

        train, test = cifar10_jpeg("train"), cifar10_jpeg("test")
    # The half first (a partition fixed for every seed), then the seeded subset within it.
    return (
        per_class_subset(class_half(train, config.data_part), config.train_per_class, config.seed),
        per_class_subset(class_half(test, config.data_part), config.test_per_class, config.seed),
    )


def _class_incremental_order(labels: np.ndarray, num_tasks: int, num_classes: int, seed: int) -> list[np.ndarray]:
    """Tasks of ``num_classes / num_tasks`` consecutive classes, samples shuffled within a task."""
    if num_classes % num_tasks:
        raise ValueError(f"{num_classes} classes do not split into {num_tasks} equal tasks")
    rng = np.random.default_rng(seed)
    per_task = num_classes // num_tasks
    task_of_sample = labels // per_task
    return [rng.permutation(np.flatnonzero(task_of_sample == task)) for task in range(num_tasks)]


def build_task(config: HarnessConfig, rng_seed: int | None = None) -> CompetitionTask:
    """Load the data, order the training stream and shuffle the test set secretly.

    ``rng_seed`` fixes the test permutation (tests only); by default it comes from the OS
    entropy pool, so the submission cannot reproduce it.
    """
    train, test = _load(config)
    num_classes = train.num_classes
    if config.benchmark.startswith("si_blurry"):
        from benchmarks.streams.si_blurry import si_blurry_split

        tasks = si_blurry_split(train.labels, config.num_tasks, seed=config.seed, num_classes=num_classes)
    else:
        tasks = _class_incremental_order(train.labels, config.num_tasks, num_classes, config.seed)
    order = np.concatenate(tasks)
    return assemble_task(
        train.images[order], train.labels[order], tuple(len(t) for t in tasks), test.images, test.labels,
        num_classes, tuple(train.classes), rng_seed,
    )


def assemble_task(
    train_images: np.ndarray, train_labels: np.ndarray, task_sizes: tuple[int, ...], test_images: np.ndarray,
    test_labels: np.ndarray, num_classes: int, class_names: tuple[str, ...], rng_seed: int | None = None,
) -> CompetitionTask:
    """A task from a training stream in presentation order and a test set in canonical order:
    checksums taken, then the test set shuffled secretly (see :func:`build_task`)."""
    secret = np.random.default_rng(secrets.randbits(64) if rng_seed is None else rng_seed)
    test_order = secret.permutation(len(test_labels))
    return CompetitionTask(
        train_images=train_images,
        train_labels=train_labels,
        task_sizes=task_sizes,
        test_images=test_images[test_order],
        test_labels=test_labels[test_order],
        num_classes=num_classes,
        class_names=class_names,
        test_order=test_order,
        scenario_sha256=scenario_digest(train_images, train_labels, task_sizes, test_images, class_names),
        labels_sha256=array_digest(test_labels),
    )
