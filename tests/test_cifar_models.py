"""CIFAR models: timm registration, shapes, parameter counts and the transformers TimmWrapper."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from transformers import TimmWrapperConfig, TimmWrapperForImageClassification, TimmWrapperModel

import bimask_hf.models.cifar as cifar

ALL_MODELS = [
    "resnet8_cifar",
    "resnet20_cifar",
    "resnet32_cifar",
    "resnet56_cifar",
    "vgg19_cifar",
    "mobilenetv2_cifar",
]
FIRST_CONV = {
    "resnet8_cifar": "conv1",
    "vgg19_cifar": "features.0",
    "mobilenetv2_cifar": "conv_stem",
}
CLASSIFIER = {"resnet8_cifar": "fc", "vgg19_cifar": "head", "mobilenetv2_cifar": "classifier"}


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: timm.create_model(name, num_classes=10).eval() for name in ALL_MODELS}


def test_all_registered_with_timm() -> None:
    assert set(ALL_MODELS) <= set(timm.list_models("*_cifar"))
    assert not any(timm.is_model_pretrained(name) for name in ALL_MODELS)


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("size", [32, 28])
def test_logits_shape(models: dict[str, nn.Module], name: str, size: int) -> None:
    with torch.no_grad():
        logits = models[name](torch.randn(2, 3, size, size))
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("name", "feature_shape"),
    [
        ("resnet32_cifar", (128, 8, 8)),
        ("vgg19_cifar", (512, 2, 2)),
        ("mobilenetv2_cifar", (1280, 4, 4)),
    ],
)
def test_forward_features_and_head(models: dict[str, nn.Module], name: str, feature_shape: tuple) -> None:
    model = models[name]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        logits = model.forward_head(features)
        assert torch.allclose(logits, model(x))
    assert features.shape == (2, *feature_shape)
    assert pooled.shape == (2, feature_shape[0]) == (2, model.num_features)


@pytest.mark.parametrize(
    ("name", "kwargs", "low", "high"),
    [
        ("resnet32_cifar", {}, 1.80e6, 1.95e6),  # widths 32/64/128
        ("resnet20_cifar", {"base_width": 16}, 0.26e6, 0.28e6),  # He et al.'s 0.27M
        ("resnet32_cifar", {"base_width": 16}, 0.45e6, 0.48e6),  # He et al.'s 0.46M
        ("resnet56_cifar", {"base_width": 16}, 0.84e6, 0.87e6),  # He et al.'s 0.85M
        ("vgg19_cifar", {}, 19.9e6, 20.1e6),
        ("mobilenetv2_cifar", {}, 2.2e6, 2.3e6),
    ],
)
def test_parameter_counts(name: str, kwargs: dict, low: float, high: float) -> None:
    assert low <= _num_params(timm.create_model(name, num_classes=10, **kwargs)) <= high


def test_resnet_stage_widths_follow_base_width() -> None:
    model = timm.create_model("resnet20_cifar", base_width=16)
    assert [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.out_channels] == [16, 32]
    assert model.layer3[-1].conv2.out_channels == 64 == model.num_features
    assert len(model.layer2) == 3
    assert model.conv1.stride == (1, 1) and model.conv1.kernel_size == (3, 3)


@pytest.mark.parametrize("name", ["resnet8_cifar", "vgg19_cifar", "mobilenetv2_cifar"])
def test_pretrained_cfg_names_real_modules(models: dict[str, nn.Module], name: str) -> None:
    model = models[name]
    cfg = model.pretrained_cfg
    assert cfg["first_conv"] == FIRST_CONV[name] and cfg["classifier"] == CLASSIFIER[name]
    modules = dict(model.named_modules())
    first_conv = modules[cfg["first_conv"]]
    assert isinstance(first_conv, nn.Conv2d) and first_conv.in_channels == 3
    assert modules[cfg["classifier"]] is model.get_classifier()
    assert model.get_classifier(name_only=True) == cfg["classifier"]
    assert isinstance(model.get_classifier(), nn.Linear)
    assert cfg["input_size"] == (3, 32, 32) and cfg["num_classes"] == 10
    assert cfg["mean"] == cifar.CIFAR10_MEAN and cfg["std"] == cifar.CIFAR10_STD
    # timm's data config resolution reads the same cfg.
    assert timm.data.resolve_data_config({}, model=model)["input_size"] == (3, 32, 32)


def test_zero_pad_shortcut_has_no_parameters_and_pads_with_zeros() -> None:
    model = timm.create_model("resnet8_cifar")
    shortcut = model.layer2[0].downsample
    assert isinstance(shortcut, cifar.ZeroPadShortcut)
    assert list(shortcut.parameters()) == []
    assert isinstance(model.layer1[0].downsample, nn.Identity)
    x = torch.randn(2, 32, 8, 8)
    out = shortcut(x)
    assert out.shape == (2, 64, 4, 4)
    assert torch.equal(out[:, 16:48], x[:, :, ::2, ::2])
    assert not out[:, :16].any() and not out[:, 48:].any()
    # No 1x1 projection convs anywhere: every conv in a block is 3x3.
    assert all(m.kernel_size == (3, 3) for m in model.modules() if isinstance(m, nn.Conv2d))


def test_mobilenetv2_cifar_strides() -> None:
    model = timm.create_model("mobilenetv2_cifar")
    assert model.conv_stem.stride == (1, 1)
    strides = [block.conv_dw.stride[0] for block in model.blocks]
    assert strides.count(2) == 3  # ImageNet MobileNetV2 has 4 in the blocks plus a stride-2 stem


@pytest.mark.parametrize("name", ["resnet8_cifar", "vgg19_cifar", "mobilenetv2_cifar"])
def test_in_chans_num_classes_and_reset_classifier(name: str) -> None:
    model = timm.create_model(name, in_chans=1, num_classes=3).eval()
    assert dict(model.named_modules())[FIRST_CONV[name]].in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)
        model.reset_classifier(7)
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
        model.reset_classifier(0)
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, model.num_features)


def test_grad_checkpointing_gives_same_gradients() -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet8_cifar").eval()
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    reference = model.layer1[0].conv1.weight.grad.clone()
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    assert torch.allclose(model.layer1[0].conv1.weight.grad, reference, atol=1e-6)


def test_pretrained_true_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="No pretrained weights"):
        timm.create_model("resnet8_cifar", pretrained=True)


def test_timm_wrapper_for_image_classification(tmp_path) -> None:
    model = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="resnet8_cifar", num_labels=10))
    assert isinstance(model.timm_model, cifar.CifarResNet)
    out = model(pixel_values=torch.randn(2, 3, 32, 32), labels=torch.tensor([1, 2]))
    assert out.logits.shape == (2, 10) and out.loss.ndim == 0
    model.save_pretrained(tmp_path)
    reloaded = TimmWrapperForImageClassification.from_pretrained(tmp_path)
    assert torch.equal(reloaded.timm_model.layer2[0].conv1.weight, model.timm_model.layer2[0].conv1.weight)


def test_timm_wrapper_reinitialises_and_init_weights_restores() -> None:
    """The wrapper's post_init draws convs from N(0, 0.02); ``init_weights`` brings back Kaiming init."""
    model = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="resnet8_cifar", num_labels=10))
    conv = model.timm_model.layer3[0].conv2
    assert conv.weight.std().item() == pytest.approx(0.02, rel=0.1)
    model.timm_model.init_weights()
    fan_out_std = (2.0 / (conv.out_channels * 9)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(fan_out_std, rel=0.1)


def test_timm_wrapper_model_pools_features() -> None:
    model = TimmWrapperModel(TimmWrapperConfig(architecture="mobilenetv2_cifar"))
    out = model(torch.randn(1, 3, 32, 32))
    assert out.last_hidden_state.shape == (1, 1280, 4, 4)
    assert out.pooler_output.shape == (1, 1280)
