"""Saving, loading, model cards and a real loopback Hub (olah) for Bi-Mask sparse models."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
import torch.nn as nn
from huggingface_hub import ModelCard
from huggingface_hub.repocard import metadata_load
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForImageClassification,
    TimmWrapperForImageClassification,
    ViTForImageClassification,
)

import bimask_hf as bh
from bimask_hf.compression import NM_WEIGHTS_NAME
from bimask_hf.hub import (
    CorruptCheckpointError,
    create_model_card,
    load_sparse_model,
    save_sparse_model,
    update_card_results,
)
from bimask_hf.layers import PERMUTATION_KEY
from bimask_hf.masks import weight_to_matrix

from . import models
from .olah_server import serve_local_repos

# The paper's random search with few candidates keeps these CPU tests quick.
CONFIG = bh.BiMaskConfig(n=2, m=4, permutation_search="random", num_permutations=4)
METRICS = {"top1": 71.25, "top5": 90.5, "dataset": "cifar10", "split": "test", "dataset_name": "CIFAR-10"}
CARD = {
    "base_model": "timm/resnet18.a1_in1k",
    "datasets": ["cifar10"],
    "training_args": {"learning_rate": 0.1, "num_train_epochs": 300},
    "repo_id": "bimask-test/resnet-2-4",
}


def _train(model: nn.Module, steps: int = 2, size: int = 32, classes: int = 5) -> nn.Module:
    """A few real Bi-Mask steps so weights, masks and permutations move away from their start."""
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        x = torch.randn(4, 3, size, size, generator=gen)
        y = torch.randint(0, classes, (4,), generator=gen)
        out = model(x)
        logits = out.logits if hasattr(out, "logits") else out
        nn.functional.cross_entropy(logits, y).backward()
        opt.step()
        opt.zero_grad()
    bh.refresh_permutations(model, step=steps)
    return model


def _eval_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _plain_max_nonzeros(weight: torch.Tensor, m: int = 4) -> int:
    """Largest nonzero count in a group of m (channels_last order), computed with plain torch."""
    matrix = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1) if weight.dim() == 4 else weight
    return int((matrix.reshape(matrix.shape[0], -1, m) != 0).sum(-1).max())


@pytest.fixture(scope="module")
def timm_model() -> nn.Module:
    return _train(bh.sparsify(models.timm_model("test_resnet", num_classes=5), CONFIG))


@pytest.fixture(scope="module")
def timm_folder(timm_model, tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("timm") / "resnet-2-4")
    return save_sparse_model(timm_model, folder, metrics=METRICS, card_data=CARD)


@pytest.fixture(scope="module")
def vit_model() -> nn.Module:
    return _train(bh.sparsify(models.tiny_vit(num_labels=5), CONFIG))


@pytest.fixture(scope="module")
def vit_folder(vit_model, tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("vit") / "vit-2-4")
    return save_sparse_model(vit_model, folder, metrics=METRICS, card_data={"repo_id": "bimask-test/vit-2-4"})


@pytest.fixture()
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ---- saving -------------------------------------------------------------------------------------


def test_save_leaves_the_training_model_untouched(tmp_path):
    model = _train(bh.sparsify(models.timm_model("test_resnet", num_classes=5), CONFIG))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_sparse_model(model, tmp_path / "out")
    assert bh.sparse_layers(model), "the caller's Bi-Mask layers were replaced"
    after = model.state_dict()
    assert set(after) == set(before) and any(k.endswith(PERMUTATION_KEY) for k in after)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_saved_weights_are_merged_nm_with_exact_zeros(timm_model, timm_folder):
    assert sorted(os.listdir(timm_folder)) == ["README.md", "bimask_config.json", "config.json", "model.safetensors"]
    state = load_file(os.path.join(timm_folder, "model.safetensors"))
    assert not [k for k in state if PERMUTATION_KEY in k]
    layers = bh.sparse_layers(timm_model)
    bh.check_nm(state, 2, 4, layers=list(layers))
    for name, layer in layers.items():
        saved = state[f"{name}.weight"]
        assert torch.equal(saved, layer.sparse_weight())
        assert (saved == 0).float().mean() >= 0.5
        assert not torch.signbit(saved[saved == 0]).any(), "pruned entries must be stored as +0.0"


def test_bimask_config_records_layers_pattern_and_version(timm_model, timm_folder):
    with open(os.path.join(timm_folder, "bimask_config.json")) as f:
        meta = json.load(f)
    assert meta["sparse_layers"] == sorted(bh.sparse_layers(timm_model))
    assert meta["library_version"] == bh.__version__
    assert (meta["pattern"], meta["n"], meta["m"], meta["mode"]) == ("2:4", 2, 4, "bimask")
    assert meta["weights_format"] == "safetensors" and meta["model_family"] == "timm"
    assert bh.BiMaskConfig.from_pretrained(timm_folder).num_permutations == 4


def test_timm_folder_loads_with_plain_timm_and_transformers(timm_model, timm_folder, x):
    expected = _eval_logits(timm_model, x)
    plain = timm.create_model(f"local-dir:{timm_folder}", pretrained=True)
    assert type(plain).__name__ == "ResNet" and not bh.sparse_layers(plain)
    wrapped = AutoModelForImageClassification.from_pretrained(timm_folder)
    assert isinstance(wrapped, TimmWrapperForImageClassification)
    for name, layer in bh.sparse_layers(timm_model).items():
        assert torch.equal(plain.get_submodule(name).weight, layer.sparse_weight())
        assert torch.equal(wrapped.timm_model.get_submodule(name).weight, layer.sparse_weight())
        assert _plain_max_nonzeros(plain.get_submodule(name).weight) <= 2
    torch.testing.assert_close(_eval_logits(plain, x), expected)
    torch.testing.assert_close(_eval_logits(wrapped, x), expected)


def test_timm_wrapper_saves_in_timm_format(tmp_path, x):
    model = _train(bh.sparsify(models.timm_wrapper("test_resnet", num_labels=5), CONFIG))
    folder = save_sparse_model(model, tmp_path / "wrapper")
    state = load_file(os.path.join(folder, "model.safetensors"))
    assert not [k for k in state if k.startswith("timm_model.")]
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    assert config["architecture"] == "test_resnet" and config["model_type"] == "timm_wrapper"
    with open(os.path.join(folder, "bimask_config.json")) as f:
        meta = json.load(f)
    assert all(n.startswith("timm_model.") for n in meta["sparse_layers"])
    plain = timm.create_model(f"local-dir:{folder}", pretrained=True)
    torch.testing.assert_close(_eval_logits(plain, x), _eval_logits(model, x))
    loaded = load_sparse_model(folder)
    assert isinstance(loaded, TimmWrapperForImageClassification)
    assert sorted(bh.sparse_layers(loaded)) == meta["sparse_layers"]
    # The same folder through timm: layer names lose the wrapper prefix.
    as_timm = bh.sparsify(plain, bh.BiMaskConfig(target_modules=["layer1.0.conv1"]))
    assert "layer1.0.conv1" in bh.sparse_layers(as_timm)


def test_transformers_vit_round_trip(vit_model, vit_folder, x):
    plain = AutoModelForImageClassification.from_pretrained(vit_folder)
    assert isinstance(plain, ViTForImageClassification) and not bh.sparse_layers(plain)
    torch.testing.assert_close(_eval_logits(plain, x), _eval_logits(vit_model, x))
    names = list(bh.sparse_layers(vit_model))
    for name in names:
        assert _plain_max_nonzeros(plain.get_submodule(name).weight) <= 2
    loaded = load_sparse_model(vit_folder)
    assert sorted(bh.sparse_layers(loaded)) == sorted(names)
    assert loaded.bimask_config.n == 2 and loaded.bimask_config.num_permutations == 4
    assert set(bh.check_nm(loaded, 2, 4)) == set(names)
    torch.testing.assert_close(_eval_logits(loaded, x), _eval_logits(vit_model, x))


def test_cifar_model_round_trip_through_timm_wrapper(tmp_path, x):
    import bimask_hf.models  # noqa: F401  (registers the CIFAR architectures with timm)

    model = _train(bh.sparsify(models.timm_model("resnet8_cifar", num_classes=5), CONFIG))
    folder = save_sparse_model(model, tmp_path / "cifar")
    loaded = load_sparse_model(folder, model_class=AutoModelForImageClassification)
    assert isinstance(loaded, TimmWrapperForImageClassification)
    assert len(bh.sparse_layers(loaded)) == len(bh.sparse_layers(model))
    torch.testing.assert_close(_eval_logits(loaded, x), _eval_logits(model, x))


def test_cifar_model_loads_with_timm_create_model(tmp_path):
    import bimask_hf.models  # noqa: F401

    model = bh.sparsify(models.timm_model("resnet8_cifar", num_classes=5), CONFIG)
    folder = save_sparse_model(model, tmp_path / "cifar")
    loaded = load_sparse_model(folder)
    assert type(loaded).__name__ == "CifarResNet" and bh.sparse_layers(loaded)


def test_loaded_model_fine_tunes_with_the_same_pattern(timm_folder):
    model = load_sparse_model(timm_folder)
    assert {layer.effective_mode for layer in bh.sparse_layers(model).values()} == {"bimask"}
    _train(model, steps=2)
    bh.check_nm(model, 2, 4)
    merged = bh.merge(copy.deepcopy(model))
    bh.check_nm(merged, 2, 4)


def test_load_with_explicit_model_class(timm_folder):
    model = load_sparse_model(timm_folder, model_class=AutoModelForImageClassification)
    assert isinstance(model, TimmWrapperForImageClassification)
    assert all(name.startswith("timm_model.") for name in bh.sparse_layers(model))


def test_dense_mode_saves_without_sparse_layers(tmp_path):
    model = bh.sparsify(models.timm_model("test_resnet", num_classes=5), bh.BiMaskConfig(mode="dense"))
    folder = save_sparse_model(model, tmp_path / "dense")
    assert bh.BiMaskConfig.load_json(folder)["sparse_layers"] == []
    assert not bh.sparse_layers(load_sparse_model(folder))


def test_save_rejects_unpatched_models_and_pickles(tmp_path):
    with pytest.raises(ValueError, match="needs a BiMaskConfig"):
        save_sparse_model(models.timm_model("test_resnet"), tmp_path / "a")
    with pytest.raises(ValueError, match="no Bi-Mask layers"):
        save_sparse_model(models.timm_model("test_resnet"), tmp_path / "b", config=CONFIG)
    with pytest.raises(TypeError, match="transformers PreTrainedModels and timm models"):
        save_sparse_model(bh.sparsify(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), bh.BiMaskConfig(target_modules=["0"])), tmp_path / "c")
    model = bh.sparsify(models.timm_model("test_resnet", num_classes=5), CONFIG)
    with pytest.warns(UserWarning, match="always writes safetensors"):
        folder = save_sparse_model(model, tmp_path / "d", safe_serialization=False)
    assert not [f for f in os.listdir(folder) if f.endswith((".bin", ".pth", ".pt"))]
    unstructured = bh.sparsify(models.timm_model("test_resnet", num_classes=5), bh.BiMaskConfig(density=0.5))
    with pytest.raises(ValueError, match="compressed=True stores N:M"):
        save_sparse_model(unstructured, tmp_path / "e", compressed=True)


def test_unstructured_round_trip(tmp_path):
    model = bh.sparsify(models.timm_model("test_resnet", num_classes=5), bh.BiMaskConfig(density=0.3))
    folder = save_sparse_model(model, tmp_path / "u")
    loaded = load_sparse_model(folder)
    assert {layer.pattern for layer in bh.sparse_layers(loaded).values()} == {"30% unstructured"}
    assert "unstructured-sparsity" in metadata_load(os.path.join(folder, "README.md"))["tags"]



def test_unstructured_checkpoint_with_one_extra_nonzero_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = bh.sparsify(models.timm_model("test_resnet", num_classes=5), bh.BiMaskConfig(density=0.3))
    folder = save_sparse_model(model, tmp_path / "u")
    layer = bh.BiMaskConfig.load_json(folder)["sparse_layers"][0]
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    weight = tensors[f"{layer}.weight"].clone()
    flat = weight.view(-1)
    flat[int((flat == 0).nonzero()[0])] = 1e-3  # one pruned weight comes back
    tensors[f"{layer}.weight"] = weight
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(bh.NMPatternError, match=f"'{layer}'.*more than density 0.3"):
        load_sparse_model(folder)


# ---- compressed ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_compressed_folder_restores_bit_exact_weights(vit_model, timm_model, tmp_path, dtype):
    for name, model in (("vit", vit_model), ("timm", timm_model)):
        model = copy.deepcopy(model).to(dtype)
        dense = save_sparse_model(model, tmp_path / f"{name}-dense")
        packed = save_sparse_model(model, tmp_path / f"{name}-nm", compressed=True)
        files = os.listdir(packed)
        assert NM_WEIGHTS_NAME in files and "model.safetensors" not in files
        assert os.path.getsize(os.path.join(packed, NM_WEIGHTS_NAME)) < os.path.getsize(
            os.path.join(dense, "model.safetensors")
        )
        meta = bh.BiMaskConfig.load_json(packed)
        assert meta["weights_format"] == "nm-compressed" and meta["compression"]["ratio"] < 0.8
        assert len(meta["compression"]["compressed_keys"]) >= len(meta["sparse_layers"])
        from_dense, from_packed = load_sparse_model(dense), load_sparse_model(packed)
        sd_dense, sd_packed = from_dense.state_dict(), from_packed.state_dict()
        assert set(sd_dense) == set(sd_packed)
        for key, value in sd_dense.items():
            assert value.dtype == sd_packed[key].dtype
            assert torch.equal(value.view(torch.uint8) if value.is_floating_point() else value,
                               sd_packed[key].view(torch.uint8) if value.is_floating_point() else sd_packed[key]), key
        card = open(os.path.join(packed, "README.md")).read()
        assert "model.nm.safetensors" in card and "from_pretrained(" not in card


# ---- errors -------------------------------------------------------------------------------------


def _copy(folder: str, tmp_path, name: str) -> str:
    return shutil.copytree(folder, tmp_path / name)


def test_non_nm_checkpoint_names_the_layer(timm_folder, tmp_path):
    folder = _copy(timm_folder, tmp_path, "tampered")
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    state["layer2.0.conv1.weight"] = torch.randn_like(state["layer2.0.conv1.weight"])
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(bh.NMPatternError, match="'layer2.0.conv1'.*resparsify=True"):
        load_sparse_model(folder)
    model = load_sparse_model(folder, resparsify=True)
    layer = bh.sparse_layers(model)["layer2.0.conv1"]
    assert _plain_max_nonzeros(layer.sparse_weight()) <= 2


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
@pytest.mark.parametrize("compressed", [False, True])
def test_corrupted_weights_name_the_file(timm_model, tmp_path, damage, compressed):
    folder = save_sparse_model(timm_model, tmp_path / "broken", compressed=compressed)
    name = NM_WEIGHTS_NAME if compressed else "model.safetensors"
    path = os.path.join(folder, name)
    if damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    else:
        with open(path, "wb") as f:
            f.write(b"\x00not a safetensors file" * 8)
    with pytest.raises(CorruptCheckpointError, match=rf"{name}.*Re-download.*re-save"):
        load_sparse_model(folder)


def test_missing_bimask_config_is_explained(timm_folder, tmp_path):
    folder = _copy(timm_folder, tmp_path, "plain")
    os.remove(os.path.join(folder, "bimask_config.json"))
    with pytest.raises(FileNotFoundError, match="no bimask_config.json.*sparsify"):
        load_sparse_model(folder)


def test_missing_folder_and_pickle_only_folder(timm_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sparse_model(str(tmp_path / "nope" / "model"))
    folder = _copy(timm_folder, tmp_path, "pickled")
    os.remove(os.path.join(folder, "model.safetensors"))
    open(os.path.join(folder, "pytorch_model.bin"), "wb").close()
    with pytest.raises(FileNotFoundError, match="pickle checkpoints.*never loads"):
        load_sparse_model(folder)


# ---- model cards --------------------------------------------------------------------------------


def test_card_metadata_and_model_index(timm_folder):
    meta = metadata_load(os.path.join(timm_folder, "README.md"))
    assert meta["library_name"] == "timm" and meta["pipeline_tag"] == "image-classification"
    assert meta["license"] == "apache-2.0" and meta["base_model"] == "timm/resnet18.a1_in1k"
    assert meta["datasets"] == ["cifar10"]
    assert {"bimask", "n:m-sparsity", "2:4-sparsity", "image-classification"} <= set(meta["tags"])
    (entry,) = meta["model-index"]
    assert entry["name"] == "resnet-2-4"
    (result,) = entry["results"]
    assert result["task"]["type"] == "image-classification"
    assert result["dataset"] == {"name": "CIFAR-10", "type": "cifar10", "split": "test"}
    assert {(m["name"], m["type"], m["value"]) for m in result["metrics"]} == {
        ("Top-1 accuracy", "accuracy", 71.25),
        ("Top-5 accuracy", "accuracy", 90.5),
    }
    card = ModelCard.load(os.path.join(timm_folder, "README.md"))
    assert {(r.metric_name, r.metric_value) for r in card.data.eval_results} == {
        ("Top-1 accuracy", 71.25), ("Top-5 accuracy", 90.5)
    }
    text = card.text
    for needle in (
        "2:4", "`bimask`", "`layer2.0.conv1`", "learning_rate | 0.1", "| CIFAR-10 | test | 71.25 | 90.50 |",
        'timm.create_model("hf-hub:bimask-test/resnet-2-4"', 'AutoModelForImageClassification.from_pretrained(',
        'load_sparse_model("bimask-test/resnet-2-4")', "BiMaskTrainer", "2302.06058",
        "Bi-directional Masks for Efficient N:M Sparse Training", "Zhang, Yuxin and Luo, Yiting and Lin, Mingbao",
    ):
        assert needle in text, needle


def test_create_model_card_from_report_and_transformers_library(vit_model):
    card = create_model_card(
        bh.report(vit_model), CONFIG, model_name="vit", library_name="transformers",
        metrics={"eval_top1": 50.0, "dataset": "cifar10", "split": "test"},
    )
    assert card.data.library_name == "transformers"
    assert [r.metric_name for r in card.data.eval_results] == ["Top-1 accuracy"]
    # No repo id given: the snippets say where the namespace goes instead of naming a repo that does not exist.
    assert "hf-hub:" not in card.text and 'from_pretrained("<namespace>/vit")' in card.text
    assert create_model_card(vit_model, CONFIG, model_name="v").data.library_name == "transformers"
    assert create_model_card(vit_model, CONFIG, model_name="v").data.eval_results is None
    with pytest.raises(ValueError, match="library_name"):
        create_model_card(bh.report(vit_model), CONFIG, model_name="vit")
    # Results on data without a name: in the table, not in the model-index (which needs a dataset id).
    unnamed = create_model_card(vit_model, CONFIG, model_name="vit", metrics={"top1": 1.0, "split": "eval"})
    assert unnamed.data.eval_results is None and "| unnamed dataset | eval | 1.00 | - |" in unnamed.text
    assert "evaluation set" not in unnamed.text


def test_update_card_results_rewrites_model_index_and_table(timm_folder, tmp_path):
    folder = _copy(timm_folder, tmp_path, "card")
    update_card_results(folder, {"eval_top1": 72.5, "eval_top5": 91.0}, "cifar10", "test", dataset_name="CIFAR-10")
    update_card_results(folder, {"top1": 60.0}, "cifar100", "validation")
    card = ModelCard.load(os.path.join(folder, "README.md"))
    got = {(r.dataset_type, r.dataset_split, r.metric_name): r.metric_value for r in card.data.eval_results}
    assert got == {
        ("cifar10", "test", "Top-1 accuracy"): 72.5,
        ("cifar10", "test", "Top-5 accuracy"): 91.0,
        ("cifar100", "validation", "Top-1 accuracy"): 60.0,
    }
    assert "| CIFAR-10 | test | 72.50 | 91.00 |" in card.text
    assert "| cifar100 | validation | 60.00 | - |" in card.text
    assert "71.25" not in card.text
    assert card.text.count("## Results") == 1
    with pytest.raises(ValueError, match="no top-1/top-5"):
        update_card_results(folder, {"loss": 1.0}, "cifar10", "test")


# ---- a real Hub API on loopback -----------------------------------------------------------------

_HUB_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import timm, torch
    from huggingface_hub import ModelCard, hf_hub_download
    from huggingface_hub.repocard import metadata_load
    from transformers import AutoModelForImageClassification

    def max_nonzeros(w):
        mat = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1) if w.dim() == 4 else w
        return int((mat.reshape(mat.shape[0], -1, 4) != 0).sum(-1).max())

    out = {}
    # 1. Plain libraries only: bimask_hf is not imported yet.
    for repo in ("bimask-test/resnet-2-4", "bimask-test/vit-2-4"):
        layers = json.load(open(hf_hub_download(repo, "bimask_config.json")))["sparse_layers"]
        model = AutoModelForImageClassification.from_pretrained(repo)
        out[repo] = {"class": type(model).__name__, "layers": len(layers),
                     "max_nonzeros": max(max_nonzeros(model.get_submodule(
                         ("timm_model." if hasattr(model, "timm_model") else "") + n).weight) for n in layers)}
        readme = hf_hub_download(repo, "README.md")
        out[repo]["metadata"] = metadata_load(readme)
        card = ModelCard.load(repo)
        out[repo]["card_results"] = sorted((r.metric_name, r.metric_value) for r in card.data.eval_results)
    plain = timm.create_model("hf-hub:bimask-test/resnet-2-4", pretrained=True)
    out["timm"] = {"class": type(plain).__name__, "max_nonzeros": max_nonzeros(plain.layer2[0].conv1.weight)}
    assert "bimask_hf" not in sys.modules
    # 2. bimask-hf: load by repo id, fine-tune a few steps with BiMaskTrainer, the pattern still holds.
    import datasets
    import bimask_hf as bh
    from bimask_hf import BiMaskTrainer, BiMaskTrainingArguments
    gen = torch.Generator().manual_seed(0)
    train = datasets.Dataset.from_dict({
        "pixel_values": torch.randn(16, 3, 32, 32, generator=gen).numpy(),
        "labels": torch.randint(0, 5, (16,), generator=gen).tolist(),
    }).with_format("torch")
    for repo in ("bimask-test/resnet-2-4", "bimask-test/vit-2-4"):
        model = bh.load_sparse_model(repo, model_class=AutoModelForImageClassification)
        n_layers = len(bh.sparse_layers(model))
        args = BiMaskTrainingArguments(
            output_dir=sys.argv[1] + "/" + repo.split("/")[1], max_steps=3, per_device_train_batch_size=4,
            learning_rate=0.05, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
            permutation_interval=2, permutation_search="random", num_permutations=4, disable_tqdm=True)
        trainer = BiMaskTrainer(model=model, args=args, train_dataset=train)
        trainer.train()
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        same_config = trainer.bimask_config == model.bimask_config and len(bh.sparse_layers(model)) == n_layers
        checked = bh.check_nm(bh.merge(model), 2, 4)
        out[repo]["finetune"] = {"losses": losses, "checked": len(checked), "same_config": same_config}
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def local_hub(tmp_path_factory, timm_folder, vit_folder):
    root = str(tmp_path_factory.mktemp("olah"))
    with serve_local_repos(root) as hub:
        hub.add_model_repo("bimask-test/resnet-2-4", timm_folder)
        hub.add_model_repo("bimask-test/vit-2-4", vit_folder)
        plain = os.path.join(root, "plain")
        shutil.copytree(timm_folder, plain, ignore=shutil.ignore_patterns("bimask_config.json"))
        hub.add_model_repo("bimask-test/no-config", plain)
        yield hub


def test_hub_round_trip_in_a_fresh_process(local_hub, tmp_path):
    script = tmp_path / "hub_client.py"
    script.write_text(_HUB_SCRIPT)
    env = {**os.environ, "HF_ENDPOINT": local_hub.endpoint, "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ft")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    out = json.loads(line.removeprefix("RESULT "))
    rn, vit = out["bimask-test/resnet-2-4"], out["bimask-test/vit-2-4"]
    assert rn["class"] == "TimmWrapperForImageClassification" and vit["class"] == "ViTForImageClassification"
    assert out["timm"] == {"class": "ResNet", "max_nonzeros": 2}
    for repo in (rn, vit):
        assert repo["layers"] > 0 and repo["max_nonzeros"] <= 2
        assert repo["card_results"] == [["Top-1 accuracy", 71.25], ["Top-5 accuracy", 90.5]]
        assert repo["metadata"]["pipeline_tag"] == "image-classification"
        assert "2:4-sparsity" in repo["metadata"]["tags"]
        assert repo["finetune"]["checked"] == repo["layers"] and repo["finetune"]["same_config"]
        assert len(repo["finetune"]["losses"]) == 3
        assert all(loss == loss and loss < 100 for loss in repo["finetune"]["losses"])
    assert rn["metadata"]["library_name"] == "timm" and vit["metadata"]["library_name"] == "transformers"


@pytest.fixture
def loopback_online(local_hub, monkeypatch):
    """The loopback Hub, reachable even when the suite runs with ``HF_HUB_OFFLINE=1`` (no network is
    needed: the server is on this machine; huggingface_hub reads the variable once, at import)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_ENDPOINT", local_hub.endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return local_hub


def test_hub_endpoint_is_read_at_call_time(loopback_online, tmp_path):
    model = load_sparse_model("bimask-test/resnet-2-4", cache_dir=str(tmp_path / "cache"))
    assert "layer2.0.conv1" in bh.sparse_layers(model)
    with pytest.raises(FileNotFoundError, match="'bimask-test/no-config' has no bimask_config.json"):
        load_sparse_model("bimask-test/no-config", cache_dir=str(tmp_path / "cache"))


def test_is_bimask_folder_answers_for_folders_and_hub_ids(loopback_online, timm_folder, tmp_path):
    # The one "is this a bimask folder?" check (bimask-train's --pretrained_path and bimask-eval use it).
    from bimask_hf.hub.files import is_bimask_folder

    plain = _copy(timm_folder, tmp_path, "plain")
    os.remove(os.path.join(plain, "bimask_config.json"))
    assert is_bimask_folder(timm_folder) and not is_bimask_folder(plain)
    assert not is_bimask_folder(str(tmp_path / "missing" / "folder"))
    cache = str(tmp_path / "cache")
    assert is_bimask_folder("bimask-test/resnet-2-4", cache_dir=cache)
    assert not is_bimask_folder("bimask-test/no-config", cache_dir=cache)
    assert not is_bimask_folder("bimask-test/not-a-repo", cache_dir=cache)


def test_weight_to_matrix_matches_plain_check():
    # The plain-torch group count used above agrees with the library's channels_last layout.
    w = torch.randn(8, 4, 3, 3)
    assert torch.equal(weight_to_matrix(w, "channels_last"), w.permute(0, 2, 3, 1).reshape(8, -1))


def test_card_says_to_import_bimask_hf_for_its_own_architectures():
    cifar = bh.sparsify(models.timm_model("resnet8_cifar"), CONFIG)
    plain = bh.sparsify(models.timm_model("resnet18"), CONFIG)
    assert "import bimask_hf  # registers resnet8_cifar" in str(create_model_card(cifar, CONFIG, model_name="c"))
    assert "import bimask_hf  #" not in str(create_model_card(plain, CONFIG, model_name="p"))


def test_save_unwraps_data_parallel_and_compiled_models(tmp_path):
    model = bh.sparsify(models.timm_model("test_resnet", num_classes=5), CONFIG)
    plain = load_file(os.path.join(save_sparse_model(model, tmp_path / "plain"), "model.safetensors"))
    for name, wrapped in (("dp", nn.DataParallel(model)), ("compiled", torch.compile(model))):
        folder = save_sparse_model(wrapped, tmp_path / name, config=CONFIG)
        saved = load_file(os.path.join(folder, "model.safetensors"))
        assert saved.keys() == plain.keys() and all(torch.equal(saved[k], plain[k]) for k in plain), name


def test_model_family_helpers_tell_timm_from_transformers(timm_model, vit_model):
    from bimask_hf.families import is_timm_wrapper, model_family, reads_as_timm, takes_pixel_values

    wrapper = models.timm_wrapper("resnet8_cifar", num_labels=3)
    assert [model_family(m) for m in (timm_model, vit_model, wrapper)] == ["timm", "transformers", "transformers"]
    assert [is_timm_wrapper(m) for m in (timm_model, vit_model, wrapper)] == [False, False, True]
    assert [reads_as_timm(m) for m in (timm_model, vit_model, wrapper)] == [True, False, True]
    assert [takes_pixel_values(m) for m in (timm_model, vit_model, wrapper)] == [False, True, True]
    with pytest.raises(TypeError, match="Wrap a timm model with TimmWrapperForImageClassification"):
        model_family(nn.Linear(2, 2))


# ---- guards from the mutation audit ---------------------------------------------------------------

def test_a_merged_layer_that_lost_its_pattern_is_refused_at_save_not_at_load(timm_model, tmp_path):
    """A model merged earlier and then changed densely: the save says which layer, and writes nothing."""
    model = bh.merge(copy.deepcopy(timm_model))
    name = model.bimask_sparse_layers[0]
    with torch.no_grad():
        model.get_submodule(name).weight.add_(0.01)  # every pruned weight is nonzero again
    with pytest.raises(bh.NMPatternError, match=f"'{name}'"):
        save_sparse_model(model, tmp_path / "saved", config=CONFIG)
    assert not (tmp_path / "saved").exists() or not any((tmp_path / "saved").iterdir())


def test_a_compressed_load_records_the_real_folder(vit_model, timm_model, tmp_path):
    """The weights are decompressed into a temporary folder; the model must point at the real one
    (LoRA and the Hub helpers read bimask_config.json from where the model says it came from)."""
    vit = load_sparse_model(save_sparse_model(vit_model, tmp_path / "vit-nm", compressed=True))
    assert vit.config._name_or_path == str(tmp_path / "vit-nm")
    timm_loaded = load_sparse_model(save_sparse_model(timm_model, tmp_path / "timm-nm", compressed=True))
    assert timm_loaded.pretrained_cfg.get("file") in (None, str(tmp_path / "timm-nm"))
