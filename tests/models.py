"""Tiny, randomly initialised models of every family the library supports (no downloads)."""

from __future__ import annotations

import timm
import torch.nn as nn
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    DeiTConfig,
    DeiTForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

_VIT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32, patch_size=8)


def tiny_vit(num_labels: int = 10) -> nn.Module:
    return ViTForImageClassification(ViTConfig(**_VIT, num_labels=num_labels))


def tiny_deit(num_labels: int = 10) -> nn.Module:
    return DeiTForImageClassification(DeiTConfig(**_VIT, num_labels=num_labels))


def tiny_hf_resnet(num_labels: int = 10) -> nn.Module:
    cfg = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=num_labels)
    return ResNetForImageClassification(cfg)


def tiny_convnext(num_labels: int = 10) -> nn.Module:
    cfg = ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=num_labels)
    return ConvNextForImageClassification(cfg)


def timm_wrapper(architecture: str = "resnet18", num_labels: int = 10) -> nn.Module:
    return TimmWrapperForImageClassification(TimmWrapperConfig(architecture=architecture, num_labels=num_labels))


def timm_model(name: str, num_classes: int = 10) -> nn.Module:
    return timm.create_model(name, num_classes=num_classes)
