"""sparsify / report / merge / check_nm on every supported model family."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import bimask_hf as bh
from bimask_hf.layers import PERMUTATION_KEY

from . import models

FAST = bh.BiMaskConfig(permutation_search="identity")

# (factory, expected sparse layers, expected dense layers with their reasons' first words, input size)
FAMILIES = {
    "timm_resnet18": (lambda: models.timm_model("resnet18"), 19, {"conv1": "stem", "fc": "classifier"}, 32),
    "timm_resnet50": (lambda: models.timm_model("resnet50"), 52, {"conv1": "stem", "fc": "classifier"}, 32),
    "timm_deit_small": (
        lambda: models.timm_model("deit_small_patch16_224"), 48, {"patch_embed.proj": "stem", "head": "classifier"}, 224,
    ),
    "timm_mobilenetv2": (lambda: models.timm_model("mobilenetv2_100"), 34, {"conv_stem": "stem", "classifier": "classifier"}, 32),
    "timm_convnext_tiny": (lambda: models.timm_model("convnext_tiny"), 39, {"stem.0": "stem", "head.fc": "classifier"}, 32),
    "timm_test_vit": (lambda: models.timm_model("test_vit"), 24, {"patch_embed.proj": "stem", "head": "classifier"}, 160),
    "hf_vit": (models.tiny_vit, 12, {"vit.embeddings.patch_embeddings.projection": "stem", "classifier": "classifier"}, 32),
    "hf_deit": (models.tiny_deit, 12, {"deit.embeddings.patch_embeddings.projection": "stem", "classifier": "classifier"}, 32),
    "hf_resnet": (models.tiny_hf_resnet, 7, {"resnet.embedder.embedder.convolution": "stem", "classifier.1": "classifier"}, 32),
    "hf_convnext": (models.tiny_convnext, 5, {"convnext.embeddings.patch_embeddings": "stem", "classifier": "classifier"}, 32),
    "hf_timm_wrapper": (models.timm_wrapper, 19, {"timm_model.conv1": "stem", "timm_model.fc": "classifier"}, 32),
}


def _logits(model, x):
    out = model(x) if not hasattr(model, "config") else model(pixel_values=x)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sparsify_counts_and_forward_backward(family):
    factory, n_sparse, dense, size = FAMILIES[family]
    torch.manual_seed(0)
    model = factory()
    plain_keys = set(model.state_dict())
    bh.sparsify(model, FAST)
    rep = bh.report(model)
    assert len(rep.sparse_rows) == n_sparse, str(rep)
    reasons = {r.name: r.reason or "" for r in rep.rows if r.mode == "dense"}
    for name, why in dense.items():
        assert reasons[name].startswith(why), (name, reasons.get(name))
    # every sparse layer is 2:4 in its forward weight, and state-dict keys are the plain ones + permutations
    bh.check_nm(model, 2, 4)
    extra = set(model.state_dict()) - plain_keys
    assert extra and all(k.endswith(PERMUTATION_KEY) for k in extra)
    assert plain_keys <= set(model.state_dict())
    x = torch.randn(2, 3, size, size)
    _logits(model, x).sum().backward()
    assert all(layer.forward_mask is not None for layer in bh.sparse_layers(model).values())


def test_depthwise_layers_reported_dense_with_reason():
    model = bh.sparsify(models.timm_model("mobilenetv2_100"), FAST)
    rep = bh.report(model)
    dw = [r for r in rep.rows if r.name.endswith("conv_dw")]
    assert dw and all(r.mode == "dense" and "K=9 not divisible by M=4" in r.reason for r in dw)
    text = str(rep)
    assert "blocks.1.0.conv_dw" in text and "K=9" in text and "stem" in text


def test_merge_round_trip_matches_patched_model_in_eval():
    torch.manual_seed(0)
    model = bh.sparsify(models.timm_model("resnet18"), FAST).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    names = list(bh.sparse_layers(model))
    bh.merge(model)
    assert not bh.sparse_layers(model)
    assert all(type(m) in (nn.Conv2d, nn.Linear, nn.BatchNorm2d) or not isinstance(m, (nn.Conv2d, nn.Linear))
               for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    assert sorted(names) == model.bimask_sparse_layers
    assert bh.check_nm(model, 2, 4) == model.bimask_sparse_layers
    # the merged weights have exact zeros: exactly half of every sparse weight
    for name in names:
        w = model.get_submodule(name).weight
        assert int((w == 0).sum()) == w.numel() // 2
    # plain state dict keys again (no permutation buffers)
    assert not any(k.endswith(PERMUTATION_KEY) for k in model.state_dict())


def test_state_dict_compatible_with_plain_model():
    torch.manual_seed(0)
    plain = models.timm_model("resnet18")
    patched = bh.sparsify(copy.deepcopy(plain), FAST)
    missing, unexpected = patched.load_state_dict(plain.state_dict(), strict=True)
    assert not missing and not unexpected
    # and the other way: a patched checkpoint minus permutation buffers loads into a plain model
    sd = {k: v for k, v in patched.state_dict().items() if not k.endswith(PERMUTATION_KEY)}
    plain.load_state_dict(sd, strict=True)


def test_targets_regex_list_and_exclusions():
    model = models.timm_model("resnet18")
    bh.sparsify(model, bh.BiMaskConfig(target_modules=r"layer1\..*", permutation_search="identity"))
    assert sorted(bh.sparse_layers(model)) == ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"]

    model = models.timm_model("resnet18")
    bh.sparsify(model, bh.BiMaskConfig(target_modules=["conv1", "fc"], exclude_modules=["layer4.1.conv1"]))
    names = set(bh.sparse_layers(model))
    assert "fc" in names  # explicit targets override the head default
    stem = next(r for r in bh.report(model).rows if r.name == "conv1")
    assert stem.reason == "K=147 not divisible by M=4"  # targeted, but its shape does not allow 2:4
    assert "layer4.1.conv1" not in names and "layer4.0.conv1" in names and "layer4.1.conv2" not in names


def test_fc_with_rows_not_divisible_is_unidirectional():
    model = models.timm_model("resnet18", num_classes=10)
    bh.sparsify(model, bh.BiMaskConfig(target_modules=["fc"]))
    layer = model.fc
    assert layer.effective_mode == "srste"
    row = next(r for r in bh.report(model).rows if r.name == "fc")
    assert "uni-directional" in row.reason


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(target_modules=r"nothing\d+"), "matches no Linear/Conv2d layer.*layer1.0.conv1"),
        (dict(target_modules=["not_a_layer"]), "matches no Linear/Conv2d"),
        (dict(exclude_modules=["not_a_layer"]), "exclude_modules"),
    ],
)
def test_bad_patterns_name_existing_layers(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bh.sparsify(models.timm_model("resnet18"), bh.BiMaskConfig(**kwargs))


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(n=0), "n"), (dict(n=5, m=4), "n must be <= m"), (dict(mode="m9"), "mode"), (dict(density=0.0), "density"),
        (dict(density=1.5), "density"), (dict(permutation_search="greedy"), "permutation_search"),
        (dict(group_layout="nhwc"), "group_layout"), (dict(permutation_interval=0), "permutation_interval"),
    ],
)
def test_config_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        bh.BiMaskConfig(**kwargs)


def test_config_seed_aliases_and_round_trip(tmp_path):
    cfg = bh.BiMaskConfig(n=1, m=16, mode="m4", target_modules=("b", "a"))
    assert cfg.mode == "post" and cfg.target_modules == ["a", "b"]
    cfg.save_pretrained(tmp_path)
    assert bh.BiMaskConfig.from_pretrained(tmp_path) == cfg
    assert (tmp_path / "bimask_config.json").read_text().index('"decay"') < (tmp_path / "bimask_config.json").read_text().index('"mode"')


def test_check_nm_names_offending_layer():
    model = bh.merge(bh.sparsify(models.timm_model("resnet18"), FAST))
    with torch.no_grad():
        model.layer2.get_submodule("1").conv1.weight.fill_(1.0)
    with pytest.raises(bh.NMPatternError, match=r"'layer2.1.conv1'.*not 2:4.*row 0"):
        bh.check_nm(model, 2, 4)
    sd = model.state_dict()
    with pytest.raises(bh.NMPatternError, match="layer2.1.conv1"):
        bh.check_nm(sd, 2, 4, layers=model.bimask_sparse_layers)
    bh.check_nm(sd, 2, 4, layers=["layer1.0.conv1"])


def test_resparsify_twice_is_noop_and_conflict_raises():
    model = bh.sparsify(models.timm_model("resnet18"), FAST)
    layers = bh.sparse_layers(model)
    assert bh.sparsify(model, FAST) is model and bh.sparse_layers(model) == layers
    with pytest.raises(ValueError, match="already sparsified"):
        bh.sparsify(model, bh.BiMaskConfig(n=1, m=4))


def test_refresh_permutations_is_seeded_and_improves_retention():
    torch.manual_seed(0)
    a = bh.sparsify(models.timm_model("resnet18"), bh.BiMaskConfig(permutation_search="random", num_permutations=20))
    b = copy.deepcopy(a)
    before = bh.report(a).retention_mean
    stats_a = bh.refresh_permutations(a, step=100)
    bh.refresh_permutations(b, step=100)
    for (na, la), (_, lb) in zip(bh.sparse_layers(a).items(), bh.sparse_layers(b).items()):
        assert torch.equal(getattr(la, PERMUTATION_KEY), getattr(lb, PERMUTATION_KEY)), na
    assert stats_a["retention_mean"] >= before
    per_layer = [layer.retention() for layer in bh.sparse_layers(a).values() if layer.effective_mode == "bimask"]
    assert stats_a["retention_mean"] == pytest.approx(sum(per_layer) / len(per_layer))
    assert stats_a["retention_min"] == pytest.approx(min(per_layer))


def test_torch_compile_traces_sparse_layers_without_graph_breaks():
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = bh.sparsify(models.timm_model("resnet8_cifar"), FAST)
    ref = bh.sparsify(models.timm_model("resnet8_cifar"), FAST)
    ref.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend="aot_eager")  # graph capture + AOT autograd, no C++ build
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    torch.nn.functional.cross_entropy(compiled(x), y).backward()
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    assert not torch._dynamo.utils.counters["graph_break"]
    for (name, a), b in zip(bh.sparse_layers(model).items(), bh.sparse_layers(ref).values()):
        torch.testing.assert_close(a.weight.grad, b.weight.grad, msg=name)


def test_merge_leaves_positive_zeros_only():
    torch.manual_seed(0)
    model = bh.sparsify(models.timm_model("resnet18"), FAST)
    names = list(bh.sparse_layers(model))
    bh.merge(model)
    for name in names:
        w = model.get_submodule(name).weight
        assert not bool(((w == 0) & torch.signbit(w)).any()), f"{name} holds -0.0 after merge"


def test_check_nm_catches_one_extra_nonzero_in_one_group():
    torch.manual_seed(0)
    model = bh.merge(bh.sparsify(models.timm_model("resnet18"), FAST))
    bh.check_nm(model, 2, 4)
    weight = model.layer3.get_submodule("0").conv2.weight  # (256, 256, 3, 3): channels_last groups of 4 channels
    with torch.no_grad():
        group = weight[5, 8:12, 1, 2]  # row 5, one group of M=4 input channels at kernel position (1, 2)
        assert int((group != 0).sum()) == 2
        weight[5, 8 + int((group == 0).nonzero()[0]), 1, 2] = 1e-3
    with pytest.raises(bh.NMPatternError, match=r"'layer3.0.conv2'.*3 nonzeros.*1 of \d+ groups"):
        bh.check_nm(model, 2, 4)


def test_sparsity_stats_match_explicit_counts():
    torch.manual_seed(0)
    model = bh.sparsify(models.timm_model("resnet18"), FAST)
    kept_sparse = total_sparse = kept_all = total_all = 0
    for mod in model.modules():
        if isinstance(mod, bh.BiMaskLayer):
            mf = bh.nm_mask(mod.weight.detach().permute(0, 2, 3, 1).reshape(mod.weight.shape[0], -1), 2, 4)
            kept_sparse += int(mf.sum())
            total_sparse += mf.numel()
            kept_all += int(mf.sum())
            total_all += mf.numel()
        elif isinstance(mod, (nn.Conv2d, nn.Linear)):
            kept_all += mod.weight.numel()
            total_all += mod.weight.numel()
    stats = bh.report(model).stats
    assert stats.sparse_density == pytest.approx(kept_sparse / total_sparse) == pytest.approx(0.5)
    assert stats.model_density == pytest.approx(kept_all / total_all)
    assert stats.model_density > 0.5  # the dense stem and head count fully
    logs = stats.to_logs()
    assert logs["sparsity/sparse_density"] == stats.sparse_density
    assert logs["sparsity/model_density"] == stats.model_density


def test_grouped_conv_refresh_keeps_a_permutation_per_group_and_never_lowers_retention():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 16, 3), nn.Conv2d(16, 32, 3, groups=2, bias=False), nn.Conv2d(32, 8, 1))
    bh.sparsify(model, bh.BiMaskConfig(target_modules=["1"], permutation_search="matched"))
    layer = model[1]
    rows = 16  # output rows per conv group
    # start from a non-identity permutation that stays inside each conv group
    start = torch.cat([torch.randperm(rows) + g * rows for g in range(2)])
    getattr(layer, PERMUTATION_KEY).copy_(start)
    before = layer.retention()
    bh.refresh_permutations(model, step=1)
    perm = getattr(layer, PERMUTATION_KEY)
    for g in range(2):
        assert sorted(perm[g * rows:(g + 1) * rows].tolist()) == list(range(g * rows, (g + 1) * rows))
    good = layer.retention()
    assert good > before
    # a weak search from this good permutation (one random candidate, or none) must keep it
    for method in ("random", "identity"):
        bh.refresh_permutations(model, step=2, method=method, num_candidates=1)
        assert layer.retention() >= good, method


def test_training_arguments_take_every_config_field_once():
    import dataclasses

    from transformers import HfArgumentParser

    from bimask_hf.trainer import BiMaskTrainingArguments

    args_fields = {f.name: f for f in dataclasses.fields(BiMaskTrainingArguments)}
    for f in dataclasses.fields(bh.BiMaskConfig):
        if f.name == "seed":  # the Trainer's --seed drives the search
            continue
        assert args_fields[f.name].default == f.default, f.name
        assert args_fields[f.name].metadata["help"] == f.metadata["help"], f.name
    parser = HfArgumentParser(BiMaskTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "unused", "--use_cpu", "true", "--N", "1", "--M", "8", "--mask_mode", "m4", "--iter", "7",
         "--greedy_num", "3", "--nm_layers", "layer1,layer2", "--random_mask_ratio", "0.3", "--seed", "5",
         "--group_layout", "flat", "--decay", "0.001", "--permutation_search", "swap",
         "--exclude_modules", "re:.*fc"]
    )
    assert args.bimask_config == bh.BiMaskConfig(
        n=1, m=8, mode="post", permutation_interval=7, num_permutations=3, target_modules=["layer1", "layer2"],
        density=0.3, seed=5, group_layout="flat", decay=0.001, permutation_search="swap", exclude_modules=".*fc",
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda: bh.BiMaskConfig(n=3, m=2),
        lambda: bh.nm_mask(torch.randn(4, 8), 3, 2),
        lambda: bh.search_permutation(torch.ones(4, 8, dtype=torch.bool), 3, 2),
        lambda: bh.BiMaskLinear(8, 8, n=3, m=2),
        lambda: __import__("bimask_hf.compression", fromlist=["x"]).compress_nm(torch.randn(4, 8), 3, 2),
    ],
    ids=["config", "nm_mask", "search", "layer", "compress"],
)
def test_every_entry_point_checks_nm_arguments_with_one_message(call):
    with pytest.raises(ValueError, match=r"Invalid N:M pattern n=3, m=2: need integers with 1 <= N <= M"):
        call()
