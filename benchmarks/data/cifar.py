"""CIFAR-10 / CIFAR-100 through torchvision's dataset classes (their download code included)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.data.base import ImageArrays

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

# CIFAR-100 fine labels in label order (alphabetical), as in the dataset's "meta" file.
CIFAR100_CLASSES: tuple[str, ...] = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip

CIFAR_CLASSES = {"cifar10": CIFAR10_CLASSES, "cifar100": CIFAR100_CLASSES}


def load_cifar(name: str, root: str | Path, train: bool, download: bool = False) -> ImageArrays:
    """CIFAR-10 or CIFAR-100 (Krizhevsky, 2009) as ``ImageArrays``, in dataset order.

    Args:
        name: ``"cifar10"`` or ``"cifar100"`` (fine labels).
        root: folder holding torchvision's ``cifar-10-batches-py`` / ``cifar-100-python``.
        train: the 50,000 training images, else the 10,000 test images.
        download: let torchvision download and extract the archive into ``root``.

    Raises:
        FileNotFoundError: the dataset is not under ``root`` and ``download`` is false.
    """
    from torchvision.datasets import CIFAR10, CIFAR100

    key = name.lower().replace("-", "")
    if key not in CIFAR_CLASSES:
        raise ValueError(f"name must be 'cifar10' or 'cifar100', got {name!r}")
    dataset_cls = CIFAR10 if key == "cifar10" else CIFAR100
    root = Path(root).expanduser()
    try:
        dataset = dataset_cls(root=str(root), train=train, download=download)
    except RuntimeError as error:
        if download:
            raise
        raise FileNotFoundError(
            f"{name} not found (or corrupted) under {root} (expected {root / dataset_cls.base_folder}). "
            f"Pass download=True to fetch {dataset_cls.url}, or extract that archive into {root}."
        ) from error
    images = np.asarray(dataset.data, dtype=np.uint8)
    labels = np.asarray(dataset.targets, dtype=np.int64)
    return ImageArrays(images, labels, tuple(dataset.classes))
