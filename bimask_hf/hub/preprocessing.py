"""The preprocessing a model was trained with, written into and read back from its saved folder.

A data config is timm's dict: ``input_size`` ``(C, H, W)``, ``mean``, ``std``, ``interpolation``,
``crop_pct`` and ``crop_mode`` of the evaluation transform (``load_image_classification_data`` returns
the one it used as ``ImageClassificationData.data_config``). timm and TimmWrapper folders keep it as the
``pretrained_cfg`` of ``config.json`` (read by ``timm.data.resolve_data_config`` and transformers'
``TimmWrapperImageProcessor``); other transformers models get a ``preprocessor_config.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import torch.nn as nn

from ..families import is_timm_wrapper
from .files import MODEL_CONFIG_NAME, read_json

logger = logging.getLogger(__name__)

__all__ = ["PREPROCESSOR_NAME", "DATA_CONFIG_KEYS", "write_preprocessing", "read_preprocessing", "pipeline_loads"]

PREPROCESSOR_NAME = "preprocessor_config.json"
DATA_CONFIG_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1, "box": 4, "hamming": 5}


def _clean(data_config: Mapping[str, Any]) -> dict[str, Any]:
    missing = [k for k in ("input_size", "mean", "std") if data_config.get(k) is None]
    if missing:
        raise ValueError(f"data_config lacks {missing}; pass the data_config of load_image_classification_data.")
    config = {k: data_config[k] for k in DATA_CONFIG_KEYS if data_config.get(k) is not None}
    config["input_size"] = [int(v) for v in config["input_size"]]
    channels = config["input_size"][0]
    for key in ("mean", "std"):
        config[key] = [float(v) for v in config[key]]
        if len(config[key]) != channels:
            raise ValueError(f"data_config {key} {config[key]} does not have {channels} values (input_size).")
    config.setdefault("interpolation", "bilinear")
    config.setdefault("crop_pct", 1.0)
    config.setdefault("crop_mode", "center")
    return config


def _update_timm_config(folder: str, data_config: dict[str, Any]) -> None:
    from ..models.image_processor import IMAGE_PROCESSOR_TYPE

    path = os.path.join(folder, MODEL_CONFIG_NAME)
    config = read_json(path, "Model config")
    pretrained_cfg = dict(config.get("pretrained_cfg") or {})
    if list(pretrained_cfg.get("input_size") or [])[1:] != data_config["input_size"][1:]:
        pretrained_cfg["pool_size"] = None  # as timm's own export does for a new input size
    pretrained_cfg.update(data_config)
    pretrained_cfg.pop("test_input_size", None)  # the training preprocessing is also the test one
    pretrained_cfg.pop("test_crop_pct", None)
    config["pretrained_cfg"] = pretrained_cfg
    if data_config["input_size"][0] != 3:
        # The pipeline hands over RGB images; this processor converts them to the model's channels.
        config["image_processor_type"] = IMAGE_PROCESSOR_TYPE
    else:
        config.pop("image_processor_type", None)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def _write_image_processor(model: nn.Module, folder: str, data_config: dict[str, Any]) -> None:
    """``preprocessor_config.json`` with the image processor of the model's type, set to ``data_config``.

    transformers' image processors hand over RGB images; a model taking other than 3 channels gets
    bimask-hf's ``BiMaskImageProcessor`` (timm's evaluation transform after converting the image to the
    model's channels), which ``import bimask_hf`` registers.
    """
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    channels, height, width = data_config["input_size"]
    if channels != 3:  # timm's transform (any crop mode) after converting to the model's channels
        from ..models.image_processor import IMAGE_PROCESSOR_TYPE

        processor = {"image_processor_type": IMAGE_PROCESSOR_TYPE, "pretrained_cfg": data_config}
        with open(os.path.join(folder, PREPROCESSOR_NAME), "w", encoding="utf-8") as f:
            json.dump(processor, f, indent=2)
            f.write("\n")
        return
    crop_pct, crop_mode = data_config["crop_pct"], data_config["crop_mode"]
    if crop_mode not in ("center", "squash") or (crop_mode == "center" and height != width):
        raise ValueError(
            f"crop_mode={crop_mode!r} with input_size {data_config['input_size']} cannot be written as a "
            "transformers image processor (it resizes the short side or both sides, then centre-crops); use "
            "crop_mode 'center' with a square image size, or 'squash', for this model."
        )
    # timm's evaluation transform (the one training evaluated with): "center" resizes the short side to
    # size / crop_pct and centre-crops, even at crop_pct 1.0 (an image of another aspect ratio is cropped,
    # not squashed); "squash" resizes both sides to size / crop_pct and centre-crops (at 1.0: no crop).
    crop = crop_mode == "center" or crop_pct < 1.0
    # The model type's own processor where it can express the transform; a crop needs one that crops
    # (not every processor does, ViT's does not), CLIP's. The PIL backend resizes as training did.
    model_type = "clip" if crop else getattr(model.config, "model_type", None)
    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type) or IMAGE_PROCESSOR_MAPPING_NAMES["vit"]
    class_name = names.get("pil") or next(iter(names.values()))
    processor: dict[str, Any] = {
        "image_processor_type": class_name,
        "do_resize": True,
        "resample": _RESAMPLE.get(data_config["interpolation"], 2),
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": data_config["mean"],
        "image_std": data_config["std"],
        "do_center_crop": crop,
        "size": {"height": height, "width": width},
    }
    if crop:
        if crop_mode == "center":
            processor["size"] = {"shortest_edge": math.floor(min(height, width) / crop_pct)}
        else:
            processor["size"] = {"height": math.floor(height / crop_pct), "width": math.floor(width / crop_pct)}
        processor["crop_size"] = {"height": height, "width": width}
        processor["crop_pct"] = crop_pct  # exact (CLIP's processor ignores it; the sizes above apply it)
    with open(os.path.join(folder, PREPROCESSOR_NAME), "w", encoding="utf-8") as f:
        json.dump(processor, f, indent=2)
        f.write("\n")


def write_preprocessing(model: nn.Module, folder: str, family: str, data_config: Mapping[str, Any]) -> None:
    """Record ``data_config`` in ``folder``.

    timm models and TimmWrapper get it in ``config.json``'s ``pretrained_cfg``, other transformers models
    a ``preprocessor_config.json``.

    Args:
        model (`nn.Module`): The saved model.
        folder (`str`): The folder it was saved to.
        family (`str`): ``"timm"`` or ``"transformers"`` (:func:`bimask_hf.families.model_family`).
        data_config (`Mapping[str, Any]`): timm's data config (``input_size``, ``mean``, ``std``,
            ``interpolation``, ``crop_pct``, ``crop_mode``).
    """
    config = _clean(data_config)
    if family == "timm" or is_timm_wrapper(model):
        _update_timm_config(folder, config)
    else:
        _write_image_processor(model, folder, config)


def read_preprocessing(folder: str) -> dict[str, Any] | None:
    """The data config recorded in a saved folder (see the module docstring).

    Args:
        folder (`str`): A local model folder.

    Returns:
        `dict[str, Any]` or `None`: timm's data config, or None if the folder records none.
    """
    config_path = os.path.join(folder, MODEL_CONFIG_NAME)
    model_config = read_json(config_path, "Model config") if os.path.isfile(config_path) else {}
    if isinstance(model_config.get("pretrained_cfg"), dict):
        from timm.data import resolve_data_config

        return dict(resolve_data_config(pretrained_cfg=model_config["pretrained_cfg"], verbose=False))
    path = os.path.join(folder, PREPROCESSOR_NAME)
    if not os.path.isfile(path):
        return None
    processor = read_json(path, "Image processor config")
    if isinstance(processor.get("pretrained_cfg"), dict):  # BiMaskImageProcessor: timm's data config
        from timm.data import resolve_data_config

        return dict(resolve_data_config(pretrained_cfg=processor["pretrained_cfg"], verbose=False))
    mean, std = processor.get("image_mean"), processor.get("image_std")
    size = processor.get("crop_size") if processor.get("do_center_crop") else processor.get("size")
    if mean is None or std is None or not isinstance(size, Mapping) or "height" not in size:
        return None
    names = {v: k for k, v in _RESAMPLE.items()}
    channels = model_config.get("num_channels", len(mean))
    config: dict[str, Any] = {
        "input_size": (channels, size["height"], size["width"]),
        "mean": tuple(mean),
        "std": tuple(std),
        "interpolation": names.get(processor.get("resample", 2), "bilinear"),
        "crop_pct": 1.0,
        "crop_mode": "squash",
    }
    if processor.get("do_center_crop"):
        resize = processor.get("size") or {}
        if resize.get("shortest_edge"):
            config["crop_mode"], scale, target = "center", resize["shortest_edge"], min(size["height"], size["width"])
        elif resize.get("height"):
            scale, target = resize["height"], size["height"]
        else:
            return config
        recorded = processor.get("crop_pct")  # the exact value, when it gives the same resize
        exact = isinstance(recorded, (int, float)) and 0 < recorded <= 1 and math.floor(target / recorded) == scale
        config["crop_pct"] = float(recorded) if exact else target / scale
    return config


def pipeline_loads(folder: str, channels: int = 3) -> bool:
    """Whether ``pipeline("image-classification", model=folder)`` gets a fitting image processor.

    That is one that prepares images the way the model takes them: recorded preprocessing, for
    ``channels``-channel inputs.

    Args:
        folder (`str`): A local model folder.
        channels (`int`, *optional*, defaults to 3): Input channels of the model.

    Returns:
        `bool`: True when the pipeline loads such a processor.
    """
    from ..models.image_processor import IMAGE_PROCESSOR_TYPE

    config_path = os.path.join(folder, MODEL_CONFIG_NAME)
    model_config = read_json(config_path, "Model config") if os.path.isfile(config_path) else {}
    path = os.path.join(folder, PREPROCESSOR_NAME)
    if os.path.isfile(path):
        processor = read_json(path, "Image processor config")
        if isinstance(processor.get("pretrained_cfg"), dict):  # BiMaskImageProcessor converts the channels
            return int(processor["pretrained_cfg"]["input_size"][0]) == channels
        return channels == 3 and processor.get("image_mean") is not None
    cfg = model_config.get("pretrained_cfg")
    if not isinstance(cfg, dict) or any(cfg.get(k) is None for k in ("input_size", "mean", "std")):
        return False
    if int(cfg["input_size"][0]) != channels:
        return False
    return channels == 3 or model_config.get("image_processor_type") == IMAGE_PROCESSOR_TYPE
