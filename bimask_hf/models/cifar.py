"""CIFAR-sized models (32x32 input) registered with timm.

The CIFAR recipes of the Bi-Mask paper (Zhang et al., "Bi-directional Masks for Efficient N:M Sparse
Training", ICML 2023) train ResNet-32, VGG-19 and MobileNetV2 variants built for 32x32 images:

* ``resnet{8,20,32,56}_cifar`` -- the CIFAR ResNets of He et al., "Deep Residual Learning for Image
  Recognition" (CVPR 2016): a 3x3 stride-1 stem, three stages of ``n`` basic blocks, and parameter-free
  "option A" shortcuts (spatial subsampling plus zero-padded channels). Stage widths are
  ``base_width * (1, 2, 4)``; ``base_width=32`` by default (the paper's ResNet-32), ``16`` gives the
  classic networks.
* ``vgg19_cifar`` -- VGG-19 with batch norm (Simonyan & Zisserman, ICLR 2015) in its common CIFAR form:
  four max-pools instead of five, global average pooling and a single linear ``head``.
* ``mobilenetv2_cifar`` -- MobileNetV2 (Sandler et al., CVPR 2018) with a stride-1 stem and a stride-1
  first stride-2 stage (the 24-channel one), so 32x32 inputs end at 4x4 instead of 1x1.

After ``import bimask_hf.models.cifar`` the models are available through ``timm.create_model`` and
through transformers' ``TimmWrapperConfig(architecture=...)``. No pretrained weights are published.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import create_classifier
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from torch import nn

from ..data.statistics import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD  # re-exported

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CifarMobileNetV2",
    "CifarResNet",
    "CifarVGG",
    "ZeroPadShortcut",
]



class _CifarClassifierBase(nn.Module):
    """Shared head logic: ``global_pool`` then a linear classifier, timm-style accessors.

    Subclasses build their trunk, set ``num_features``, call :meth:`_init_head` and implement
    ``forward_features``. ``_classifier_name`` is the attribute holding the linear classifier.
    """

    _classifier_name = "fc"
    num_features: int

    def __init__(self, num_classes: int, drop_rate: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

    def _init_head(self, global_pool: str) -> None:
        global_pool_module, classifier = create_classifier(
            self.num_features, self.num_classes, pool_type=global_pool
        )
        self.global_pool = global_pool_module
        setattr(self, self._classifier_name, classifier)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    @torch.jit.ignore
    def init_weights(self) -> None:
        """(Re-)initialise convolutions (Kaiming normal, fan-out) and batch norms (ones, zeros).

        ``TimmWrapperForImageClassification(config)`` re-initialises every conv/linear of a freshly
        built model to N(0, 0.02) in its ``post_init``; call ``wrapper.timm_model.init_weights()``
        afterwards to train from scratch with the usual CIFAR initialisation.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Enable or disable activation checkpointing of the residual/conv blocks."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> nn.Module | str:
        """Return the classifier module, or its attribute name when ``name_only``."""
        return self._classifier_name if name_only else getattr(self, self._classifier_name)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a fresh one for ``num_classes`` (0 removes it)."""
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        reference = next(self.parameters())
        self._init_head(global_pool)
        self.global_pool.to(reference.device)
        getattr(self, self._classifier_name).to(device=reference.device, dtype=reference.dtype)

    def _run_blocks(self, blocks: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(blocks, x, flatten=True)
        for block in blocks:
            x = block(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Map images ``(B, C, H, W)`` to the last feature map ``(B, num_features, h, w)``."""
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the feature map and apply the classifier (skipped when ``pre_logits``)."""
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else getattr(self, self._classifier_name)(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits ``(B, num_classes)`` (pooled features when ``num_classes == 0``)."""
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------------------------------------
# ResNet (He et al. 2016, CIFAR variant)


class ZeroPadShortcut(nn.Module):
    """He et al.'s "option A" shortcut: subsample by ``stride`` and zero-pad the new channels.

    It has no parameters, so a sparsifier never sees it and the block's parameter count stays that of
    its two convolutions.

    Args:
        in_chs (`int`): Input channels.
        out_chs (`int`): Output channels, at least ``in_chs``.
        stride (`int`): Spatial subsampling.

    Raises:
        ValueError: If ``out_chs < in_chs``.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        if out_chs < in_chs:
            raise ValueError(f"ZeroPadShortcut cannot shrink channels ({in_chs} -> {out_chs})")
        self.stride = stride
        self.pad_before = (out_chs - in_chs) // 2
        self.pad_after = out_chs - in_chs - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` subsampled spatially and padded with zero channels on both sides.

        Args:
            x (`torch.Tensor`): ``(B, in_chs, H, W)``.

        Returns:
            `torch.Tensor`: ``(B, out_chs, ceil(H / stride), ceil(W / stride))``.
        """
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))

    def extra_repr(self) -> str:
        """The stride and channel padding, for the module's ``repr``.

        Returns:
            `str`: E.g. ``"stride=2, pad=(8, 8)"``.
        """
        return f"stride={self.stride}, pad=({self.pad_before}, {self.pad_after})"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        needs_projection = stride != 1 or in_chs != out_chs
        self.downsample = ZeroPadShortcut(in_chs, out_chs, stride) if needs_projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        shortcut = self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(x + shortcut)


class CifarResNet(_CifarClassifierBase):
    """CIFAR ResNet: 3x3 stem ``conv1``, stages ``layer1..3`` of basic blocks, classifier ``fc``.

    Args:
        blocks_per_stage (`int`, *optional*, defaults to 5): Basic blocks per stage (5: ResNet-32).
        base_width (`int`, *optional*, defaults to 32): Width of the first stage; the others are 2x and 4x
            (16 gives the classic networks).
        num_classes (`int`, *optional*, defaults to 10): Classes of the classifier (0 removes it).
        in_chans (`int`, *optional*, defaults to 3): Input channels.
        global_pool (`str`, *optional*, defaults to `"avg"`): timm pooling type before the classifier.
        drop_rate (`float`, *optional*, defaults to 0.0): Dropout before the classifier.
    """

    _classifier_name = "fc"

    def __init__(
        self,
        blocks_per_stage: int = 5,
        base_width: int = 32,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__(num_classes, drop_rate)
        self.in_chans = in_chans  # timm reads it when exporting the input config
        widths = (base_width, base_width * 2, base_width * 4)
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = nn.ReLU(inplace=True)
        in_chs = widths[0]
        for stage_idx, width in enumerate(widths):
            blocks = []
            for block_idx in range(blocks_per_stage):
                stride = 2 if stage_idx > 0 and block_idx == 0 else 1
                blocks.append(BasicBlock(in_chs, width, stride))
                in_chs = width
            self.add_module(f"layer{stage_idx + 1}", nn.Sequential(*blocks))
        self.num_features = widths[-1]
        self._init_head(global_pool)
        self.init_weights()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """Regexes grouping parameters into stem and blocks (timm layer-decay API).

        Args:
            coarse (`bool`, *optional*, defaults to `False`): One group per stage instead of per block.

        Returns:
            `dict`: ``{"stem": ..., "blocks": ...}``.
        """
        return dict(stem=r"^conv1|bn1", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``(B, C, H, W)`` to the last feature map ``(B, 4*base_width, H/4, W/4)``.

        Args:
            x (`torch.Tensor`): The images.

        Returns:
            `torch.Tensor`: The feature map.
        """
        x = self.act1(self.bn1(self.conv1(x)))
        return self._run_blocks([self.layer1, self.layer2, self.layer3], x)


# ----------------------------------------------------------------------------------------------------------
# VGG (Simonyan & Zisserman 2015, CIFAR variant with batch norm)

# Channel widths, "M" = 2x2 max-pool. Four pools (not five) so 32x32 inputs end at 2x2, and 28x28 at 1x1.
_VGG19_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512,
)  # fmt: skip


class CifarVGG(_CifarClassifierBase):
    """VGG with batch norm for 32x32 inputs: ``features`` (stem ``features.0``), ``global_pool``, ``head``.

    Args:
        layout (`Sequence[int | str]`, *optional*, defaults to VGG-19's): Conv widths, ``"M"`` for a 2x2
            max-pool.
        num_classes (`int`, *optional*, defaults to 10): Classes of the classifier (0 removes it).
        in_chans (`int`, *optional*, defaults to 3): Input channels.
        global_pool (`str`, *optional*, defaults to `"avg"`): timm pooling type before the classifier.
        drop_rate (`float`, *optional*, defaults to 0.0): Dropout before the classifier.
    """

    _classifier_name = "head"

    def __init__(
        self,
        layout: Sequence[int | str] = _VGG19_LAYOUT,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__(num_classes, drop_rate)
        self.in_chans = in_chans  # timm reads it when exporting the input config
        layers: list[nn.Module] = []
        in_chs = in_chans
        for item in layout:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                out_chs = int(item)
                layers += [
                    nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=False),
                    nn.BatchNorm2d(out_chs),
                    nn.ReLU(inplace=True),
                ]
                in_chs = out_chs
        self.features = nn.Sequential(*layers)
        self.num_features = in_chs
        self._init_head(global_pool)
        self.init_weights()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """Regexes grouping parameters into stem and blocks (timm layer-decay API).

        Args:
            coarse (`bool`, *optional*, defaults to `False`): One group per stage instead of per
                block (the same groups either way here).

        Returns:
            `dict`: ``{"stem": ..., "blocks": ...}``.
        """
        return dict(stem=r"^features\.[01]\.", blocks=r"^features\.(\d+)")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``(B, C, H, W)`` to the last feature map ``(B, 512, H/16, W/16)``.

        Args:
            x (`torch.Tensor`): The images.

        Returns:
            `torch.Tensor`: The feature map.
        """
        return self._run_blocks(list(self.features), x)


# ----------------------------------------------------------------------------------------------------------
# MobileNetV2 (Sandler et al. 2018, CIFAR strides)

# (expansion, out channels, blocks, stride of the first block). ImageNet uses stride 2 for the
# 24-channel stage and the stem; CIFAR makes both 1.
_MOBILENETV2_CIFAR_LAYOUT: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection, residual when shapes match."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expansion: int) -> None:
        super().__init__()
        mid_chs = in_chs * expansion
        self.conv_pw: nn.Module = (
            nn.Identity() if expansion == 1 else nn.Conv2d(in_chs, mid_chs, 1, bias=False)
        )
        self.bn1: nn.Module = nn.Identity() if expansion == 1 else nn.BatchNorm2d(mid_chs)
        self.act1: nn.Module = nn.Identity() if expansion == 1 else nn.ReLU6(inplace=True)
        self.conv_dw = nn.Conv2d(mid_chs, mid_chs, 3, stride=stride, padding=1, groups=mid_chs, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_chs)
        self.act2 = nn.ReLU6(inplace=True)
        self.conv_pwl = nn.Conv2d(mid_chs, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.has_skip = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        shortcut = x
        x = self.act1(self.bn1(self.conv_pw(x)))
        x = self.act2(self.bn2(self.conv_dw(x)))
        x = self.bn3(self.conv_pwl(x))
        return x + shortcut if self.has_skip else x


class CifarMobileNetV2(_CifarClassifierBase):
    """MobileNetV2 for 32x32 inputs: stem ``conv_stem``, ``blocks``, ``conv_head``, classifier ``classifier``.

    Args:
        num_classes (`int`, *optional*, defaults to 10): Classes of the classifier (0 removes it).
        in_chans (`int`, *optional*, defaults to 3): Input channels.
        stem_chs (`int`, *optional*, defaults to 32): Channels of the stem.
        num_features (`int`, *optional*, defaults to 1280): Channels of ``conv_head``.
        global_pool (`str`, *optional*, defaults to `"avg"`): timm pooling type before the classifier.
        drop_rate (`float`, *optional*, defaults to 0.0): Dropout before the classifier.
    """

    _classifier_name = "classifier"

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        stem_chs: int = 32,
        num_features: int = 1280,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__(num_classes, drop_rate)
        self.in_chans = in_chans  # timm reads it when exporting the input config
        self.conv_stem = nn.Conv2d(in_chans, stem_chs, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_chs)
        self.act1 = nn.ReLU6(inplace=True)
        blocks: list[nn.Module] = []
        in_chs = stem_chs
        for expansion, out_chs, repeats, first_stride in _MOBILENETV2_CIFAR_LAYOUT:
            for idx in range(repeats):
                blocks.append(InvertedResidual(in_chs, out_chs, first_stride if idx == 0 else 1, expansion))
                in_chs = out_chs
        self.blocks = nn.Sequential(*blocks)
        self.conv_head = nn.Conv2d(in_chs, num_features, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(num_features)
        self.act2 = nn.ReLU6(inplace=True)
        self.num_features = num_features
        self._init_head(global_pool)
        self.init_weights()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """Regexes grouping parameters into stem and blocks (timm layer-decay API).

        Args:
            coarse (`bool`, *optional*, defaults to `False`): One group per stage instead of per
                block (the same groups either way here).

        Returns:
            `dict`: ``{"stem": ..., "blocks": ...}``.
        """
        return dict(stem=r"^conv_stem|bn1", blocks=[(r"^blocks\.(\d+)", None), (r"^conv_head|bn2", (99999,))])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``(B, C, H, W)`` to the last feature map ``(B, num_features, H/8, W/8)``.

        Args:
            x (`torch.Tensor`): The images.

        Returns:
            `torch.Tensor`: The feature map.
        """
        x = self.act1(self.bn1(self.conv_stem(x)))
        x = self._run_blocks(list(self.blocks), x)
        return self.act2(self.bn2(self.conv_head(x)))


# ----------------------------------------------------------------------------------------------------------
# timm registration


def _cfg(first_conv: str, classifier: str, **kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "first_conv": first_conv,
        "classifier": classifier,
        "license": "apache-2.0",
        **kwargs,
    }


_RESNET_CFG = _cfg("conv1", "fc", pool_size=(8, 8))
default_cfgs = generate_default_cfgs(
    {
        "resnet8_cifar": _RESNET_CFG,
        "resnet20_cifar": _RESNET_CFG,
        "resnet32_cifar": _RESNET_CFG,
        "resnet56_cifar": _RESNET_CFG,
        "vgg19_cifar": _cfg("features.0", "head", pool_size=(2, 2)),
        "mobilenetv2_cifar": _cfg("conv_stem", "classifier", pool_size=(4, 4)),
    }
)


def _create(model_cls: type[nn.Module], variant: str, pretrained: bool, **kwargs: Any) -> Any:
    if pretrained and not kwargs.get("pretrained_cfg"):  # timm's local-dir:/hf-hub: loads pass a cfg
        raise ValueError(
            f"No pretrained weights are published for {variant!r}; create it with pretrained=False "
            "or load a trained checkpoint with TimmWrapperForImageClassification.from_pretrained(...)."
        )
    return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)


_ENTRY_POINT_SECTIONS = """

Args:
    pretrained (`bool`, *optional*, defaults to `False`): Must stay False: no pretrained weights are
        published (timm's ``local-dir:`` / ``hf-hub:`` loads pass a ``pretrained_cfg`` and do load).
    **kwargs: Arguments of :class:`{model}` and of timm's ``build_model_with_cfg``.

Returns:
    `{model}`: The model.

Raises:
    ValueError: For ``pretrained=True`` without a ``pretrained_cfg``.
"""


def _entry_point(fn: Any) -> Any:
    """Complete the one-line docstring of a timm entry point with the sections all of them share."""
    if fn.__doc__ is not None:  # None under python -OO
        fn.__doc__ += _ENTRY_POINT_SECTIONS.format(model=fn.__annotations__["return"])
    return fn


@register_model
@_entry_point
def resnet8_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-8 for CIFAR (1 block per stage): a tiny model for tests and smoke runs."""
    return _create(CifarResNet, "resnet8_cifar", pretrained, **dict(dict(blocks_per_stage=1), **kwargs))


@register_model
@_entry_point
def resnet20_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-20 for CIFAR (3 blocks per stage)."""
    return _create(CifarResNet, "resnet20_cifar", pretrained, **dict(dict(blocks_per_stage=3), **kwargs))


@register_model
@_entry_point
def resnet32_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-32 for CIFAR (5 blocks per stage), the Bi-Mask paper's CIFAR ResNet."""
    return _create(CifarResNet, "resnet32_cifar", pretrained, **dict(dict(blocks_per_stage=5), **kwargs))


@register_model
@_entry_point
def resnet56_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-56 for CIFAR (9 blocks per stage)."""
    return _create(CifarResNet, "resnet56_cifar", pretrained, **dict(dict(blocks_per_stage=9), **kwargs))


@register_model
@_entry_point
def vgg19_cifar(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    """VGG-19 with batch norm for CIFAR."""
    return _create(CifarVGG, "vgg19_cifar", pretrained, **kwargs)


@register_model
@_entry_point
def mobilenetv2_cifar(pretrained: bool = False, **kwargs: Any) -> CifarMobileNetV2:
    """MobileNetV2 (width 1.0) with CIFAR strides."""
    return _create(CifarMobileNetV2, "mobilenetv2_cifar", pretrained, **kwargs)
