"""``BiMaskImageProcessor``: timm preprocessing for models whose input is not 3-channel RGB.

transformers' image-classification pipeline converts every image to RGB and ``TimmWrapperImageProcessor``
then feeds those 3 channels to the model. A model trained on 1-channel images (Fashion-MNIST, MNIST)
needs them converted back to grayscale first, as the training data pipeline did. Folders of such
models name this class in ``config.json`` (``image_processor_type``); ``import bimask_hf`` registers it
with ``AutoImageProcessor``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, PretrainedConfig
from transformers.image_processing_utils import BatchFeature
from transformers.image_transforms import to_pil_image
from transformers.image_utils import make_flat_list_of_images
from transformers.models.timm_wrapper.image_processing_timm_wrapper import TimmWrapperImageProcessor

__all__ = ["BiMaskImageProcessor", "IMAGE_PROCESSOR_TYPE"]

IMAGE_PROCESSOR_TYPE = "BiMaskImageProcessor"
_MODES = {1: "L", 3: "RGB"}


class BiMaskImageProcessor(TimmWrapperImageProcessor):
    """timm's evaluation transform from ``pretrained_cfg``, after converting images to the model's channels.

    Args:
        pretrained_cfg (`dict[str, Any]`): timm's pretrained config; ``pretrained_cfg["input_size"][0]`` is 1
            (images become grayscale, ``"L"``) or 3 (``"RGB"``).
        architecture (`str`, *optional*): The timm architecture, as ``TimmWrapperImageProcessor`` takes it.
        **kwargs: Passed to ``TimmWrapperImageProcessor``.

    Raises:
        ValueError: For a model of other than 1 or 3 channels.
    """

    def __init__(self, pretrained_cfg: dict[str, Any], architecture: str | None = None, **kwargs: Any) -> None:
        super().__init__(pretrained_cfg, architecture=architecture, **kwargs)
        channels = int(self.data_config["input_size"][0])
        if channels not in _MODES:
            raise ValueError(f"BiMaskImageProcessor handles 1- or 3-channel models, not {channels} channels.")
        self.image_mode = _MODES[channels]

    def to_dict(self) -> dict[str, Any]:
        """Serializable fields (the transforms are rebuilt from ``pretrained_cfg``).

        Returns:
            `dict[str, Any]`: ``TimmWrapperImageProcessor``'s fields, without the image mode.
        """
        output = super().to_dict()
        output.pop("image_mode", None)
        return output

    def preprocess(self, images: Any, return_tensors: str | None = "pt") -> BatchFeature:  # type: ignore[override]
        """Convert each image to the model's mode (``L`` or ``RGB``), then apply timm's evaluation transform.

        Args:
            images (`Any`): A PIL image, array or tensor, or a list of them (a 4-D tensor is a batch).
            return_tensors (`str`, *optional*, defaults to `"pt"`): Only ``"pt"``.

        Returns:
            `BatchFeature`: ``{"pixel_values": (B, C, H, W) tensor}``.

        Raises:
            ValueError: For ``return_tensors`` other than ``"pt"``.
        """
        if return_tensors != "pt":
            raise ValueError(f"return_tensors for BiMaskImageProcessor must be 'pt', got {return_tensors!r}.")
        if isinstance(images, torch.Tensor):
            images = list(images) if images.ndim == 4 else [images]
        pil_images = []
        for image in make_flat_list_of_images(images):
            if not isinstance(image, Image.Image):
                image = to_pil_image(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
            pil_images.append(image if image.mode == self.image_mode else image.convert(self.image_mode))
        pixel_values = torch.stack([self.val_transforms(image) for image in pil_images])
        return BatchFeature({"pixel_values": pixel_values}, tensor_type=return_tensors)


class _BiMaskImageProcessorKey(PretrainedConfig):
    """Registration key only: ``AutoImageProcessor`` finds custom classes by name among registered ones."""

    model_type = "bimask_image_processor"


AutoImageProcessor.register(
    _BiMaskImageProcessorKey,
    image_processor_classes={"torchvision": BiMaskImageProcessor, "pil": BiMaskImageProcessor},
    exist_ok=True,
)
