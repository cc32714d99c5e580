"""Long work shows a progress bar on the main process, and is quiet where the Trainer's bars are."""

from __future__ import annotations

import pytest
import timm
import torch.nn as nn
from transformers.utils import logging as hf_logging

import bimask_hf as bh
from bimask_hf import evaluation

SEARCH_BAR = "bimask-hf permutation search"


def _model() -> nn.Module:
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    return bh.sparsify(model, bh.BiMaskConfig(target_modules=["0", "2"], permutation_search="random",
                                              num_permutations=2))


@pytest.fixture
def terminal(monkeypatch, capsys):
    """stderr looks like a terminal (tqdm's ``disable=None`` shows the bar there) and is captured."""
    from _pytest.capture import CaptureIO

    # the class: capsys swaps its stream in only when the test body starts
    monkeypatch.setattr(CaptureIO, "isatty", lambda self: True, raising=False)
    return capsys


@pytest.fixture
def bars_off():
    hf_logging.disable_progress_bar()
    yield
    hf_logging.enable_progress_bar()


def test_refresh_permutations_shows_a_bar_over_the_layers(capsys):
    bh.refresh_permutations(_model(), progress=True)
    err = capsys.readouterr().err
    assert SEARCH_BAR in err and "2/2" in err
    bh.refresh_permutations(_model(), progress=False)
    bh.refresh_permutations(_model())  # default: stderr is not a terminal here
    assert capsys.readouterr().err == ""


def test_refresh_permutations_bar_follows_the_terminal_and_the_global_switch(terminal, bars_off):
    bh.refresh_permutations(_model())
    assert terminal.readouterr().err == ""  # progress bars switched off (transformers / huggingface_hub)
    hf_logging.enable_progress_bar()
    bh.refresh_permutations(_model())
    assert SEARCH_BAR in terminal.readouterr().err


def test_only_the_main_process_shows_the_bar(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    bh.refresh_permutations(_model(), progress=True)
    assert capsys.readouterr().err == ""


def _trainer(tmp_path, data, disable_tqdm):
    model = bh.create_model("resnet8_cifar", labels=data.labels, model_args={"base_width": 8})
    args = bh.BiMaskTrainingArguments(
        output_dir=str(tmp_path / f"run{disable_tqdm}"), max_steps=1, per_device_train_batch_size=4, use_cpu=True,
        report_to="none", save_strategy="no", permutation_search="random", num_permutations=2,
        disable_tqdm=disable_tqdm,
    )
    return bh.BiMaskTrainer(model=model, args=args, train_dataset=data.train_dataset, data_collator=data.collate_fn)


def test_the_trainers_first_search_shows_a_bar_unless_disable_tqdm(tmp_path, terminal):
    from .test_artifacts import _image_folder

    data = bh.load_image_classification_data(str(_image_folder(tmp_path / "data", "RGB")), image_size=16, seed=0)
    _trainer(tmp_path, data, disable_tqdm=True).train()
    assert SEARCH_BAR not in terminal.readouterr().err
    _trainer(tmp_path, data, disable_tqdm=False).train()
    assert SEARCH_BAR in terminal.readouterr().err


def test_bimask_eval_shows_a_bar_over_the_batches(tmp_path, terminal, bars_off):
    from timm.models import save_for_hf

    from .test_artifacts import _image_folder

    data_dir = _image_folder(tmp_path / "data", "RGB")
    save_for_hf(timm.create_model("resnet8_cifar", num_classes=3, base_width=8), str(tmp_path / "m"),
                safe_serialization=True)
    argv = [str(tmp_path / "m"), "--dataset", str(data_dir), "--split", "val", "--batch_size", "4"]
    evaluation.main(argv)
    assert "bimask-eval" not in terminal.readouterr().err  # bars switched off
    hf_logging.enable_progress_bar()
    evaluation.main(argv)
    err = terminal.readouterr().err
    assert "bimask-eval" in err and "batch" in err
