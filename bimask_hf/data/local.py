"""Image datasets that load without the network: Debian's Fashion-MNIST files and scikit-learn digits.

Both become ordinary :class:`datasets.Dataset` objects with an ``image`` column (:class:`datasets.Image`)
and a ``label`` column (:class:`datasets.ClassLabel`), exactly like their Hub counterparts, so the rest of
the pipeline cannot tell them apart.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import datasets
import numpy as np

from .errors import DataError

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "fashion_mnist_available",
    "load_digits_dataset",
    "load_fashion_mnist",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# IDX magic numbers: 0x0000 08 (unsigned byte) then the number of dimensions.
_IDX_UBYTE_MAGIC = {1: 0x0801, 3: 0x0803}
_DIGITS_TEST_SIZE = 360  # last 20 % of sklearn's 1,797 digits


def fashion_mnist_available(directory: Path = FASHION_MNIST_DIR) -> bool:
    """Whether the four gzip IDX files of Fashion-MNIST are present in ``directory``.

    Args:
        directory (`Path`, *optional*, defaults to `FASHION_MNIST_DIR`): The folder to look in.

    Returns:
        `bool`: True when all four files are there.
    """
    return all((directory / name).is_file() for files in _FASHION_MNIST_FILES.values() for name in files)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read a gzip-compressed IDX file of unsigned bytes with ``ndim`` dimensions."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    header = np.frombuffer(raw, dtype=">u4", count=1 + ndim)
    if header[0] != _IDX_UBYTE_MAGIC[ndim]:
        raise DataError(f"{path} is not an IDX file of {ndim}-d unsigned bytes (magic {header[0]:#x}).")
    shape = tuple(int(d) for d in header[1:])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 * (1 + ndim)).reshape(shape)


def _grayscale_dataset(
    images: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...]
) -> datasets.Dataset:
    """Build a Dataset of ``L``-mode images from a ``(N, H, W)`` uint8 array.

    Each image is stored as a binary PGM (a 13-byte header plus the raw pixels): PIL decodes it like any
    image file, and unlike PNG it costs nothing to encode, so no on-disk cache is needed.
    """
    height, width = images.shape[1:]
    header = f"P5\n{width} {height}\n255\n".encode()
    encoded = [{"bytes": header + image.tobytes(), "path": None} for image in images]
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=list(class_names)))
    return datasets.Dataset.from_dict({"image": encoded, "label": labels.astype(np.int64)}, features=features)


def load_fashion_mnist(directory: Path = FASHION_MNIST_DIR) -> datasets.DatasetDict:
    """Load Fashion-MNIST (60k train / 10k test 28x28 images) from its gzip IDX files.

    Args:
        directory (`Path`, *optional*, defaults to `FASHION_MNIST_DIR`): Folder holding
            ``train-images-idx3-ubyte.gz`` and the three other files, as installed by Debian's
            ``dataset-fashion-mnist`` package.

    Returns:
        `datasets.DatasetDict`: ``train`` and ``test`` splits, columns ``image`` and ``label``.

    Raises:
        DataError: If files are missing or malformed.
    """
    if not fashion_mnist_available(directory):
        raise DataError(
            f"Fashion-MNIST files are missing from {directory}; install Debian's dataset-fashion-mnist "
            "or use the Hub id 'zalando-datasets/fashion_mnist'."
        )
    splits = {}
    for split, (image_file, label_file) in _FASHION_MNIST_FILES.items():
        images = _read_idx(directory / image_file, ndim=3)
        labels = _read_idx(directory / label_file, ndim=1)
        if len(images) != len(labels):
            raise DataError(f"{directory}: {len(images)} {split} images but {len(labels)} labels.")
        splits[split] = _grayscale_dataset(images, labels, FASHION_MNIST_CLASSES)
    return datasets.DatasetDict(splits)


def load_digits_dataset() -> datasets.DatasetDict:
    """Load scikit-learn's 1,797 8x8 handwritten digits as ``train`` (1,437) and ``test`` (360) splits.

    The split is the fixed last 360 images, so results are reproducible without a seed. Pixel values
    (0..16) are scaled to 0..255.

    Returns:
        `datasets.DatasetDict`: ``train`` and ``test`` splits, columns ``image`` and ``label``.

    Raises:
        DataError: Without scikit-learn.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise DataError("The 'digits' dataset needs scikit-learn: pip install scikit-learn.") from err
    bunch = load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = bunch.target
    names = tuple(str(n) for n in bunch.target_names)
    cut = len(images) - _DIGITS_TEST_SIZE
    return datasets.DatasetDict(
        train=_grayscale_dataset(images[:cut], labels[:cut], names),
        test=_grayscale_dataset(images[cut:], labels[cut:], names),
    )
