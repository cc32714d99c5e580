"""Saved folders record their preprocessing: pipelines and bimask-eval reproduce the training evaluation."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from huggingface_hub.repocard import metadata_load
from PIL import Image
from transformers import pipeline

import bimask_hf as bh
from bimask_hf import evaluation, load_image_classification_data, save_sparse_model, train
from bimask_hf.hub.preprocessing import PREPROCESSOR_NAME

from . import models

CONFIG = bh.BiMaskConfig(n=2, m=4, permutation_search="random", num_permutations=4)


def _image_folder(root: Path, mode: str, size: tuple[int, int] = (22, 19), per_class: int = 6) -> Path:
    """Class folders of noisy images whose size is not the model's, so resizing and cropping matter."""
    rng = np.random.default_rng(0)
    levels = {"dark": 40, "mid": 128, "light": 215}
    for split, count in (("train", per_class), ("val", per_class)):
        for name, level in levels.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
                arr = np.clip(level + rng.normal(0, 60, shape), 0, 255).astype("uint8")
                Image.fromarray(arr, mode).save(root / split / name / f"{i}.png")
    return root


def _val_images(folder: Path) -> tuple[list[Image.Image], list[str]]:
    paths = sorted(folder.glob("val/*/*.png"))
    return [Image.open(p) for p in paths], [p.parent.name for p in paths]


def _pipeline_scores(folder: str, images: list[Image.Image]) -> torch.Tensor:
    """Class probabilities from ``pipeline("image-classification")``, in class-index order."""
    classify = pipeline("image-classification", model=folder)
    label2id = classify.model.config.label2id
    scores = torch.zeros(len(images), len(label2id))
    for row, image in enumerate(images):
        for item in classify(image, top_k=None):
            scores[row, label2id[item["label"]]] = item["score"]
    return scores


def _direct_scores(model: torch.nn.Module, transform, images: list[Image.Image]) -> torch.Tensor:
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        x = torch.stack([transform(image) for image in images])
        out = model(pixel_values=x) if hasattr(model, "config") else model(x)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return logits.softmax(-1)


def test_main_job_style_one_channel_folder_works_in_pipeline_and_bimask_eval(tmp_path, capsys):
    data = _image_folder(tmp_path / "data", "L")
    out = tmp_path / "run"
    metrics = train.main([
        "--model", "resnet8_cifar", "--model_args", '{"base_width": 8}', "--dataset", str(data), "--in_chans", "1",
        "--image_size", "16", "--max_steps", "6", "--per_device_train_batch_size", "6", "--learning_rate", "0.2",
        "--use_cpu", "true", "--report_to", "none", "--save_strategy", "no", "--output_dir", str(out),
        "--permutation_search", "random", "--num_permutations", "2",
    ])
    cfg = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert cfg["input_size"] == [1, 16, 16] and len(cfg["mean"]) == len(cfg["std"]) == 1
    assert (cfg["crop_pct"], cfg["crop_mode"]) == (1.0, "squash")

    # pipeline(): top-1 on the validation images equals the training evaluation's.
    images, truth = _val_images(data)
    scores = _pipeline_scores(str(out), images)
    names = json.loads((out / "config.json").read_text())["label_names"]
    accuracy = 100.0 * np.mean([names[i] == t for i, t in zip(scores.argmax(-1).tolist(), truth)])
    # A 2-step model can have near-tied classes, which batch size alone may flip: those may differ.
    top2 = scores.topk(2, dim=-1).values
    ties = int(((top2[:, 0] - top2[:, 1]) < 1e-4).sum())
    assert abs(accuracy - metrics["eval_top1"]) <= 100.0 * ties / len(truth) + 1e-9

    reference = bh.load_sparse_model(out)
    transform = load_image_classification_data(str(data), model="resnet8_cifar", image_size=16, in_chans=1).eval_transform
    torch.testing.assert_close(_pipeline_scores(str(out), images), _direct_scores(reference, transform, images),
                               atol=2e-4, rtol=1e-3)

    # bimask-eval with no extra flags reproduces it exactly; --update-card replaces the training result.
    result = evaluation.main([str(out), "--dataset", str(data), "--split", "val", "--update-card"])
    assert result["top1"] == metrics["eval_top1"] and result["top5"] == metrics["eval_top5"]
    evaluation.main([str(out), "--dataset", str(data), "--split", "val", "--update-card", "--max_samples", "9"])
    assert "a subset of 9 images" in capsys.readouterr().out
    results = metadata_load(out / "README.md")["model-index"][0]["results"]
    assert len(results) == 1 and "subset of 9 images" in results[0]["dataset"]["name"]
    assert [m["name"] for m in results[0]["metrics"]] == ["Top-1 accuracy", "Top-5 accuracy"]


@pytest.mark.parametrize("family", ["timm", "timm_wrapper", "vit"])
def test_saved_folder_preprocesses_like_training_in_pipeline(tmp_path, family):
    data_dir = _image_folder(tmp_path / "data", "RGB")
    if family == "timm":
        model = timm.create_model("resnet8_cifar", num_classes=3, base_width=8)
    elif family == "timm_wrapper":
        model = models.timm_wrapper("resnet8_cifar", num_labels=3)
    else:
        model = models.tiny_vit(num_labels=3)
    bh.sparsify(model, CONFIG)
    # imagenet recipe: resize the short side to size / 0.875, centre crop; ViT takes 32 px, the CIFAR nets 24.
    data = load_image_classification_data(
        str(data_dir), model=None if family == "vit" else model, recipe="imagenet",
        image_size=32 if family == "vit" else 24, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3),
    )
    with torch.no_grad():  # batch-norm statistics of real inputs make the outputs depend on the preprocessing
        batch = torch.stack([data.eval_transform(image) for image in _val_images(data_dir)[0]])
        model.train()(batch) if family == "timm" else model.train()(pixel_values=batch)
    folder = save_sparse_model(model, str(tmp_path / family), config=CONFIG, data_config=data.data_config)
    assert (Path(folder, PREPROCESSOR_NAME).is_file()) == (family == "vit")
    images, truth = _val_images(data_dir)
    expected = _direct_scores(model, data.eval_transform, images)
    torch.testing.assert_close(_pipeline_scores(folder, images), expected, atol=2e-4, rtol=1e-3)
    # bimask-eval reads the same preprocessing back from the folder.
    evaluated = evaluation.evaluate_model(folder, str(data_dir), split="val")
    direct = 100.0 * np.mean([data.labels[e] == t for e, t in zip(expected.argmax(-1).tolist(), truth)])
    assert evaluated["top1"] == pytest.approx(direct)


def test_python_api_card_is_true(tmp_path, monkeypatch):
    # Mixed precision set by the launcher's environment, not by --bf16: the card must say what ran.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    data_dir = _image_folder(tmp_path / "data", "RGB")
    data = load_image_classification_data(str(data_dir), image_size=16, seed=0)
    model = bh.create_model("resnet8_cifar", labels=data.labels, model_args={"base_width": 8})
    args = bh.BiMaskTrainingArguments(
        output_dir=str(tmp_path / "ckpt"), max_steps=2, per_device_train_batch_size=6, learning_rate=0.05,
        optim="sgd", use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, eval_strategy="steps",
        eval_steps=1, hub_model_id="bimask-test/resnet8-2-4", permutation_search="random", num_permutations=2,
        disable_tqdm=True,
    )
    trainer = bh.BiMaskTrainer(model=model, args=args, train_dataset=data.train_dataset, eval_dataset=data.eval_dataset,
                               data_collator=data.collate_fn, data_config=data.data_config)
    assert not args.bf16 and trainer.accelerator.mixed_precision == "bf16"
    trainer.train()
    metrics = trainer.evaluate()
    out = tmp_path / "model"
    trainer.save_model(str(out))  # the patched model's save path
    text = (out / "README.md").read_text()
    assert "import bimask_hf  # registers resnet8_cifar with timm" in text
    assert 'pipeline("image-classification", model="bimask-test/resnet8-2-4")' in text
    assert 'from_pretrained("bimask-test/resnet8-2-4")' in text
    assert "| mixed_precision | bf16 |" in text and "| optimizer | sgd |" in text
    assert "OptimizerNames" not in text and "SchedulerType" not in text
    assert "## Training results" in text and "Validation Loss" in text
    assert "## Framework versions" in text and "- Transformers " in text
    results = metadata_load(out / "README.md")["model-index"][0]["results"]
    top1 = {m["name"]: m["value"] for m in results[0]["metrics"]}["Top-1 accuracy"]
    assert top1 == pytest.approx(metrics["eval_top1"]) and results[0]["dataset"]["split"] == "validation"

    packed = save_sparse_model(trainer.model, str(tmp_path / "packed"), compressed=True)
    packed_text = Path(packed, "README.md").read_text()
    assert "only bimask-hf loads this folder" in packed_text and 'pipeline("image-classification"' not in packed_text
    assert metadata_load(Path(packed, "README.md"))["library_name"] == "bimask-hf"


# ---- bimask-eval and check_nm on every kind of folder -----------------------------------------------


def test_bimask_eval_loads_timm_format_folders(tmp_path):
    from timm.models import save_for_hf

    data_dir = _image_folder(tmp_path / "data", "RGB")
    folder = tmp_path / "timm-format"
    model = timm.create_model("resnet8_cifar", num_classes=3, base_width=8)
    with torch.no_grad():  # a model that always answers class 1 ("light"): its accuracy is known exactly
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor([0.0, 5.0, 1.0]))
    save_for_hf(model, str(folder), safe_serialization=True)
    for i in range(4):  # unbalanced val split: 6 dark, 2 light, 6 mid
        (data_dir / "val" / "light" / f"{i}.png").unlink()
    result = evaluation.main([str(folder), "--dataset", str(data_dir), "--split", "val"])
    assert result["samples"] == 14
    assert result["top1"] == pytest.approx(100.0 * 2 / 14)  # the loaded weights (the head's bias) decide
    assert result["top5"] == pytest.approx(100.0)  # 3 classes: every label is in the top 5


def test_bimask_eval_rejects_corrupt_config_and_names_missing_folders(tmp_path, monkeypatch):
    from bimask_hf.hub import CorruptCheckpointError

    data_dir = _image_folder(tmp_path / "data", "RGB")
    model = bh.sparsify(timm.create_model("resnet8_cifar", num_classes=3, base_width=8), CONFIG)
    folder = Path(save_sparse_model(model, str(tmp_path / "saved"), config=CONFIG))
    (folder / "bimask_config.json").write_text('{"n": 2, "m": 4,')  # truncated
    with pytest.raises(CorruptCheckpointError, match="bimask_config.json"):
        evaluation.main([str(folder), "--dataset", str(data_dir), "--split", "val"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluation.main([str(tmp_path / "no-such-run"), "--dataset", str(data_dir)])
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: the Hub fallback fails at once
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="'runs/missing' is not an existing local folder"):
        evaluation.main(["runs/missing", "--dataset", str(data_dir)])


def test_check_nm_reads_folders_and_saved_layers(tmp_path):
    from safetensors.torch import load_file

    model = bh.sparsify(models.timm_wrapper("resnet8_cifar", num_labels=3), CONFIG)
    folder = save_sparse_model(model, str(tmp_path / "wrapper"), config=CONFIG)
    packed = save_sparse_model(model, str(tmp_path / "packed"), config=CONFIG, compressed=True)
    recorded = bh.BiMaskConfig.load_json(folder)["sparse_layers"]
    assert len(bh.check_nm(folder)) == len(recorded) == len(bh.check_nm(packed)) > 0
    # A state dict (timm key names, no "timm_model." prefix) is checked on the layers the folder records.
    state = load_file(Path(folder, "model.safetensors"))
    checked = bh.check_nm(state, saved=folder)
    assert checked == [name.removeprefix("timm_model.") for name in recorded]
    key = checked[0] + ".weight"
    state[key] = state[key].clone()
    assert state[key].dim() == 4 and state[key].shape[1] >= 4
    state[key][0, :4, 0, 0] = 1.0  # a full channels_last group of 4 (4 channels at one kernel position): breaks 2:4
    with pytest.raises(bh.NMPatternError, match=checked[0]):
        bh.check_nm(state, saved=folder)
    from safetensors.torch import save_file

    save_file(state, str(Path(folder, "model.safetensors")), metadata={"format": "pt"})
    with pytest.raises(bh.NMPatternError, match=checked[0]):
        bh.check_nm(folder)


# ---- the crop a folder records is the crop training evaluated with ------------------------------

CROPS = [("center", 1.0), ("center", 0.875), ("center", 0.8), ("squash", 1.0), ("squash", 0.8)]


@pytest.mark.parametrize("crop_mode,crop_pct", CROPS)
def test_transformers_processor_crops_as_training_evaluated(tmp_path, crop_mode, crop_pct):
    """60x40 images, 32x32 input: "center" resizes the short side and crops even at crop_pct 1.0 (the
    processor squashed them, 2.98 apart); "squash" below 1.0 resizes both sides and crops. (Sizes whose
    crop margins are even: transformers' processors put an odd margin's extra pixel on the other side.)"""
    from transformers import AutoImageProcessor

    from bimask_hf.hub.preprocessing import read_preprocessing

    data_dir = _image_folder(tmp_path / "data", "RGB", size=(60, 40), per_class=1)
    data = load_image_classification_data(str(data_dir), image_size=32, crop_pct=crop_pct, crop_mode=crop_mode,
                                          mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    folder = save_sparse_model(bh.sparsify(models.tiny_vit(num_labels=3), CONFIG), str(tmp_path / "vit"),
                               config=CONFIG, data_config=data.data_config)
    processor = AutoImageProcessor.from_pretrained(folder)
    images = _val_images(data_dir)[0]
    expected = torch.stack([data.eval_transform(image) for image in images])
    got = processor(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=0)  # uint8 rounding of the resized image
    recorded = read_preprocessing(folder)
    assert (recorded["crop_mode"], recorded["crop_pct"]) == (crop_mode, crop_pct)  # exactly, as written


@pytest.mark.parametrize("crop_mode,crop_pct", [*CROPS, ("center", 0.9), ("squash", 0.9)])
def test_timm_folder_records_crop_exactly(tmp_path, crop_mode, crop_pct):
    from bimask_hf.hub.preprocessing import read_preprocessing

    data_config = {"input_size": (3, 24, 24), "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3),
                   "interpolation": "bicubic", "crop_pct": crop_pct, "crop_mode": crop_mode}
    model = bh.sparsify(timm.create_model("resnet8_cifar", num_classes=3, base_width=8), CONFIG)
    folder = save_sparse_model(model, str(tmp_path / "timm"), config=CONFIG, data_config=data_config)
    recorded = read_preprocessing(folder)
    assert {k: recorded[k] for k in ("crop_mode", "crop_pct", "interpolation")} == {
        "crop_mode": crop_mode, "crop_pct": crop_pct, "interpolation": "bicubic"}
    assert tuple(recorded["input_size"]) == (3, 24, 24)


@pytest.mark.parametrize("family", ["timm", "vit"])
@pytest.mark.parametrize("key", ["mean", "std"])
def test_a_mean_or_std_of_the_wrong_length_is_refused_at_save(tmp_path, family, key):
    model = (timm.create_model("resnet8_cifar", num_classes=3, base_width=8) if family == "timm"
             else models.tiny_vit(num_labels=3))
    data_config = {"input_size": (3, 32, 32), "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}
    data_config[key] = (0.5, 0.5)
    with pytest.raises(ValueError, match=f"{key} .* does not have 3 values"):
        save_sparse_model(bh.sparsify(model, CONFIG), str(tmp_path / "m"), config=CONFIG, data_config=data_config)
    assert not list(tmp_path.rglob("*.*"))  # refused before any file was written
