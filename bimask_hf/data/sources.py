"""Turn a dataset name, Hub id or local folder into raw ``datasets`` splits, with clear errors."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import datasets
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .errors import DataError
from .local import fashion_mnist_available, load_digits_dataset, load_fashion_mnist
from .statistics import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD

__all__ = ["KNOWN_DATASETS", "DatasetSpec", "RawSplits", "open_source", "resolve_columns", "resolve_splits"]

AnyDataset = datasets.Dataset | datasets.IterableDataset
RawSplits = Mapping[str, AnyDataset]

# Enough shards for split_dataset_by_node to hand out whole shards to 1, 2, 3, 4, 6, 8, 12 or 24 ranks.
_LOCAL_STREAMING_SHARDS = 24
_EVAL_SPLIT_CANDIDATES = ("validation", "test", "val", "valid")


@dataclass(frozen=True)
class DatasetSpec:
    """What we know about a named dataset: where it lives, its columns, splits and pixel statistics.

    Args:
        hub_id (`str`, *optional*): Hub dataset id, None for a dataset built locally.
        image_column (`str`): Image column.
        label_column (`str`): Label column.
        train_split (`str`, *optional*, defaults to `"train"`): Training split.
        eval_split (`str`, *optional*, defaults to `"test"`): Evaluation split.
        streaming (`bool`, *optional*, defaults to `False`): Whether it streams by default.
        image_size (`int`, *optional*): Native image size.
        mean (`tuple[float, ...]`, *optional*, defaults to ImageNet's): Per-channel pixel mean.
        std (`tuple[float, ...]`, *optional*, defaults to ImageNet's): Per-channel pixel std.
    """

    hub_id: str | None
    image_column: str
    label_column: str
    train_split: str = "train"
    eval_split: str = "test"
    streaming: bool = False
    image_size: int | None = None
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD


KNOWN_DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(
        "uoft-cs/cifar10", "img", "label", image_size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD
    ),
    "cifar100": DatasetSpec(
        "uoft-cs/cifar100", "img", "fine_label", image_size=32, mean=CIFAR100_MEAN, std=CIFAR100_STD
    ),
    "imagenet-1k": DatasetSpec(
        "ILSVRC/imagenet-1k", "image", "label", eval_split="validation", streaming=True
    ),
    "fashion_mnist": DatasetSpec(
        "zalando-datasets/fashion_mnist", "image", "label", image_size=28, mean=(0.2860,), std=(0.3530,)
    ),
    "digits": DatasetSpec(None, "image", "label", image_size=8, mean=(0.3053,), std=(0.3759,)),
}
_ALIASES = {
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "imagenet1k": "imagenet-1k",
    "imagenet": "imagenet-1k",
    "fashionmnist": "fashion_mnist",
    "digits": "digits",
}


def _canonical_name(name: str) -> str | None:
    return _ALIASES.get(name.lower().replace("-", "").replace("_", ""))


def _looks_local(name: str) -> bool:
    """A path the user meant as local: explicit prefixes, or a first component that exists here."""
    if name.startswith(("/", "./", "../", "~")) or name.endswith(os.sep):
        return True
    first = Path(name).parts[0] if Path(name).parts else ""
    return os.path.exists(name) or (os.sep in name and os.path.isdir(first))


def _load_hub(dataset_id: str, *, streaming: bool, cache_dir: str | None) -> RawSplits:
    try:
        return datasets.load_dataset(dataset_id, streaming=streaming, cache_dir=cache_dir)
    except Exception as err:  # network, auth, missing repo: all surface here with varied types
        raise DataError(
            f"Could not fetch the dataset {dataset_id!r} from the Hugging Face Hub ({type(err).__name__}: {err}). "
            "Check the id and your connection, or point to a local copy instead: a folder with train/ and "
            "val/ sub-folders of class folders, or a cached dataset used with HF_DATASETS_OFFLINE=1."
        ) from err


def _load_image_folder(path: Path, *, streaming: bool, cache_dir: str | None) -> RawSplits:
    if not path.exists():
        raise DataError(
            f"Local dataset path {str(path)!r} does not exist. Pass an existing folder with train/ and val/ "
            "(or validation/, test/) sub-folders of class folders, a Hub dataset id, or a known name."
        )
    if not path.is_dir():
        raise DataError(f"{str(path)!r} is a file; pass a folder with train/ and val/ sub-folders instead.")
    if not (path / "train").is_dir():
        found = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise DataError(
            f"Local dataset folder {str(path)!r} has no train/ sub-folder (found: {found or 'no folders'}). "
            "Lay it out as train/<class>/<image> plus val/<class>/<image> (or validation/, test/)."
        )
    return datasets.load_dataset("imagefolder", data_dir=str(path), streaming=streaming, cache_dir=cache_dir)


def _as_streaming(splits: RawSplits) -> RawSplits:
    return {
        split: ds.to_iterable_dataset(num_shards=max(1, min(_LOCAL_STREAMING_SHARDS, len(ds))))
        for split, ds in splits.items()
    }


def open_source(
    name_or_path: str, *, streaming: bool | None, cache_dir: str | None = None
) -> tuple[RawSplits, DatasetSpec | None]:
    """Load the raw splits behind ``name_or_path`` and the known spec of that dataset, if any.

    Args:
        name_or_path (`str`): A known name (``cifar10``, ``cifar100``, ``imagenet-1k``, ``fashion_mnist``,
            ``digits``), a Hub dataset id (``owner/name``) or a local image folder.
        streaming (`bool`, *optional*): Return ``IterableDataset`` splits; None uses the dataset's default
            (only ImageNet-1k streams by default).
        cache_dir (`str`, *optional*): ``datasets`` cache folder for Hub and image-folder datasets.

    Returns:
        `tuple[Mapping[str, Dataset | IterableDataset], DatasetSpec | None]`: The splits by name, and the
        spec (None for a dataset not in :data:`KNOWN_DATASETS`).

    Raises:
        DataError: For a name that is none of these.
    """
    canonical = _canonical_name(name_or_path)
    spec = KNOWN_DATASETS.get(canonical) if canonical else None
    if spec is None:  # a Hub id of a known dataset keeps its columns and statistics
        spec = next((s for s in KNOWN_DATASETS.values() if s.hub_id == name_or_path), None)
    stream = spec.streaming if streaming is None and spec is not None else bool(streaming)

    if canonical == "digits" or (canonical == "fashion_mnist" and fashion_mnist_available()):
        local = load_digits_dataset() if canonical == "digits" else load_fashion_mnist()
        return (_as_streaming(local) if stream else local), spec
    if canonical is not None:
        assert spec is not None and spec.hub_id is not None
        return _load_hub(spec.hub_id, streaming=stream, cache_dir=cache_dir), spec
    if _looks_local(name_or_path):
        return _load_image_folder(
            Path(name_or_path).expanduser(), streaming=stream, cache_dir=cache_dir
        ), spec
    if "/" in name_or_path:
        return _load_hub(name_or_path, streaming=stream, cache_dir=cache_dir), spec
    known = ", ".join(sorted(KNOWN_DATASETS))
    raise DataError(
        f"Unknown dataset {name_or_path!r}. Known names: {known}. A Hugging Face Hub dataset id "
        "('owner/name') or a local folder with train/ and val/ sub-folders works too."
    )


def resolve_splits(
    splits: RawSplits, spec: DatasetSpec | None, train_split: str | None, eval_split: str | None
) -> tuple[str, str | None]:
    """Pick the train and eval split names.

    Args:
        splits (`Mapping[str, Dataset | IterableDataset]`): The available splits.
        spec (`DatasetSpec`, *optional*): The dataset's known spec.
        train_split (`str`, *optional*): Explicit training split (default: the spec's, else ``"train"``).
        eval_split (`str`, *optional*): Explicit evaluation split (``val`` and ``validation`` are accepted for
            each other); by default the spec's, else the first of ``validation``, ``test``, ``val``,
            ``valid``.

    Returns:
        `tuple[str, str | None]`: The training split and the evaluation split (None when the dataset has
        none).

    Raises:
        DataError: If an explicit split does not exist.
    """
    available = list(splits)
    train = train_split or (spec.train_split if spec else "train")
    if train not in splits:
        raise DataError(f"No split {train!r}; available splits: {available}. Choose one with train_split=.")
    if eval_split is not None:
        # datasets names an ImageFolder's val/ folder "validation"; accept either spelling
        aliases = {"val": "validation", "validation": "val", "valid": "validation"}
        if eval_split not in splits and aliases.get(eval_split) in splits:
            eval_split = aliases[eval_split]
        if eval_split not in splits:
            raise DataError(
                f"No split {eval_split!r}; available splits: {available}. Choose one with eval_split=."
            )
        return train, eval_split
    candidates = ((spec.eval_split,) if spec else ()) + _EVAL_SPLIT_CANDIDATES
    return train, next((s for s in candidates if s in splits and s != train), None)


def resolve_columns(
    features: datasets.Features | None,
    spec: DatasetSpec | None,
    image_column: str | None,
    label_column: str | None,
) -> tuple[str, str]:
    """Pick the image and label columns: explicit names, the known spec, else the first Image/ClassLabel.

    Args:
        features (`datasets.Features`, *optional*): The dataset's features.
        spec (`DatasetSpec`, *optional*): The dataset's known spec.
        image_column (`str`, *optional*): Explicit image column.
        label_column (`str`, *optional*): Explicit label column.

    Returns:
        `tuple[str, str]`: The image and label column names.

    Raises:
        DataError: If the features are unknown, or a column is not found.
    """
    if features is None:
        raise DataError(
            "The dataset does not declare its features, so its columns cannot be checked; "
            "load it with streaming=False or pass a dataset whose card lists its features."
        )
    columns = list(features)

    def pick(explicit: str | None, known: str | None, feature_type: type, what: str, argument: str) -> str:
        if explicit is not None:
            if explicit not in features:
                raise DataError(
                    f"{what.capitalize()} column {explicit!r} not found; available columns: {columns}. "
                    f"Set it with {argument}=."
                )
            return explicit
        if known is not None and known in features:
            return known
        found = next((name for name, feat in features.items() if isinstance(feat, feature_type)), None)
        if found is None:
            raise DataError(
                f"No {what} column found (looked for a datasets.{feature_type.__name__} feature); "
                f"available columns: {columns}. Set it with {argument}=."
            )
        return found

    image = pick(image_column, spec.image_column if spec else None, datasets.Image, "image", "image_column")
    label = pick(
        label_column, spec.label_column if spec else None, datasets.ClassLabel, "label", "label_column"
    )
    return image, label
