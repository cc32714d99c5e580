"""Settings that disagree are errors: resuming a checkpoint with other N:M settings, loading a folder with
keywords that contradict it (or that the loader does not use)."""

from __future__ import annotations

import pytest

import bimask_hf as bh
from bimask_hf.checks import CHECKPOINT_CONFIG_NAME
from bimask_hf.errors import ConflictingSettingsError
from bimask_hf.train import main

# Checkpoint after 2 steps; the paper's random search with 2 candidates.
RUN = ["--model", "resnet8_cifar", "--model_args", '{"base_width": 8}', "--dataset", "digits", "--image_size", "8",
       "--max_train_samples", "32", "--max_eval_samples", "16", "--per_device_train_batch_size", "16",
       "--permutation_search", "random", "--num_permutations", "2", "--save_strategy", "steps", "--save_steps", "2",
       "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true", "--dataloader_num_workers", "0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2:4 run of 2 steps with its checkpoint-2 and final folder."""
    out = tmp_path_factory.mktemp("run") / "out"
    main([*RUN, "--max_steps", "2", "--output_dir", str(out)])
    assert (out / "checkpoint-2" / CHECKPOINT_CONFIG_NAME).is_file()
    assert not (out / "checkpoint-2" / "bimask_config.json").exists()  # a checkpoint is not a finished folder
    return out


@pytest.mark.parametrize(
    "flags,saved,asked,fix",
    [
        (["--n", "1"], "n=2", "n=1", "--n 2"),
        (["--m", "8"], "m=4", "m=8", "--m 4"),
        (["--mode", "srste"], "mode='bimask'", "mode='srste'", "--mode bimask"),
        (["--group_layout", "flat"], "group_layout='channels_last'", "group_layout='flat'",
         "--group_layout channels_last"),
        (["--permutation_search", "matched"], "permutation_search='random'", "permutation_search='matched'",
         "--permutation_search random"),
        (["--N", "1", "--M", "8"], "n=2, m=4", "n=1, m=8", "--n 2 --m 4"),
    ],
)
def test_resuming_with_other_nm_settings_is_refused_before_training(trained, flags, saved, asked, fix):
    checkpoint = trained / "checkpoint-2"
    before = {p.name: p.stat().st_mtime_ns for p in trained.iterdir()}
    with pytest.raises(ConflictingSettingsError) as err:
        main([*RUN, "--max_steps", "4", "--output_dir", str(trained), "--resume_from_checkpoint", str(checkpoint),
              *flags])
    message = str(err.value)
    assert str(checkpoint) in message and f"trained with {saved}" in message and f"asks for {asked}" in message
    assert f"({fix})" in message and "another --output_dir" in message
    assert {p.name: p.stat().st_mtime_ns for p in trained.iterdir()} == before  # nothing trained or written


def test_resuming_with_the_same_settings_continues(trained, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(trained, out)
    main([*RUN, "--max_steps", "4", "--output_dir", str(out), "--resume_from_checkpoint", "true",
          "--permutation_interval", "50"])  # a schedule setting may change; the masks' settings did not
    assert (out / "checkpoint-4").is_dir()
    assert bh.BiMaskConfig.load_json(out)["permutation_interval"] == 50


def test_load_sparse_model_keywords_must_agree_with_the_folder(trained):
    folder = str(trained)
    with pytest.raises(ConflictingSettingsError, match=r"saved with n=2.*asked for n=1"):
        bh.load_sparse_model(folder, n=1, m=4)
    with pytest.raises(ConflictingSettingsError, match=r"saved with group_layout='channels_last'.*'flat'"):
        bh.load_sparse_model(folder, config=bh.BiMaskConfig(group_layout="flat", permutation_search="random"))
    # Agreeing pattern keywords load; fine-tuning settings are honoured.
    model = bh.load_sparse_model(folder, n=2, m=4, permutation_interval=7, mode="srste")
    assert (model.bimask_config.n, model.bimask_config.m) == (2, 4)
    assert model.bimask_config.permutation_interval == 7 and model.bimask_config.mode == "srste"
    assert {layer.mode for layer in bh.sparse_layers(model).values()} == {"srste"}


def test_load_sparse_model_refuses_keywords_it_does_not_use(trained):
    folder = str(trained)
    with pytest.raises(TypeError, match="revision='v1'.*local folder"):
        bh.load_sparse_model(folder, revision="v1")
    with pytest.raises(TypeError, match=r"unexpected keyword\(s\) \['colour'\]"):
        bh.load_sparse_model(folder, colour="red")
    with pytest.raises(TypeError, match="config must be a BiMaskConfig"):
        bh.load_sparse_model(folder, config={"n": 2, "m": 4})
    assert bh.load_sparse_model(folder, cache_dir="/nonexistent", token="x") is not None  # as transformers does
