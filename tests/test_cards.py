"""Model cards state only what holds: every snippet a card advertises runs, as written, against the
folder served by the loopback Hub; what does not hold (pipeline without a processor, N:M on a dense run,
a repo id nobody pushed, a dataset nobody named) is not said."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification

import bimask_hf as bh
from bimask_hf.hub import save_sparse_model

from . import models
from .olah_server import serve_local_repos, use_endpoint
from .test_hub import CONFIG

RGB = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "interpolation": "bilinear",
       "crop_pct": 1.0, "crop_mode": "center"}
GRAY = {**RGB, "input_size": (1, 32, 32), "mean": (0.5,), "std": (0.25,)}


def _gray_vit() -> torch.nn.Module:
    return ViTForImageClassification(ViTConfig(**models._VIT, num_labels=3, num_channels=1))


# repo -> (model factory, data_config, pipeline advertised)
CASES = {
    "vit-rgb": (lambda: models.tiny_vit(num_labels=3), RGB, True),
    "vit-gray": (_gray_vit, GRAY, True),  # bimask-hf's processor converts the pipeline's RGB to 1 channel
    "vit-no-preprocessing": (lambda: models.tiny_vit(num_labels=3), None, False),
    "timm-resnet": (lambda: models.timm_model("resnet8_cifar", num_classes=3), None, True),
}


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("cards")
    with serve_local_repos(str(root / "hub")) as hub:
        for name, (factory, data_config, _) in CASES.items():
            model = bh.sparsify(factory(), CONFIG)
            folder = save_sparse_model(model, root / name, data_config=data_config,
                                       card_data={"repo_id": f"bimask-test/{name}"})
            hub.add_model_repo(f"bimask-test/{name}", folder)
        yield hub, root


@pytest.mark.parametrize("name", list(CASES))
def test_every_advertised_snippet_runs(served, name, tmp_path, monkeypatch):
    hub, root = served
    use_endpoint(monkeypatch, hub.endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype("uint8")).save("image.png")
    text = ModelCard.load(root / name / "README.md").text
    plain, with_bimask = _python_blocks(text)[:2]
    assert ("pipeline(" in plain) == CASES[name][2], plain
    assert "evaluation set" not in text
    scope: dict[str, object] = {}
    exec(compile(plain, f"{name}/README.md", "exec"), scope)  # noqa: S102 - the card's own snippet
    if CASES[name][2]:
        assert len(scope["classify"]("image.png")) == 3  # type: ignore[operator]
    # The bimask-hf snippet up to the load (the rest trains on the user's own data).
    load = with_bimask[: with_bimask.index("trainer =")]
    exec(compile(load, f"{name}/README.md", "exec"), scope)  # noqa: S102
    assert bh.sparse_layers(scope["model"])  # type: ignore[arg-type]


def test_dense_mode_card_says_dense(tmp_path):
    model = bh.sparsify(models.tiny_vit(num_labels=3), bh.BiMaskConfig(mode="dense"))
    folder = save_sparse_model(model, tmp_path / "dense", data_config=RGB)
    card = ModelCard.load(os.path.join(folder, "README.md"))
    assert "**dense weights**" in card.text and "sparse weights" not in card.text
    assert not [t for t in card.data.tags if "sparsity" in t] and "dense-baseline" in card.data.tags
    assert "load_sparse_model" not in card.text  # it would find no sparse layer to check


def test_snippets_name_a_placeholder_without_a_repo_id(tmp_path):
    folder = save_sparse_model(bh.sparsify(models.tiny_vit(num_labels=3), CONFIG), tmp_path / "vit-2-4")
    text = ModelCard.load(os.path.join(folder, "README.md")).text
    assert 'from_pretrained("<namespace>/vit-2-4")' in text and 'load_sparse_model("<namespace>/vit-2-4")' in text
