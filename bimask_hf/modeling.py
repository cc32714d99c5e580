"""Build an image classifier the HF Trainer can train, from a timm name or a transformers id/folder.

timm architectures go through transformers' ``TimmWrapperForImageClassification``, so every model
takes ``pixel_values`` and ``labels``, returns a ``loss``, and saves with ``save_pretrained`` in the
format that both ``timm.create_model("hf-hub:...")`` and ``AutoModelForImageClassification`` read.
"""

from __future__ import annotations

import os
from typing import Any

import timm
import torch.nn as nn
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
)

from .models import cifar as _cifar  # noqa: F401  (registers the CIFAR models with timm)

__all__ = ["create_model", "check_model_name", "model_data_config"]


def check_model_name(name_or_path: str) -> str:
    """The library a model name belongs to.

    Args:
        name_or_path (`str`): A timm architecture, or a transformers Hub id (``org/name``, ``hf-hub:...``) or
            local folder.

    Returns:
        `str`: ``"timm"`` or ``"transformers"``.

    Raises:
        ValueError: For a name that is neither, naming the fix.
    """
    if timm.is_model(name_or_path) and not os.path.isdir(name_or_path):
        return "timm"
    repo = name_or_path.removeprefix("hf-hub:")
    if os.path.isdir(repo) or ("/" in repo and not repo.startswith((".", "/", "~"))):
        return "transformers"
    raise ValueError(
        f"Unknown model {name_or_path!r}: not a timm architecture (see timm.list_models()), not an existing local "
        "folder and not a Hub id of the form 'org/name'."
    )


def model_data_config(name_or_path: str) -> str | dict[str, Any]:
    """What ``load_image_classification_data(model=...)`` takes for a model name.

    Args:
        name_or_path (`str`): A timm architecture, or a transformers folder or Hub id.

    Returns:
        `str` or `dict[str, Any]`: A timm name as it is; for a transformers folder or Hub id, the input size,
        mean and std that its config and image processor record (as far as they do).
    """
    if check_model_name(name_or_path) == "timm":
        return name_or_path
    from timm.data import resolve_data_config
    from transformers.image_processing_base import ImageProcessingMixin

    repo = name_or_path.removeprefix("hf-hub:")
    config = AutoConfig.from_pretrained(repo)
    pretrained_cfg = getattr(config, "pretrained_cfg", None)  # a timm model (TimmWrapper or timm's own format)
    if isinstance(pretrained_cfg, dict) and pretrained_cfg.get("input_size"):
        return dict(resolve_data_config(pretrained_cfg=dict(pretrained_cfg), verbose=False))
    data: dict[str, Any] = {}
    size = getattr(config, "image_size", None)
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else size
        data["input_size"] = (getattr(config, "num_channels", 3), height, width)
    try:
        processor, _ = ImageProcessingMixin.get_image_processor_dict(repo)
    except OSError:  # no preprocessor_config.json: the dataset's statistics apply
        return data
    if processor.get("image_mean") is not None and processor.get("image_std") is not None:
        data["mean"], data["std"] = tuple(processor["image_mean"]), tuple(processor["image_std"])
    return data


def _label_maps(labels: list[str] | None, num_labels: int) -> dict[str, Any]:
    names = labels or [f"LABEL_{i}" for i in range(num_labels)]
    return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def create_model(
    name_or_path: str,
    num_labels: int | None = None,
    labels: list[str] | None = None,
    in_chans: int = 3,
    pretrained: bool = False,
    model_args: dict[str, Any] | None = None,
) -> nn.Module:
    """An image-classification model with a Trainer-friendly interface.

    Args:
        name_or_path (`str`): A timm architecture (``resnet18``, ``deit_small_patch16_224``,
            ``resnet32_cifar``, ...), a ``timm/...`` or ``hf-hub:...`` id, or a transformers model id / local
            folder.
        num_labels (`int`, *optional*): Number of classes; a new head is created when it differs from the
            checkpoint's.
        labels (`list[str]`, *optional*): Class names (sets ``num_labels`` and the label maps).
        in_chans (`int`, *optional*, defaults to 3): Input channels of a timm model.
        pretrained (`bool`, *optional*, defaults to `False`): Load Hub weights where the name allows (needs
            network for Hub ids); a local folder's weights are always loaded.
        model_args (`dict[str, Any]`, *optional*): Keyword arguments of the timm model, or config overrides of
            a transformers one.

    Returns:
        `nn.Module`: A ``TimmWrapperForImageClassification`` for a timm name, else the
        ``AutoModelForImageClassification`` of the id or folder.

    Raises:
        ValueError: Without ``num_labels`` or ``labels``, or for an unknown name.
    """
    if labels is not None:
        num_labels = len(labels)
    if num_labels is None:
        raise ValueError("create_model needs num_labels or labels.")
    maps = _label_maps(labels, num_labels)
    if check_model_name(name_or_path) == "timm":
        extra = {"in_chans": in_chans, **(model_args or {})}
        if pretrained:
            config = TimmWrapperConfig.from_pretrained(f"timm/{name_or_path}", num_labels=num_labels, **maps)
            config.model_args = extra
            return TimmWrapperForImageClassification.from_pretrained(
                f"timm/{name_or_path}", config=config, ignore_mismatched_sizes=True
            )
        config = TimmWrapperConfig(architecture=name_or_path, num_labels=num_labels, model_args=extra, **maps)
        model = TimmWrapperForImageClassification(config)
        # The wrapper's post_init re-draws every conv/linear from N(0, 0.02); restore timm's own init
        # (Kaiming for CNNs, trunc-normal for ViTs) from a model timm built itself.
        native = timm.create_model(name_or_path, num_classes=num_labels, **extra)
        model.timm_model.load_state_dict(native.state_dict())
        return model
    repo = name_or_path.removeprefix("hf-hub:")
    config = AutoConfig.from_pretrained(repo, num_labels=num_labels, **maps, **(model_args or {}))
    timm_args = getattr(config, "model_args", None)
    if isinstance(timm_args, dict) and "num_classes" in timm_args:
        # timm's save_for_hf records num_classes in model_args as well; TimmWrapper passes num_labels as
        # num_classes, and the two would collide.
        config.model_args = {k: v for k, v in timm_args.items() if k != "num_classes"}
    if pretrained or os.path.isdir(repo):  # a local folder is a trained model: load its weights
        return AutoModelForImageClassification.from_pretrained(repo, config=config, ignore_mismatched_sizes=True)
    return AutoModelForImageClassification.from_config(config)
