"""The plain libraries' save calls on a model under Bi-Mask training write the published sparse model.

transformers' ``save_pretrained`` / ``push_to_hub`` and timm's ``save_for_hf`` must write the merged,
exact N:M weights without ``bimask_permutation`` buffers (``save_sparse_model``'s folder), never the dense
training state, which only checkpoints keep. Pushes go to the loopback Hub (``tests/olah_server.py``).
"""

from __future__ import annotations

import json
import os

import pytest
import timm
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification

import bimask_hf as bh
from bimask_hf.hub import load_sparse_model, save_sparse_model
from bimask_hf.layers import PERMUTATION_KEY
from bimask_hf.patching import training_state

from . import models
from .olah_server import serve_local_repos, use_endpoint
from .test_hub import CONFIG, _eval_logits, _plain_max_nonzeros, _train

FAMILIES = {
    "vit": lambda: models.tiny_vit(num_labels=5),
    "timm_wrapper": lambda: models.timm_wrapper("test_resnet", num_labels=5),
}
DATA_CONFIG = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
               "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}


@pytest.fixture()
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _files(folder: str) -> dict[str, object]:
    """Every file of a saved folder, comparable: tensors, parsed JSON, card metadata and body."""
    out: dict[str, object] = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".safetensors"):
            out[name] = load_file(path)
        elif name.endswith(".json"):
            with open(path) as f:
                out[name] = json.load(f)
        elif name == "README.md":
            card = ModelCard.load(path)
            out[name] = (card.data.to_dict(), card.text.replace(os.path.basename(folder), "<name>"))
        else:
            out[name] = open(path, "rb").read()
    return out


def _assert_same_folders(a: str, b: str) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        if name.endswith(".safetensors"):
            ta, tb = fa[name], fb[name]
            assert sorted(ta) == sorted(tb), name  # type: ignore[arg-type]
            assert all(torch.equal(ta[k], tb[k]) for k in ta), name  # type: ignore[index]
        elif name == "README.md":
            assert fa[name][0] | {"model_name": None} == fb[name][0] | {"model_name": None}  # type: ignore[index]
        else:
            assert fa[name] == fb[name], name


@pytest.mark.parametrize("family", list(FAMILIES))
def test_plain_save_pretrained_writes_the_sparse_folder(family, tmp_path, x):
    model = _train(bh.sparsify(FAMILIES[family](), CONFIG))
    training_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "plain")
    reference = save_sparse_model(model, tmp_path / "reference")
    _assert_same_folders(str(tmp_path / "plain"), reference)
    state = load_file(tmp_path / "plain" / "model.safetensors")
    assert not [k for k in state if k.endswith(PERMUTATION_KEY)]
    # The plain library reads it back: no unexpected keys, the logits of the sparse model.
    plain = AutoModelForImageClassification.from_pretrained(tmp_path / "plain")
    torch.testing.assert_close(_eval_logits(plain, x), _eval_logits(model, x), rtol=0, atol=1e-6)
    assert bh.sparse_layers(load_sparse_model(tmp_path / "plain"))
    # The caller's model keeps training: its state dict is still the dense training state.
    after = model.state_dict()
    assert sorted(after) == sorted(training_state) and any(k.endswith(PERMUTATION_KEY) for k in after)
    assert all(torch.equal(after[k], v) for k, v in training_state.items())


def test_training_state_context_saves_the_checkpoint_format(tmp_path):
    model = _train(bh.sparsify(models.tiny_vit(num_labels=5), CONFIG))
    with training_state(model):
        model.save_pretrained(tmp_path / "ckpt")
    state = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert [k for k in state if k.endswith(PERMUTATION_KEY)]
    assert not os.path.exists(tmp_path / "ckpt" / "bimask_config.json")
    model.save_pretrained(tmp_path / "after")  # the context is left: published format again
    assert not [k for k in load_file(tmp_path / "after" / "model.safetensors") if k.endswith(PERMUTATION_KEY)]


def test_save_pretrained_refuses_what_save_sparse_model_cannot_write(tmp_path):
    model = bh.sparsify(models.tiny_vit(num_labels=5), CONFIG)
    with pytest.raises(ValueError, match="bimask_hf.save_sparse_model"):
        model.save_pretrained(tmp_path / "out", state_dict=model.state_dict())
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


def test_merged_model_saves_with_its_own_save_pretrained(tmp_path):
    model = bh.merge(bh.sparsify(models.tiny_vit(num_labels=5), CONFIG))
    assert "save_pretrained" not in vars(model)
    model.save_pretrained(tmp_path / "merged")
    assert not os.path.exists(tmp_path / "merged" / "bimask_config.json")  # transformers' own files


def test_timm_save_for_hf_writes_merged_nm_weights(tmp_path, x):
    from timm.models import save_for_hf

    model = _train(bh.sparsify(models.timm_model("test_resnet", num_classes=5), CONFIG))
    with pytest.warns(UserWarning, match="save_sparse_model"):
        save_for_hf(model, tmp_path / "timm", safe_serialization=True)
    state = load_file(tmp_path / "timm" / "model.safetensors")
    assert not [k for k in state if k.endswith(PERMUTATION_KEY)]
    assert max(_plain_max_nonzeros(state[f"{name}.weight"]) for name in bh.sparse_layers(model)) == 2
    plain = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True)
    torch.testing.assert_close(_eval_logits(plain, x), _eval_logits(model, x), rtol=0, atol=1e-6)
    assert any(k.endswith(PERMUTATION_KEY) for k in model.state_dict())  # the training state is kept


def test_reloaded_folder_keeps_its_preprocessing_when_saved_again(tmp_path):
    model = bh.sparsify(models.tiny_vit(num_labels=5), CONFIG)
    first = save_sparse_model(model, tmp_path / "first", data_config=DATA_CONFIG)
    loaded = load_sparse_model(first)
    again = save_sparse_model(loaded, tmp_path / "again")
    loaded.save_pretrained(tmp_path / "plain")
    expected = json.loads(open(os.path.join(first, "preprocessor_config.json")).read())
    for folder in (again, str(tmp_path / "plain")):
        with open(os.path.join(folder, "preprocessor_config.json")) as f:
            assert json.load(f) == expected


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with serve_local_repos(str(tmp_path_factory.mktemp("olah"))) as served:
        yield served


def test_push_to_hub_uploads_the_sparse_folder(hub, tmp_path, monkeypatch, x):
    use_endpoint(monkeypatch, hub.endpoint)
    model = _train(bh.sparsify(models.tiny_vit(num_labels=5), CONFIG))
    model.push_to_hub("vit-pushed", token="hf_loopback", tags=["my-tag"])
    save_sparse_model(model, tmp_path / "org-vit", push_to_hub=True, repo_id="org/vit-saved", token="hf_loopback")
    expected = sorted(os.listdir(tmp_path / "org-vit"))
    for repo in ("bimask-user/vit-pushed", "org/vit-saved"):
        assert hub.repo_files(repo) == expected
        cache = str(tmp_path / "cache")
        card = ModelCard.load(os.path.join(hub.mirrors, "models", repo, "README.md"))  # as pushed
        assert f'from_pretrained("{repo}")' in card.text and "2:4-sparsity" in card.data.tags
        plain = AutoModelForImageClassification.from_pretrained(repo, cache_dir=cache)
        torch.testing.assert_close(_eval_logits(plain, x), _eval_logits(model, x), rtol=0, atol=1e-6)
        assert bh.sparse_layers(load_sparse_model(repo, cache_dir=cache))
    assert "my-tag" in ModelCard.load(os.path.join(hub.mirrors, "models/bimask-user/vit-pushed/README.md")).data.tags


def test_plain_trainer_checkpoints_keep_the_training_state(tmp_path):
    """A plain transformers Trainer with BiMaskCallback: its checkpoints (save_pretrained) hold the dense
    weights and permutations that resuming needs; its final save_model writes the sparse folder."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from bimask_hf.trainer import BiMaskCallback

    gen = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"pixel_values": torch.randn(8, 3, 32, 32, generator=gen).numpy(),
                              "labels": torch.randint(0, 5, (8,), generator=gen).tolist()}).with_format("torch")
    model = bh.sparsify(models.tiny_vit(num_labels=5), CONFIG)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                             save_strategy="steps", save_steps=2, use_cpu=True, report_to="none", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[BiMaskCallback(model, CONFIG)])
    trainer.train()
    checkpoint = load_file(tmp_path / "out" / "checkpoint-2" / "model.safetensors")
    assert [k for k in checkpoint if k.endswith(PERMUTATION_KEY)]
    trainer.save_model(str(tmp_path / "final"))
    assert not [k for k in load_file(tmp_path / "final" / "model.safetensors") if k.endswith(PERMUTATION_KEY)]
    assert os.path.isfile(tmp_path / "final" / "bimask_config.json")
