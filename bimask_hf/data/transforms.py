"""Training recipes as image transforms (timm / torchvision), the batch collator and Mixup/CutMix."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import Mixup, create_transform
from timm.data import auto_augment as timm_auto_augment
from timm.data.auto_augment import auto_augment_transform, rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybeToTensor, str_to_interp_mode
from torchvision import transforms as T

from .errors import DataError

__all__ = [
    "RECIPES",
    "ApplyImageTransform",
    "ConvertImageMode",
    "RecipeSettings",
    "build_mixup",
    "build_transforms",
    "collate_image_batch",
    "match_channels",
    "resolve_settings",
]

RECIPES = ("default", "cifar", "imagenet", "deit")
ImageTransform = Callable[[Any], torch.Tensor]


@dataclass(frozen=True)
class RecipeSettings:
    """Augmentation settings; ``None`` fields take the recipe's default (see :data:`RECIPE_DEFAULTS`).

    Args:
        auto_augment (`str`, *optional*): timm auto-augment policy string (``""``: none).
        re_prob (`float`, *optional*): Random-erasing probability.
        mixup_alpha (`float`, *optional*): Mixup alpha (0: off).
        cutmix_alpha (`float`, *optional*): CutMix alpha (0: off).
        label_smoothing (`float`, *optional*): Label smoothing of the Mixup/CutMix soft targets.
    """

    auto_augment: str | None = None
    re_prob: float | None = None
    mixup_alpha: float | None = None
    cutmix_alpha: float | None = None
    label_smoothing: float | None = None


# DeiT (Touvron et al. 2021): RandAugment m9, random erasing 0.25, Mixup 0.8 / CutMix 1.0, smoothing 0.1.
RECIPE_DEFAULTS: dict[str, RecipeSettings] = {
    "default": RecipeSettings("", 0.0, 0.0, 0.0, 0.0),
    "cifar": RecipeSettings("", 0.0, 0.0, 0.0, 0.0),
    "imagenet": RecipeSettings("", 0.0, 0.0, 0.0, 0.0),
    "deit": RecipeSettings("rand-m9-mstd0.5-inc1", 0.25, 0.8, 1.0, 0.1),
}


def resolve_settings(recipe: str, overrides: RecipeSettings) -> RecipeSettings:
    """Fill the ``None`` fields of ``overrides`` from the recipe's defaults.

    Args:
        recipe (`str`): One of :data:`RECIPES`.
        overrides (`RecipeSettings`): The settings given; ``None`` fields are not set.

    Returns:
        `RecipeSettings`: Every field set.

    Raises:
        DataError: For an unknown recipe.
    """
    if recipe not in RECIPES:
        raise DataError(f"Unknown recipe {recipe!r}; choose one of {list(RECIPES)}.")
    chosen = {
        f.name: getattr(overrides, f.name)
        for f in fields(overrides)
        if getattr(overrides, f.name) is not None
    }
    return replace(RECIPE_DEFAULTS[recipe], **chosen)


class ConvertImageMode:
    """Convert an image (PIL or array) to a PIL image of ``mode``.

    ``"RGB"`` for 3-channel models, ``"L"`` for 1-channel ones.

    Args:
        mode (`str`): The PIL mode.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, image: Any) -> Image.Image:
        """Return ``image`` as a PIL image in this mode (unchanged if it already is)."""
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        return image if image.mode == self.mode else image.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r})"


class ApplyImageTransform:
    """Map raw ``{"pixel_values": image, "labels": int}`` examples to tensors.

    Works on a batch of lists (``Dataset.with_transform``) and on one example
    (``IterableDataset.map``). A class rather than a closure so DataLoader workers can pickle it.

    Args:
        image_transform (`Callable`): Image to ``(C, H, W)`` tensor.
    """

    def __init__(self, image_transform: ImageTransform) -> None:
        self.image_transform = image_transform

    def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
        """Transform the ``pixel_values`` of one example or of a batch of examples."""
        images = example["pixel_values"]
        if isinstance(images, list):
            pixel_values: Any = [self.image_transform(image) for image in images]
        else:
            pixel_values = self.image_transform(images)
        return {"pixel_values": pixel_values, "labels": example["labels"]}


def collate_image_batch(examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack examples into a batch.

    Args:
        examples (`Sequence[dict[str, Any]]`): Examples with ``pixel_values`` and ``labels``.

    Returns:
        `dict[str, torch.Tensor]`: ``{"pixel_values": (B, C, H, W) float, "labels": (B,) long}``.
    """
    return {
        "pixel_values": torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples]),
        "labels": torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long),
    }


def match_channels(stats: Sequence[float], in_chans: int) -> tuple[float, ...]:
    """Adapt per-channel mean/std to ``in_chans`` (average 3 to 1, repeat 1 to 3).

    Args:
        stats (`Sequence[float]`): Per-channel mean or std.
        in_chans (`int`): Channels the model takes.

    Returns:
        `tuple[float, ...]`: One value per channel.

    Raises:
        DataError: If the statistics cannot be adapted.
    """
    stats = tuple(float(s) for s in stats)
    if len(stats) == in_chans:
        return stats
    if len(stats) == 1:
        return stats * in_chans
    if in_chans == 1:
        return (sum(stats) / len(stats),)
    raise DataError(
        f"Cannot adapt {len(stats)}-channel mean/std to in_chans={in_chans}; pass mean= and std=."
    )


def posterize(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize, keeping 0 bits as a black image (what Pillow did before it refused ``bits=0``).

    RandAugment's increasing posterize keeps ``4 - int(magnitude / 10 * 4)`` bits, so 0 at magnitude 10,
    which ``rand-m9-mstd0.5`` draws for about 2% of its posterize calls.
    """
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return timm_auto_augment.posterize(img, bits_to_keep, **kwargs)


def _auto_augment_op(config: str, size: int, mean: Sequence[float]) -> Callable[[Image.Image], Image.Image]:
    hparams = dict(translate_const=int(size * 0.45), img_mean=tuple(round(255 * m) for m in mean))
    return _keep_zero_bit_posterize((rand_augment_transform if config.startswith("rand") else auto_augment_transform)(
        config, hparams))


def _keep_zero_bit_posterize(transform: Any) -> Any:
    """``transform`` (a timm RandAugment / AutoAugment, or a ``Compose`` holding one) with :func:`posterize`."""
    for inner in getattr(transform, "transforms", []):
        _keep_zero_bit_posterize(inner)
    ops = getattr(transform, "ops", None) or [op for sub in getattr(transform, "policy", []) for op in sub]
    for op in ops:
        if getattr(op, "aug_fn", None) is timm_auto_augment.posterize:
            op.aug_fn = posterize
    return transform


def build_transforms(
    recipe: str,
    *,
    image_size: tuple[int, int],
    in_chans: int,
    mean: Sequence[float],
    std: Sequence[float],
    settings: RecipeSettings,
    interpolation: str = "bilinear",
    crop_pct: float | None = None,
    crop_mode: str | None = None,
) -> tuple[ImageTransform, ImageTransform]:
    """Build ``(train_transform, eval_transform)`` from PIL images to normalised ``(C, H, W)`` tensors.

    * ``default``: resize to ``image_size`` and normalise (no augmentation unless asked for).
    * ``cifar``: random crop with 4-pixel zero padding and horizontal flip (He et al.).
    * ``imagenet``: random-resized crop and flip.
    * ``deit``: timm's ``create_transform`` with RandAugment and random erasing.

    The evaluation transform of every recipe is timm's (``create_transform(is_training=False)``) with
    ``crop_pct`` / ``crop_mode``: ``1.0`` / ``"squash"`` is a plain resize to ``image_size`` (the default of
    ``default`` and ``cifar``), ``"center"`` resizes the short side to ``size / crop_pct`` and centre-crops
    (the default of ``imagenet`` and ``deit``, with ``crop_pct=0.875``). A saved folder's ``pretrained_cfg``
    describes the same transform, so transformers' image processors reproduce it.

    Args:
        recipe (`str`): One of :data:`RECIPES`.
        image_size (`tuple[int, int]`): Output height and width.
        in_chans (`int`): 1 or 3.
        mean (`Sequence[float]`): Normalisation mean (adapted with :func:`match_channels`).
        std (`Sequence[float]`): Normalisation std (adapted with :func:`match_channels`).
        settings (`RecipeSettings`): Resolved settings; ``auto_augment`` / ``re_prob`` add RandAugment /
            random erasing to any recipe.
        interpolation (`str`, *optional*, defaults to `"bilinear"`): Resize interpolation.
        crop_pct (`float`, *optional*): Evaluation crop share (default per recipe, see above).
        crop_mode (`str`, *optional*): Evaluation crop mode (default per recipe, see above).

    Returns:
        `tuple[Callable, Callable]`: The training and evaluation transforms.

    Raises:
        DataError: If ``in_chans`` is not 1 or 3.
    """
    if in_chans not in (1, 3):
        raise DataError(f"in_chans={in_chans} is not supported; images are loaded as RGB (3) or L (1).")
    mean, std = match_channels(mean, in_chans), match_channels(std, in_chans)
    convert = ConvertImageMode("RGB" if in_chans == 3 else "L")
    auto_augment = settings.auto_augment or None
    re_prob = settings.re_prob or 0.0

    plain = recipe in ("default", "cifar")
    crop_pct = crop_pct if crop_pct is not None else (1.0 if plain else 0.875)
    crop_mode = crop_mode or ("squash" if plain else "center")
    evaluation = T.Compose([
        convert,
        create_transform(
            input_size=image_size, interpolation=interpolation, mean=mean, std=std, is_training=False,
            crop_pct=crop_pct, crop_mode=crop_mode,
        ),
    ])
    if recipe in ("imagenet", "deit"):
        common = dict(input_size=image_size, interpolation=interpolation, mean=mean, std=std)
        train = _keep_zero_bit_posterize(create_transform(
            is_training=True,
            color_jitter=0.0 if recipe == "imagenet" else 0.4,
            auto_augment=auto_augment,
            re_prob=re_prob,
            re_mode="pixel",
            **common,
        ))
        return T.Compose([convert, train]), evaluation

    resize = T.Resize(image_size, interpolation=str_to_interp_mode(interpolation))
    to_tensor = [MaybeToTensor(), T.Normalize(mean, std)]
    augment: list[Any] = []
    if recipe == "cifar":
        augment = [T.RandomCrop(image_size, padding=4), T.RandomHorizontalFlip()]
    if auto_augment:
        augment.append(_auto_augment_op(auto_augment, min(image_size), mean))
    erase = [RandomErasing(re_prob, mode="pixel", device="cpu")] if re_prob > 0 else []
    train = T.Compose([convert, resize, *augment, *to_tensor, *erase])
    return train, evaluation


def build_mixup(settings: RecipeSettings, num_classes: int) -> Mixup | None:
    """timm ``Mixup`` for batches when Mixup or CutMix is on.

    It mixes a ``(B, C, H, W)`` batch and turns the ``(B,)`` labels into ``(B, num_classes)`` soft targets
    (with ``label_smoothing``); the batch size must be even.

    Args:
        settings (`RecipeSettings`): Resolved settings.
        num_classes (`int`): Number of classes.

    Returns:
        `timm.data.Mixup` or `None`: The mixer, or None when both alphas are 0.
    """
    if not (settings.mixup_alpha or settings.cutmix_alpha):
        return None
    return Mixup(
        mixup_alpha=settings.mixup_alpha or 0.0,
        cutmix_alpha=settings.cutmix_alpha or 0.0,
        label_smoothing=settings.label_smoothing or 0.0,
        num_classes=num_classes,
    )
