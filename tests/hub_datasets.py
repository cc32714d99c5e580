"""A dataset repo shaped like ``uoft-cs/cifar10`` (config ``plain_text``, columns ``img``/``label``), built
from Fashion-MNIST at 32x32 RGB, to serve from the loopback olah Hub in tests."""

from __future__ import annotations

import math
import os

import datasets

from bimask_hf.data.local import load_fashion_mnist

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MAX_SHARD_BYTES = 64 * 1024  # olah ignores HTTP Range: pyarrow's 64 KiB footer read must get the whole file


def _card(sizes: dict[str, int]) -> str:
    names = "".join(f"          '{i}': {name}\n" for i, name in enumerate(CIFAR10_NAMES))
    splits = "".join(f"  - name: {split}\n    num_bytes: 0\n    num_examples: {count}\n" for split, count in sizes.items())
    return (
        "---\nconfigs:\n- config_name: plain_text\n  data_files:\n"
        + "".join(f"  - split: {split}\n    path: plain_text/{split}-*\n" for split in sizes)
        + "  default: true\ndataset_info:\n  config_name: plain_text\n  features:\n  - name: img\n    dtype: image\n"
        "  - name: label\n    dtype:\n      class_label:\n        names:\n" + names + "  splits:\n" + splits
        + "---\n# CIFAR-10-shaped test data\n\nFashion-MNIST images at 32x32 RGB under CIFAR-10's names and layout.\n"
    )


def write_cifar10_like(folder: str, train: int = 96, test: int = 32, per_shard: int = 24) -> dict[str, int]:
    """Write the repo files into ``folder``; returns the split sizes. Every parquet shard stays <= 64 KiB."""
    source = load_fashion_mnist()
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CIFAR10_NAMES)})
    sizes = {"train": train, "test": test}
    os.makedirs(os.path.join(folder, "plain_text"), exist_ok=True)
    for split, count in sizes.items():
        rows = source[split].select(range(count))
        images = [image.convert("RGB").resize((32, 32)) for image in rows["image"]]
        table = datasets.Dataset.from_dict({"img": images, "label": rows["label"]}, features=features)
        shards = math.ceil(count / per_shard)
        for index in range(shards):
            path = os.path.join(folder, "plain_text", f"{split}-{index:05d}-of-{shards:05d}.parquet")
            table.shard(shards, index, contiguous=True).to_parquet(path)
            if os.path.getsize(path) > MAX_SHARD_BYTES:
                raise ValueError(f"{path} is over 64 KiB; lower per_shard")
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(_card(sizes))
    return sizes
