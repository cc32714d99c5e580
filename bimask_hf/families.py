"""Which library a model comes from: the one place bimask-hf asks "is this timm or transformers?"."""

from __future__ import annotations

import torch.nn as nn

__all__ = ["model_family", "is_timm_wrapper", "reads_as_timm", "takes_pixel_values"]


def _is_pretrained_model(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def model_family(model: nn.Module) -> str:
    """The library ``model`` comes from.

    Args:
        model (`nn.Module`): The model.

    Returns:
        `str`: ``"transformers"`` for a ``PreTrainedModel`` (TimmWrapper included), ``"timm"`` for a bare timm
        model (one with a ``pretrained_cfg`` dict).

    Raises:
        TypeError: For anything else, naming the fix.
    """
    if _is_pretrained_model(model):
        return "transformers"
    if isinstance(getattr(model, "pretrained_cfg", None), dict):
        return "timm"
    raise TypeError(
        f"bimask-hf saves and loads transformers PreTrainedModels and timm models (with a pretrained_cfg); "
        f"got {type(model).__name__}. Wrap a timm model with TimmWrapperForImageClassification or build it "
        "with timm.create_model."
    )


def is_timm_wrapper(model: nn.Module) -> bool:
    """Whether ``model`` is transformers' ``TimmWrapperForImageClassification``.

    That is a timm model under ``timm_model``.

    Args:
        model (`nn.Module`): The model.

    Returns:
        `bool`: True for a TimmWrapper.
    """
    return getattr(getattr(model, "config", None), "model_type", None) == "timm_wrapper"


def reads_as_timm(model: nn.Module) -> bool:
    """Whether the folder saved from ``model`` is in timm's own format (bare timm models and TimmWrapper).

    Args:
        model (`nn.Module`): The model.

    Returns:
        `bool`: True for timm's format.
    """
    return is_timm_wrapper(model) or (not _is_pretrained_model(model) and getattr(model, "pretrained_cfg", None) is not None)


def takes_pixel_values(model: nn.Module) -> bool:
    """Whether ``model`` is called as ``model(pixel_values=...)`` (transformers), not ``model(x)`` (timm).

    Args:
        model (`nn.Module`): The model.

    Returns:
        `bool`: True for a transformers model.
    """
    return _is_pretrained_model(model)
