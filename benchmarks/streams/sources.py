"""Where a stream's images come from: clean images corrupted on the fly, or corrupted files.

Both kinds answer ``load(domain, severity) -> ImageArrays`` and a cache ``key(domain,
severity)``: a generated source returns the same clean arrays for every domain (one device
copy serves the whole stream), a file source returns one pre-corrupted array per
(domain, severity).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Protocol, runtime_checkable

import numpy as np

from benchmarks.data.base import ImageArrays
from benchmarks.streams.config import CLEAN_DOMAINS, StreamConfig


@runtime_checkable
class DomainSource(Protocol):
    """Images of a (domain, severity) pair.

    ``on_the_fly`` tells the stream whether it must corrupt the returned images itself.
    """

    on_the_fly: bool

    def key(self, domain: str, severity: int) -> Hashable: ...

    def load(self, domain: str, severity: int) -> ImageArrays: ...


class GeneratedSource:
    """Clean images; the stream corrupts them in batches on its device."""

    on_the_fly = True

    def __init__(self, clean: ImageArrays | Callable[[], ImageArrays]) -> None:
        self._clean = clean
        self._loaded: ImageArrays | None = clean if isinstance(clean, ImageArrays) else None

    def key(self, domain: str, severity: int) -> Hashable:
        return "clean"

    def load(self, domain: str, severity: int) -> ImageArrays:
        if self._loaded is None:
            self._loaded = self._clean()  # type: ignore[operator]
        return self._loaded


class FileSource:
    """Pre-corrupted images read by ``loader(domain, severity)``, cached per pair."""

    on_the_fly = False

    def __init__(self, loader: Callable[[str, int], ImageArrays]) -> None:
        self._loader = loader
        self._cache: dict[tuple[str, int], ImageArrays] = {}

    def key(self, domain: str, severity: int) -> Hashable:
        return (domain, severity)

    def load(self, domain: str, severity: int) -> ImageArrays:
        pair = (domain, severity)
        if pair not in self._cache:
            self._cache[pair] = self._loader(domain, severity)
        return self._cache[pair]


def resolve_source(config: StreamConfig) -> DomainSource:
    """The source named by ``config.dataset`` / ``config.source``.

    * ``cifar10_jpeg`` (generate only): the shared CIFAR-10 JPEG tarballs in ``data_root``
      (default ``$TTA_SHARED_DATA``), in a fixed mixed-class order.
    * ``digits`` (built-in, generate only): :func:`benchmarks.data.load_digits`.
    * ``cifar10`` / ``cifar100`` with ``source="files"``: the official CIFAR-10/100-C files
      through :func:`benchmarks.data.corrupted.load_cifar_c`; a clean domain reads the clean
      test set through the data package's CIFAR loader.
    * ``cifar10`` / ``cifar100`` with ``source="generate"``: the clean test set, corrupted on
      the fly: torchvision's files or an ImageFolder under ``data_root``; CIFAR-10 without
      ``data_root`` reads the shared JPEG tarballs (``$TTA_SHARED_DATA``).
    """
    name = config.dataset.lower().removesuffix("_c").removesuffix("-c")
    if name == "cifar10_jpeg":
        if config.source != "generate":
            raise ValueError("dataset cifar10_jpeg holds clean images only; use source='generate'")
        return GeneratedSource(lambda: _shared_jpeg(config.split, config.data_root))
    if name == "digits":
        if config.source != "generate":
            raise ValueError("the digits dataset has no corrupted files; use source='generate'")
        from benchmarks.data import load_digits

        return GeneratedSource(lambda: load_digits(config.split, size=config.image_size))
    if name in ("cifar10", "cifar100"):
        if config.source == "generate":
            return GeneratedSource(lambda: _load_clean_cifar(config, name))

        if config.data_root is None:
            raise ValueError(
                f"source='files' needs data_root: the folder holding {name.upper()}-C/<corruption>.npy"
            )

        def load(domain: str, severity: int) -> ImageArrays:
            if domain in CLEAN_DOMAINS:
                return _load_clean_cifar(config, name)
            from benchmarks.data.corrupted import load_cifar_c

            return load_cifar_c(
                config.data_root, domain, severity, n_examples=config.n_examples, dataset=name
            )

        return FileSource(load)
    raise ValueError(f"unknown dataset {config.dataset!r}; pass a DomainSource to build_stream")


def _load_clean_cifar(config: StreamConfig, name: str) -> ImageArrays:
    """The clean CIFAR split: torchvision's files under ``data_root``, an ImageFolder root, or
    (CIFAR-10 without ``data_root``) the shared JPEG tarballs.

    ImageFolder sources are stored class by class; they are put in the fixed pseudo-random
    order that ``scripts/make_cifar_c.py`` also uses (``default_rng(0).permutation``), so the
    first ``n_examples`` mix the classes as CIFAR's own test order does.
    """
    from pathlib import Path

    from benchmarks.data import load_cifar, load_image_folder

    if config.data_root is None:
        if name != "cifar10":
            raise ValueError(f"dataset {config.dataset!r} needs data_root")
        return _shared_jpeg(config.split, None)
    else:
        root = Path(config.data_root).expanduser()
        torchvision_folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
        if (root / torchvision_folder).is_dir():
            return load_cifar(name, root, train=config.split == "train")
        folder = load_image_folder(root / config.split if (root / config.split).is_dir() else root)
    return _fixed_order(folder)


def _shared_jpeg(split: str, shared_dir: str | None) -> ImageArrays:
    """CIFAR-10 from the shared JPEG tarballs (``shared_dir``, default ``$TTA_SHARED_DATA``)."""
    from benchmarks.data import cifar10_jpeg

    return _fixed_order(cifar10_jpeg(split, shared_dir=shared_dir))


def _fixed_order(folder: ImageArrays) -> ImageArrays:
    return folder.subset(np.random.default_rng(0).permutation(len(folder)))
