"""Image-classification data for bimask-hf: named, Hub and local datasets with recipe transforms.

The entry point is :func:`load_image_classification_data`; everything it raises for a bad request is a
:class:`DataError`.
"""

from typing import Any

from .errors import DataError
from .statistics import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD

# `datasets` loads on first use: the models import the statistics above without it.
_LAZY = {
    "ImageClassificationData": "loading",
    "load_image_classification_data": "loading",
    "KNOWN_DATASETS": "sources",
    "RECIPES": "transforms",
    "collate_image_batch": "transforms",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "KNOWN_DATASETS",
    "RECIPES",
    "DataError",
    "ImageClassificationData",
    "collate_image_batch",
    "load_image_classification_data",
]
