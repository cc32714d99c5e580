"""Every documented input works or is refused clearly: --model with a transformers folder or Hub id,
--pretrained_path with a timm save_for_hf folder, NaN/inf weights and losses, a full disk at the final
save, recipe values of the wrong type."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors import SafetensorError
from timm.models import save_for_hf

import bimask_hf as bh
from bimask_hf import BiMaskTrainer, BiMaskTrainingArguments, create_model, load_image_classification_data
from bimask_hf.errors import NonFiniteError
from bimask_hf.storage import StorageError
from bimask_hf.train import build, main, parse_args

from . import models
from .olah_server import serve_local_repos, use_endpoint
from .test_recipes import assert_trained, card_hyperparameters

RUN = ["--dataset", "digits", "--max_steps", "2", "--max_train_samples", "32", "--max_eval_samples", "16",
       "--per_device_train_batch_size", "16", "--permutation_search", "random", "--num_permutations", "2",
       "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true", "--dataloader_num_workers", "0"]


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _same_weights(model: torch.nn.Module, reference: torch.nn.Module, suffix: str) -> bool:
    ours = {n.removeprefix("timm_model."): p for n, p in model.state_dict().items() if n.endswith(suffix)}
    theirs = {n: p for n, p in reference.state_dict().items() if n.endswith(suffix)}
    assert ours.keys() == theirs.keys() and ours
    return all(torch.equal(ours[n], theirs[n]) for n in ours)


def test_model_flag_takes_a_transformers_folder(tmp_path, offline):
    folder = tmp_path / "vit"
    saved = models.tiny_vit()
    saved.save_pretrained(folder)
    argv = [*RUN, "--model", str(folder), "--output_dir", str(tmp_path / "out")]
    data, trainer = build(*parse_args(argv))
    assert type(trainer.model).__name__ == "ViTForImageClassification"
    assert data.data_config["input_size"] == (3, 32, 32)  # the model's image size, from its config
    assert _same_weights(trainer.model, saved, "patch_embeddings.projection.weight")  # its weights, not random
    main(argv)
    assert_trained(tmp_path / "out", steps=2, n=2, m=4)


def test_model_flag_takes_a_hub_id(tmp_path, offline, monkeypatch):
    folder = tmp_path / "vit"
    models.tiny_vit().save_pretrained(folder)
    with serve_local_repos(str(tmp_path / "hub")) as hub:
        hub.add_model_repo("bimask-test/tiny-vit", str(folder))
        use_endpoint(monkeypatch, hub.endpoint)
        main([*RUN, "--model", "bimask-test/tiny-vit", "--pretrained", "true", "--output_dir", str(tmp_path / "out")])
    assert_trained(tmp_path / "out", steps=2, n=2, m=4)
    assert "bimask-test/tiny-vit" in (tmp_path / "out" / "README.md").read_text()  # the card's base model


def test_pretrained_path_takes_a_timm_save_for_hf_folder(tmp_path, offline):
    folder = tmp_path / "timm"
    saved = timm.create_model("resnet8_cifar", num_classes=10, base_width=8)
    save_for_hf(saved, str(folder), safe_serialization=True)  # records num_classes in model_args too
    argv = [*RUN, "--pretrained_path", str(folder), "--image_size", "16", "--output_dir", str(tmp_path / "out")]
    _, trainer = build(*parse_args(argv))
    assert _same_weights(trainer.model, saved, "conv1.weight")
    main(argv)
    assert_trained(tmp_path / "out", steps=2, n=2, m=4)


# ---- NaN / inf ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    return load_image_classification_data("digits", image_size=8, in_chans=3, seed=0, rank=0, world_size=1,
                                          max_train_samples=64, max_eval_samples=16)


def _model(digits):
    return create_model("resnet8_cifar", labels=digits.labels, model_args={"base_width": 8})


def test_sparsify_refuses_nonfinite_weights_naming_the_layer(digits):
    model = _model(digits)
    with torch.no_grad():
        model.timm_model.layer2[0].conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"timm_model\.layer2\.0\.conv1.*NaN or inf"):
        bh.sparsify(model, bh.BiMaskConfig())
    assert not bh.sparse_layers(model)


def test_a_nonfinite_loss_stops_training_at_its_step(tmp_path, digits):
    calls = []

    def collate(examples):  # the third batch is NaN: its loss and gradients are NaN
        batch = digits.collate_fn(examples)
        calls.append(1)
        if len(calls) == 3:
            batch["pixel_values"] = torch.full_like(batch["pixel_values"], float("nan"))
        return batch

    args = BiMaskTrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=16, learning_rate=0.05,
        report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
        permutation_search="random", num_permutations=2, dataloader_num_workers=0,
    )
    trainer = BiMaskTrainer(model=_model(digits), args=args, train_dataset=digits.train_dataset, data_collator=collate)
    with pytest.raises(NonFiniteError, match=r"diverged at optimizer step 3: timm_model\.\S+ .*hold NaN or inf"):
        trainer.train()
    assert trainer.state.global_step == 3
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))  # the steps before were logged


# ---- a full disk at the final save -----------------------------------------------------------------

def test_disk_full_while_writing_the_final_weights_is_the_storage_error(tmp_path, digits, monkeypatch):
    import transformers.modeling_utils

    args = BiMaskTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=16,
                                   report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                                   permutation_search="random", num_permutations=2)
    trainer = BiMaskTrainer(model=_model(digits), args=args, train_dataset=digits.train_dataset,
                            data_collator=digits.collate_fn)
    trainer.train()

    def full(*args, **kwargs):  # what safetensors raises when the disk fills up
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    with pytest.raises(StorageError, match=r"is full.*--output_dir"):
        trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final" / "model.safetensors").exists()


# ---- recipe values of the wrong type ----------------------------------------------------------------

@pytest.mark.parametrize("line,message", [
    ("n: two", "n: 'two' is not an integer"),
    ("n: 2.5", "n: 2.5 is not an integer"),
    ("learning_rate: fast", "learning_rate: 'fast' is not a number"),
    ("bf16: maybe", "bf16: 'maybe' is not true or false"),
    ("eval_strategy: daily", "eval_strategy: 'daily' is not one of ['no', 'steps', 'epoch']"),
])
def test_a_recipe_value_of_the_wrong_type_names_the_file_and_key(tmp_path, capsys, line, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: resnet8_cifar\n{line}\n")
    with pytest.raises(SystemExit) as err:
        parse_args([str(recipe), "--output_dir", str(tmp_path / "out")])
    assert str(err.value) == f"bimask-train: {recipe}: {message}."
    assert "usage:" not in capsys.readouterr().err


def test_card_steps_helper_reads_the_table(tmp_path):
    (tmp_path / "README.md").write_text("| global_steps | 7 |\n| learning_rate | 0.1 |\n")
    assert card_hyperparameters(tmp_path) == {"global_steps": "7", "learning_rate": "0.1"}
