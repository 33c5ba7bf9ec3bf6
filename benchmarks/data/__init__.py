"""Data sources. Each returns :class:`ImageArrays` (uint8 NHWC images and int64 labels)."""

from benchmarks.data.base import ImageArrays
from benchmarks.data.cifar import load_cifar
from benchmarks.data.corrupted import load_cifar_c, load_imagenet_c
from benchmarks.data.digits import load_digits
from benchmarks.data.folder import cifar10_jpeg, load_image_folder

__all__ = [
    "ImageArrays",
    "cifar10_jpeg",
    "load_cifar",
    "load_cifar_c",
    "load_digits",
    "load_image_folder",
    "load_imagenet_c",
]
