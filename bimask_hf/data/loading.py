"""``load_image_classification_data``: one call from a dataset name to Trainer-ready datasets."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import timm
import torch
from datasets.distributed import split_dataset_by_node
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, resolve_data_config
from torch import nn

from .errors import DataError
from .sources import AnyDataset, DatasetSpec, open_source, resolve_columns, resolve_splits
from .statistics import CIFAR10_MEAN, CIFAR10_STD
from .transforms import (
    ApplyImageTransform,
    ImageTransform,
    RecipeSettings,
    build_mixup,
    build_transforms,
    collate_image_batch,
    match_channels,
    resolve_settings,
)

__all__ = ["ImageClassificationData", "load_image_classification_data"]

_RECIPE_IMAGE_SIZE = {"cifar": 32, "imagenet": 224, "deit": 224}


@dataclass
class ImageClassificationData:
    """Datasets and helpers for image classification with the HF ``Trainer``.

    ``data_config`` is the evaluation preprocessing (timm's keys: ``input_size``, ``mean``, ``std``,
    ``interpolation``, ``crop_pct``, ``crop_mode``); pass it to ``BiMaskTrainer(data_config=...)`` or
    ``save_sparse_model(data_config=...)`` so the saved folder records it. ``eval_split`` names the split
    ``eval_dataset`` came from.

    Examples come out as ``{"pixel_values": float tensor (C, H, W), "labels": int}``; ``collate_fn`` stacks
    them into a batch. Map-style datasets are not split across ranks (the Trainer's sampler does that);
    streaming ones are, see :func:`load_image_classification_data`.

    Args:
        train_dataset (`datasets.Dataset` or `datasets.IterableDataset`): The training split, transformed.
        eval_dataset (`datasets.Dataset` or `datasets.IterableDataset`, *optional*): The evaluation split,
            None when the dataset has none.
        labels (`list[str]`): Class names, by class index.
        train_transform (`Callable`): Image to tensor, with the recipe's augmentation.
        eval_transform (`Callable`): Image to tensor, for evaluation.
        collate_fn (`Callable`, *optional*, defaults to `collate_image_batch`): Stacks examples into a batch.
        mixup_fn (`timm.data.Mixup`, *optional*): Mixup/CutMix for whole batches, None when off.
        data_config (`dict[str, Any]`, *optional*): The evaluation preprocessing (see above).
        eval_split (`str`, *optional*): The name of the split ``eval_dataset`` came from.
    """

    train_dataset: AnyDataset
    eval_dataset: AnyDataset | None
    labels: list[str]
    train_transform: ImageTransform
    eval_transform: ImageTransform
    collate_fn: Callable[[Sequence[dict[str, Any]]], dict[str, torch.Tensor]] = collate_image_batch
    mixup_fn: Mixup | None = None
    data_config: dict[str, Any] = field(default_factory=dict)
    eval_split: str | None = None

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.labels)

    @property
    def id2label(self) -> dict[int, str]:
        """Class index to name, as ``PretrainedConfig(id2label=...)`` wants it."""
        return dict(enumerate(self.labels))

    @property
    def label2id(self) -> dict[str, int]:
        """Class name to index."""
        return {name: idx for idx, name in enumerate(self.labels)}


def _model_data_config(model: nn.Module | Mapping[str, Any] | str | None) -> dict[str, Any]:
    """Input size / mean / std / interpolation / crop_pct the model expects, as far as it says."""
    if model is None:
        return {}
    if isinstance(model, Mapping):
        return dict(model)
    if isinstance(model, str):
        pretrained_cfg = timm.models.get_pretrained_cfg(model)
        if pretrained_cfg is None:
            raise DataError(f"Unknown timm model {model!r}; pass the model itself or a data config dict.")
        return resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict())
    timm_model = getattr(model, "timm_model", model)  # transformers' TimmWrapper* nests the timm model
    if getattr(timm_model, "pretrained_cfg", None) is not None:
        # A TimmWrapper builds its timm model from the architecture's defaults; the preprocessing a saved
        # folder records is the wrapper config's pretrained_cfg (what TimmWrapperImageProcessor reads).
        saved_cfg = getattr(getattr(model, "config", None), "pretrained_cfg", None)
        if timm_model is not model and isinstance(saved_cfg, Mapping) and saved_cfg.get("input_size"):
            return dict(resolve_data_config(pretrained_cfg=dict(saved_cfg), verbose=False))
        config = resolve_data_config(model=timm_model)
        # resolve_data_config reports the cfg's 3 channels even for an in_chans=1 model: ask the stem.
        stem = dict(timm_model.named_modules()).get(timm_model.pretrained_cfg.get("first_conv") or "")
        if isinstance(stem, nn.Conv2d):
            config["input_size"] = (stem.in_channels, *config["input_size"][1:])
        return config
    config = getattr(model, "config", None)  # other transformers vision models
    size = getattr(config, "image_size", None)
    if size is None:
        return {}
    height, width = (size, size) if isinstance(size, int) else size
    return {"input_size": (getattr(config, "num_channels", 3), height, width)}


def _default_rank_world_size() -> tuple[int, int]:
    # accelerate's PartialState initialises torch.distributed whenever it runs more than one process.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _label_names(dataset: AnyDataset, label_column: str) -> list[str]:
    feature = dataset.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    is_int = isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))
    if is_int and isinstance(dataset, datasets.Dataset):
        return [str(i) for i in range(int(max(dataset.unique(label_column))) + 1)]
    raise DataError(
        f"Label column {label_column!r} is {feature}, not a datasets.ClassLabel, so the classes are unknown. "
        "Cast it first (dataset.cast_column(..., ClassLabel(names=...))) or pick another with label_column=."
    )


def _prepare_split(
    dataset: AnyDataset,
    *,
    image_column: str,
    label_column: str,
    transform: ImageTransform,
    is_train: bool,
    max_samples: int | None,
    shuffle_buffer: int,
    seed: int,
    rank: int,
    world_size: int,
) -> AnyDataset:
    dataset = dataset.select_columns([image_column, label_column])
    # Raw columns take the names the model's forward takes, so the Trainer's remove_unused_columns
    # keeps them and the lazy transform still finds its input.
    renames = {
        old: new for old, new in ((image_column, "pixel_values"), (label_column, "labels")) if old != new
    }
    if renames:
        dataset = dataset.rename_columns(renames)
    apply = ApplyImageTransform(transform)
    if isinstance(dataset, datasets.Dataset):
        if max_samples is not None and max_samples < len(dataset):
            # Shuffle first: image folders are sorted by class, so the head would hold few classes.
            dataset = dataset.shuffle(seed=seed).select(range(max_samples))
        return dataset.with_transform(apply)
    if is_train:
        dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer)
    if max_samples is not None:
        dataset = dataset.take(max_samples)
    if world_size > 1 and is_train:
        # Each rank reads and decodes only its share. Evaluation streams stay whole: the Trainer's
        # evaluation gathers every batch from all ranks, so the ranks must see equal batch counts,
        # which Accelerate ensures by dispatching them from rank 0.
        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    return dataset.map(apply)


def _image_size(
    image_size: int | Sequence[int] | None,
    data_config: Mapping[str, Any],
    recipe: str,
    spec: DatasetSpec | None,
) -> tuple[int, int]:
    if image_size is None:
        if "input_size" in data_config:
            return tuple(data_config["input_size"][-2:])  # type: ignore[return-value]
        image_size = _RECIPE_IMAGE_SIZE.get(recipe) or (spec.image_size if spec else None) or 224
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)


def load_image_classification_data(
    name_or_path: str,
    *,
    model: nn.Module | Mapping[str, Any] | str | None = None,
    streaming: bool | None = None,
    train_split: str | None = None,
    eval_split: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    recipe: str = "default",
    image_size: int | Sequence[int] | None = None,
    in_chans: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    auto_augment: str | None = None,
    re_prob: float | None = None,
    mixup_alpha: float | None = None,
    cutmix_alpha: float | None = None,
    label_smoothing: float | None = None,
    crop_pct: float | None = None,
    crop_mode: str | None = None,
    shuffle_buffer: int = 10_000,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    cache_dir: str | None = None,
) -> ImageClassificationData:
    """Load an image-classification dataset with the transforms of a training recipe.

    Args:
        name_or_path: ``cifar10`` / ``cifar100`` (Hub ``uoft-cs/...``), ``imagenet-1k`` (Hub
            ``ILSVRC/imagenet-1k``, streams by default), ``fashion_mnist`` (Debian's local files when
            installed, else the Hub), ``digits`` (scikit-learn, 8x8), any Hub dataset id ``owner/name``, or a
            local folder with ``train/`` and ``val/`` (or ``validation/``, ``test/``) of class sub-folders.
        model: a timm model, a transformers ``TimmWrapper*`` model, a timm model name, or a timm data
            config dict; its input size, mean/std, interpolation and crop_pct are used.
        streaming: return ``datasets.IterableDataset`` splits; ``None`` takes the dataset's default.
        train_split: training split name; by default the known one, else ``train``.
        eval_split: evaluation split name; by default the first of the known eval split, ``validation``,
            ``test``, ``val``. ``eval_dataset`` is ``None`` if there is none.
        image_column: image column; by default the known one, else the first ``datasets.Image`` feature.
        label_column: label column; by default the known one, else the first ``datasets.ClassLabel``
            feature.
        recipe: ``default`` (resize + normalise), ``cifar`` (pad-4 random crop + flip), ``imagenet``
            (random-resized crop + flip; eval resize and centre crop), ``deit`` (RandAugment, random
            erasing 0.25, Mixup 0.8 / CutMix 1.0 with label smoothing 0.1).
        image_size: output size; by default the model's, else 32 (``cifar``), 224 (``imagenet``/``deit``)
            or the dataset's native size (``default``).
        in_chans: 3 converts every image to RGB (grayscale is replicated), 1 to grayscale; by default
            the model's input channels, else 3.
        mean: normalisation mean; by default the model's, else the dataset's, else ImageNet's (CIFAR-10's
            for the ``cifar`` recipe).
        std: normalisation std, chosen as ``mean``.
        auto_augment: timm auto-augment policy, overriding the recipe's (``""`` turns it off).
        re_prob: random-erasing probability, overriding the recipe's (``0`` turns it off).
        mixup_alpha: Mixup alpha, overriding the recipe's (``0`` turns it off). Mixup and CutMix are
            returned as ``mixup_fn`` to apply to whole batches.
        cutmix_alpha: CutMix alpha, overriding the recipe's (``0`` turns it off).
        label_smoothing: label smoothing of the Mixup/CutMix targets, overriding the recipe's.
        crop_pct: the evaluation crop share (timm's meaning: resize to ``size / crop_pct``, then crop);
            by default ``1.0`` for ``default`` and ``cifar``, the model's (else ``0.875``) for ``imagenet``
            and ``deit``. ``data_config`` of the result records what was used.
        crop_mode: ``"center"``, or ``"squash"`` to the exact size; by default ``"squash"`` (with
            ``crop_pct=1.0``, a plain resize) for ``default`` and ``cifar``, the model's (else
            ``"center"``) for ``imagenet`` and ``deit``.
        shuffle_buffer: shuffle buffer of the streaming train split (map-style datasets are shuffled by
            the DataLoader sampler instead).
        seed: seed of the streaming shuffle and of the ``max_*_samples`` subsets; must match on all ranks.
        rank: this process's rank: the streaming training split is sharded with
            ``datasets.distributed.split_dataset_by_node`` (each rank reads and decodes its share; the
            shuffle buffer and ``set_epoch`` reseeding then work per rank); by default from
            ``torch.distributed`` when initialised (``accelerate`` does so), else no split. `BiMaskTrainer`
            feeds such a split dataset to each rank as it is; a plain ``Trainer`` would split it again, so
            pass ``world_size=1`` there. The streaming evaluation split is never split (see above).
        world_size: the number of ranks, as ``rank``.
        max_train_samples: keep a random subset (map-style) or the first ``n`` examples after the shuffle
            (streaming) of the training split.
        max_eval_samples: the same for the evaluation split.
        cache_dir: ``datasets`` cache folder for Hub and image-folder datasets.

    Returns:
        `ImageClassificationData`: The datasets, labels, transforms, collator, Mixup and ``data_config``.

    Raises:
        DataError: unknown name, missing local path or ``train/`` folder, missing split or column,
            unreachable Hub, unknown recipe.
    """
    overrides = RecipeSettings(auto_augment, re_prob, mixup_alpha, cutmix_alpha, label_smoothing)
    settings = resolve_settings(recipe, overrides)
    data_config = _model_data_config(model)
    splits, spec = open_source(name_or_path, streaming=streaming, cache_dir=cache_dir)
    train_name, eval_name = resolve_splits(splits, spec, train_split, eval_split)
    train_raw = splits[train_name]
    image_column, label_column = resolve_columns(train_raw.features, spec, image_column, label_column)
    labels = _label_names(train_raw, label_column)

    size = _image_size(image_size, data_config, recipe, spec)
    if in_chans is None:
        in_chans = int(data_config["input_size"][0]) if "input_size" in data_config else 3
    fallback_mean, fallback_std = (
        (CIFAR10_MEAN, CIFAR10_STD) if recipe == "cifar" else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    )
    if mean is None:
        mean = data_config.get("mean") or (spec.mean if spec else fallback_mean)
    if std is None:
        std = data_config.get("std") or (spec.std if spec else fallback_std)
    mean, std = match_channels(mean, in_chans), match_channels(std, in_chans)
    interpolation = data_config.get("interpolation") or ("bicubic" if recipe == "deit" else "bilinear")
    if recipe in ("default", "cifar"):
        crop_pct = 1.0 if crop_pct is None else crop_pct
        crop_mode = crop_mode or "squash"
    else:
        crop_pct = crop_pct or data_config.get("crop_pct") or 0.875
        crop_mode = crop_mode or data_config.get("crop_mode") or "center"
    train_transform, eval_transform = build_transforms(
        recipe,
        image_size=size,
        in_chans=in_chans,
        mean=mean,
        std=std,
        settings=settings,
        interpolation=interpolation,
        crop_pct=crop_pct,
        crop_mode=crop_mode,
    )

    default_rank, default_world_size = _default_rank_world_size()
    common = dict(
        image_column=image_column,
        label_column=label_column,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        rank=default_rank if rank is None else rank,
        world_size=default_world_size if world_size is None else world_size,
    )
    train_dataset = _prepare_split(
        train_raw, transform=train_transform, is_train=True, max_samples=max_train_samples, **common
    )
    eval_dataset = None
    if eval_name is not None:
        eval_dataset = _prepare_split(
            splits[eval_name],
            transform=eval_transform,
            is_train=False,
            max_samples=max_eval_samples,
            **common,
        )
    return ImageClassificationData(
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        labels=labels,
        train_transform=train_transform,
        eval_transform=eval_transform,
        mixup_fn=build_mixup(settings, len(labels)),
        data_config=dict(
            input_size=(in_chans, *size),
            mean=tuple(mean),
            std=tuple(std),
            interpolation=interpolation,
            crop_pct=crop_pct,
            crop_mode=crop_mode,
        ),
        eval_split=eval_name,
    )
