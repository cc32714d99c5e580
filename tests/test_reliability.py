"""Runs you can trust: exit status, seeded CLI runs, crash-safe checkpoints and saves, clear input errors."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback, set_seed

import bimask_hf as bh
from bimask_hf import BiMaskTrainer, BiMaskTrainingArguments, create_model, load_image_classification_data
from bimask_hf.layers import PERMUTATION_KEY
from bimask_hf.storage import StorageError, last_complete_checkpoint

from .test_recipes import assert_trained

ROOT = Path(__file__).resolve().parents[1]
KILLER = ROOT / "tests" / "scripts" / "cli_kill_after_save.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
ENV.pop("ACCELERATE_USE_CPU", None)
# A tiny seeded CLI run: random init, data subset and order, random crops and flips, random permutation
# search, checkpoints every 2 steps.
TINY_RUN = ["--model", "resnet8_cifar", "--model_args", '{"base_width": 8}', "--dataset", "digits", "--recipe", "cifar",
            "--image_size", "8", "--max_train_samples", "128", "--max_eval_samples", "32", "--max_steps", "6",
            "--per_device_train_batch_size", "16", "--learning_rate", "0.05", "--optim", "sgd",
            "--optim_args", "momentum=0.9", "--report_to", "none", "--num_permutations", "4",
            "--permutation_search", "random", "--permutation_interval", "2", "--save_strategy", "steps",
            "--save_steps", "2", "--seed", "3", "--disable_tqdm", "true", "--dataloader_num_workers", "0"]


def _run(cmd: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env or ENV, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit status {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


# ---- exit status, seeds, SIGKILL + resume through the CLI ---------------------------------------

@pytest.mark.slow
def test_cli_seeded_run_killed_and_resumed_is_bit_identical_and_exits_0(tmp_path):
    train = [sys.executable, "-m", "bimask_hf.train", *TINY_RUN]
    a, crashed = tmp_path / "a", tmp_path / "crashed"
    bimask_train = shutil.which("bimask-train")  # the console script exits 0 (not 1 with a metrics dict)
    assert bimask_train is not None
    _ok(_run([bimask_train, *TINY_RUN, "--output_dir", str(a), "--use_cpu", "true"]))
    # A second run with the same seed, killed after checkpoint-4 and resumed from checkpoint-2, must write
    # the same model.safetensors to the bit: its init, data order, augmentation and permutation search are
    # seeded, and resumption continues exactly (with a worker process loading the data, too).
    killed = _run([sys.executable, str(KILLER), *TINY_RUN, "--output_dir", str(crashed), "--use_cpu", "true"],
                  env={**ENV, "KILL_AT_STEP": "4"})
    assert killed.returncode == -9, killed.stderr[-3000:]  # really killed, not a clean exit
    assert (crashed / "checkpoint-4").is_dir() and not (crashed / "model.safetensors").exists()
    # A kill while checkpoint-4 was written: no trainer_state.json. A bare --resume takes checkpoint-2.
    (crashed / "checkpoint-4" / "trainer_state.json").unlink()
    resumed = _ok(_run([*train, "--output_dir", str(crashed), "--use_cpu", "true", "--resume",
                        "--dataloader_num_workers", "1"]))
    assert "Skipping" in resumed.stderr and "checkpoint-4: it has no trainer_state.json" in resumed.stderr
    assert f"Resuming from {crashed / 'checkpoint-2'}" in resumed.stderr
    straight, again = load_file(a / "model.safetensors"), load_file(crashed / "model.safetensors")
    assert straight.keys() == again.keys()
    for key, value in straight.items():
        assert torch.equal(again[key], value), key
    assert (a / "model.safetensors").read_bytes() == (crashed / "model.safetensors").read_bytes()

    # bimask-eval, the console script, exits 0 on success and non-zero on failure.
    bimask_eval = shutil.which("bimask-eval")
    assert bimask_eval is not None
    ok = _ok(_run([bimask_eval, str(a), "--dataset", "digits", "--max_samples", "16"]))
    assert "top-1" in ok.stdout
    failed = _run([bimask_eval, str(tmp_path / "missing"), "--dataset", "digits"])
    assert failed.returncode != 0 and "missing" in failed.stderr
    ok = _ok(_run([sys.executable, "-m", "bimask_hf.evaluation", str(a), "--dataset", "digits", "--max_samples", "16"]))
    assert "top-1" in ok.stdout
    failed = _run([bimask_train, *TINY_RUN, "--output_dir", str(tmp_path / "bad"), "--dataset", "no-such-dataset"])
    assert failed.returncode != 0 and "no-such-dataset" in failed.stderr


@pytest.mark.slow
def test_cpu_2proc_config_trains_ddp_without_env_var_and_exits_0(tmp_path):
    out = tmp_path / "ddp"
    proc = _ok(_run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                     str(ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml"), "-m", "bimask_hf.train", *TINY_RUN,
                     "--max_steps", "2", "--output_dir", str(out)]))
    # One two-process DDP run (one header, one save), not two single-process runs racing on the folder.
    assert proc.stdout.count("sparse training") == 1 and "DDP x2 (cpu)" in proc.stdout, proc.stdout[-2000:]
    assert proc.stdout.count("Hub-ready model folder") == 1
    assert bh.load_sparse_model(str(out)) is not None
    assert_trained(out, steps=2, n=2, m=4)  # what tests/test_recipes.py asserts of every recipe
    assert not [p for p in tmp_path.iterdir() if ".saving-" in p.name]


# ---- crash-safe checkpoints and saves ---------------------------------------------------------------

def _checkpoint(root: Path, step: int, state: bool = True, weights: bool = True) -> Path:
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if state:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if weights:
        (path / "model.safetensors").write_bytes(b"x")
    return path


def test_resume_takes_the_newest_complete_checkpoint_and_says_why(tmp_path, caplog):
    good = _checkpoint(tmp_path, 20)
    _checkpoint(tmp_path, 3)
    _checkpoint(tmp_path, 100, weights=False)
    _checkpoint(tmp_path, 40, state=False)
    (_checkpoint(tmp_path, 30) / "trainer_state.json").write_text("{truncated")
    with caplog.at_level(logging.WARNING, logger="bimask_hf.storage"):
        assert last_complete_checkpoint(tmp_path) == str(good)
    text = caplog.text
    assert "checkpoint-100: it has no model weights" in text and "checkpoint-40: it has no trainer_state.json" in text
    assert "checkpoint-30: its trainer_state.json is unreadable" in text and f"Resuming from {good}" in text
    assert last_complete_checkpoint(tmp_path / "nothing") is None


@pytest.fixture
def digits(small_digits):  # this module's tests run on the smaller set (tests/conftest.py)
    return small_digits


def _model(digits, **kwargs):
    set_seed(0)
    return create_model("resnet8_cifar", labels=digits.labels, model_args={"base_width": 8}, **kwargs)


def _args(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=16, learning_rate=0.05,
                    report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                    permutation_search="random", num_permutations=4, permutation_interval=2)
    return BiMaskTrainingArguments(**{**defaults, **kwargs})


def test_interrupted_resave_leaves_the_previous_model_loadable(tmp_path, digits, monkeypatch):
    import bimask_hf.hub.save as save

    folder = tmp_path / "model"
    first = bh.sparsify(_model(digits), bh.BiMaskConfig())
    bh.save_sparse_model(first, folder, data_config=digits.data_config)
    (folder / "checkpoint-1").mkdir()  # a Trainer output folder also holds checkpoints: they stay
    before = load_file(folder / "model.safetensors")
    second = bh.sparsify(_model(digits), bh.BiMaskConfig())
    with torch.no_grad():
        for p in second.parameters():
            p.add_(1.0)
    real = save._save_transformers

    def full_disk(model, path):  # the weights are written, then the disk fills up
        real(model, path)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(save, "_save_transformers", full_disk)
    with pytest.raises(StorageError, match="is full"):
        bh.save_sparse_model(second, folder, data_config=digits.data_config)
    after = load_file(folder / "model.safetensors")
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert bh.load_sparse_model(str(folder)) is not None and (folder / "checkpoint-1").is_dir()
    assert not [p for p in tmp_path.iterdir() if ".saving-" in p.name]  # no staging folder left behind
    monkeypatch.setattr(save, "_save_transformers", real)
    bh.save_sparse_model(second, folder, data_config=digits.data_config)  # a completed re-save replaces it
    assert not torch.equal(load_file(folder / "model.safetensors")["fc.weight"], before["fc.weight"])


class _Killed(BaseException):
    """A simulated SIGKILL: raised at one file-system step; nothing the save does afterwards happens."""


class _KillAt:
    """Wraps file-system functions: the ``step``-th call raises :class:`_Killed`, later calls do nothing."""

    def __init__(self, step: int) -> None:
        self.step, self.count, self.dead = step, 0, False

    def wrap(self, real):  # type: ignore[no-untyped-def]
        def op(*args, **kwargs):  # type: ignore[no-untyped-def]
            if self.dead:
                return False  # killed: nothing runs any more
            self.count += 1
            if self.count == self.step:
                self.dead = True
                raise _Killed(real.__name__)
            return real(*args, **kwargs)
        return op


def _model_files(folder: Path, hidden: bool = True) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()
            if p.is_file() and p.name != "README.md" and (hidden or not p.name.startswith("."))}


@pytest.mark.parametrize("swap", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_a_save_killed_at_any_step_leaves_the_whole_old_or_the_whole_new_model(tmp_path, digits, monkeypatch, swap):
    import bimask_hf.storage as storage

    if not swap:  # a file system without an atomic exchange: the fallback renames twice
        monkeypatch.setattr(storage, "_exchange", lambda a, b: False)

    folder, reference = tmp_path / "model", tmp_path / "reference" / "model"
    old = bh.sparsify(_model(digits), bh.BiMaskConfig(n=2, m=4))
    new = bh.sparsify(_model(digits), bh.BiMaskConfig(n=1, m=4))
    with torch.no_grad():
        for p in new.parameters():
            p.add_(1.0)
    bh.save_sparse_model(new, reference, data_config=digits.data_config)
    want_new = _model_files(reference)
    ops = [(os, "replace"), (os, "rename"), (os, "remove"), (os, "unlink"), (shutil, "rmtree"), (storage, "_exchange")]
    kills, step = 0, 1
    while True:
        shutil.rmtree(folder, ignore_errors=True)
        # The previous model: 2:4 in the compressed format, inside a Trainer output folder with a checkpoint.
        bh.save_sparse_model(old, folder, data_config=digits.data_config, compressed=True)
        (folder / "checkpoint-1").mkdir()
        (folder / "checkpoint-1" / "trainer_state.json").write_text("{}")
        want_old = _model_files(folder)
        killer = _KillAt(step)
        with monkeypatch.context() as m:
            for module, attr in ops:
                m.setattr(module, attr, killer.wrap(getattr(module, attr)))
            try:
                bh.save_sparse_model(new, folder, data_config=digits.data_config)
            except _Killed:
                kills += 1
            else:
                assert step > 3, "the save made no file-system steps to interrupt"
                break
        # Right after the kill: the folder is the old model or the new one, never a mix, and it loads.
        if swap or folder.exists():
            state = _model_files(folder, hidden=False)  # (a kill right after the swap leaves a hidden marker)
            assert state in (want_old, want_new), (step, sorted(state))
            assert bh.load_sparse_model(str(folder)) is not None
        else:  # between the two renames: the previous model waits whole beside the folder
            state = want_old
            assert [_model_files(p) for p in tmp_path.glob(".model.saving-*")].count(want_old) == 1
        # The next save of the folder starts by finishing the interrupted one: checkpoints back, no leftovers.
        storage.recover_interrupted_save(folder)
        assert _model_files(folder) == state
        assert (folder / "checkpoint-1" / "trainer_state.json").is_file(), step
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "reference"], step  # no staging left
        step += 1
    assert kills >= 3
    assert _model_files(folder) == want_new and (folder / "checkpoint-1").is_dir()
    assert folder.stat().st_mode & 0o777 == reference.stat().st_mode & 0o777  # not mkdtemp's private 0700


def test_saving_into_the_working_directory_keeps_it(tmp_path, digits, monkeypatch):
    """``--output_dir .``: the folder cannot be swapped away from under the process; files move in."""
    folder = tmp_path / "here"
    folder.mkdir()
    monkeypatch.chdir(folder)
    first, second = (bh.sparsify(_model(digits), bh.BiMaskConfig(n=n, m=4)) for n in (2, 1))
    bh.save_sparse_model(first, ".", data_config=digits.data_config, compressed=True)
    bh.save_sparse_model(second, ".", data_config=digits.data_config)
    assert os.path.samefile(os.getcwd(), folder)  # still the folder, not a deleted one
    assert bh.BiMaskConfig.from_pretrained(".").n == 1 and not Path("model.nm.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"] and not list(folder.glob(".saving-*"))


def _read_only_folder(tmp_path: Path) -> Path:
    """An existing folder this process cannot write to (root ignores permission bits: use sysfs there)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    folder = Path("/sys/kernel")
    if not folder.is_dir() or os.access(folder, os.W_OK) and _can_create_file(folder):
        pytest.skip("no read-only folder available to root here")
    return folder


def _can_create_file(folder: Path) -> bool:
    try:
        (folder / ".bimask-probe").touch()
    except OSError:
        return False
    (folder / ".bimask-probe").unlink()
    return True


def test_read_only_output_folder_fails_before_training(tmp_path, digits):
    trainer = BiMaskTrainer(model=_model(digits), args=_args(tmp_path, output_dir=str(_read_only_folder(tmp_path))),
                            train_dataset=digits.train_dataset, data_collator=digits.collate_fn)
    with pytest.raises(StorageError, match="Cannot write to"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_disk_full_while_checkpointing_is_one_clear_error(tmp_path, digits, monkeypatch):
    from transformers import Trainer

    def torch_full_disk(self, output_dir):  # what torch.save raises when the disk fills up
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1536 vs 1462")

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", torch_full_disk)
    trainer = BiMaskTrainer(model=_model(digits), args=_args(tmp_path, save_strategy="steps", save_steps=1),
                            train_dataset=digits.train_dataset, data_collator=digits.collate_fn)
    with pytest.raises(StorageError, match="is full.*--output_dir"):
        trainer.train()


# ---- clear messages --------------------------------------------------------------------------------

def test_recipe_must_come_first(tmp_path):
    from bimask_hf.train import parse_args

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: resnet8_cifar\n")
    with pytest.raises(SystemExit, match="must be the first argument"):
        parse_args(["--n", "1", str(recipe)])


def test_save_steps_with_an_epoch_recipe_is_an_error(tmp_path):
    from bimask_hf.train import parse_args

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: resnet8_cifar\nsave_strategy: epoch\n")
    with pytest.raises(SystemExit, match="the recipe says save_strategy: epoch.*--save_strategy steps"):
        parse_args([str(recipe), "--save_steps", "5", "--output_dir", str(tmp_path)])
    args = parse_args([str(recipe), "--save_steps", "5", "--save_strategy", "steps", "--output_dir", str(tmp_path)])[2]
    assert args.save_steps == 5


def test_invalid_target_modules_regex_names_the_field(tmp_path):
    from bimask_hf.train import parse_args

    with pytest.raises(ValueError, match="target_modules is not a valid regular expression"):
        parse_args(["--target_modules", "re:layer1.([", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="exclude_modules is not a valid regular expression"):
        bh.BiMaskConfig(exclude_modules="*conv")


@pytest.mark.parametrize("flag,message", [("--max_train_samples", "train set is empty"),
                                          ("--max_eval_samples", "eval set is empty")])
def test_empty_train_or_eval_set_fails_before_training(tmp_path, flag, message):
    from bimask_hf.train import build, parse_args

    with pytest.raises(ValueError, match=message):
        build(*parse_args(["--dataset", "digits", "--model", "resnet8_cifar", flag, "0", "--output_dir",
                           str(tmp_path), "--use_cpu", "true", "--report_to", "none"]))


def test_eval_set_without_labels_is_an_error(tmp_path, digits):
    unlabeled = datasets.Dataset.from_dict({"pixel_values": [[0.0]] * 4})
    with pytest.raises(ValueError, match="eval set has no 'labels' column"):
        BiMaskTrainer(model=_model(digits), args=_args(tmp_path), train_dataset=digits.train_dataset,
                      eval_dataset=unlabeled, data_collator=digits.collate_fn)


def test_evaluating_batches_without_labels_is_an_error_but_predict_works(tmp_path, digits):
    """A plain (or streamed) eval set has no columns to check up front: evaluate() must not silently
    report no accuracy; predict() on unlabeled data is fine."""
    unlabeled = [{"pixel_values": digits.eval_dataset[i]["pixel_values"]} for i in range(8)]
    trainer = BiMaskTrainer(model=_model(digits), args=_args(tmp_path, per_device_eval_batch_size=4),
                            train_dataset=digits.train_dataset, data_collator=_stack_pixels)
    with pytest.raises(ValueError, match="batches have no 'labels' field, so no accuracy"):
        trainer.evaluate(unlabeled)
    assert trainer.predict(unlabeled).predictions.shape[0] == 8
    labeled = [{**example, "labels": digits.eval_dataset[i]["labels"]} for i, example in enumerate(unlabeled)]
    assert "eval_top1" in trainer.evaluate(labeled)


def _stack_pixels(examples: list[dict]) -> dict[str, torch.Tensor]:
    batch = {"pixel_values": torch.stack([e["pixel_values"] for e in examples])}
    if "labels" in examples[0]:
        batch["labels"] = torch.tensor([e["labels"] for e in examples])
    return batch


def test_one_channel_data_into_a_three_channel_model_fails_before_training(tmp_path, digits):
    gray = load_image_classification_data("digits", image_size=16, in_chans=1, seed=0, rank=0, world_size=1,
                                          max_train_samples=32)
    trainer = BiMaskTrainer(model=_model(digits), args=_args(tmp_path), train_dataset=gray.train_dataset,
                            data_collator=gray.collate_fn)
    with pytest.raises(ValueError, match="1 channel.*takes 3: load the data with in_chans=3"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_unknown_config_keys_are_errors_but_saved_metadata_loads(tmp_path, digits):
    with pytest.raises(ValueError, match="'modee' \\(did you mean 'mode'\\?\\)"):
        bh.BiMaskConfig.from_dict({"n": 2, "m": 4, "modee": "post"})
    with pytest.raises(TypeError, match="unknown BiMaskConfig field.*permutation_intervall"):
        bh.sparsify(_model(digits), permutation_intervall=5)
    model = bh.sparsify(_model(digits), mode="post", n=1)  # real overrides still apply
    assert model.bimask_config.mode == "post" and model.bimask_config.n == 1
    folder = bh.save_sparse_model(model, tmp_path / "saved", data_config=digits.data_config, compressed=True)
    saved = bh.BiMaskConfig.load_json(folder)
    assert {"sparse_layers", "pattern", "library_version", "compression"} <= set(saved)
    assert bh.BiMaskConfig.from_pretrained(folder) == model.bimask_config


# ---- model_init ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["bimask", "post"])
def test_callback_acts_on_the_model_that_model_init_builds(tmp_path, digits, mode):
    trainer = BiMaskTrainer(model_init=lambda: _model(digits), args=_args(tmp_path, mode=mode, max_steps=3),
                            train_dataset=digits.train_dataset, data_collator=digits.collate_fn)
    trainer.train()
    layers = bh.sparse_layers(trainer.model)
    assert layers and trainer.bimask_callback.model is trainer.model
    if mode == "post":  # projected after every optimizer step: pruned weights of the trained model are zero
        for layer in layers.values():
            mf, _ = layer.compute_masks()
            assert bool(((layer.weight != 0) <= mf).all())
        return
    perms = [getattr(layer, PERMUTATION_KEY) for layer in layers.values()]
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms)  # refreshed on the trained model
    logged = [log for log in trainer.state.log_history if "sparsity/retention_mean" in log][-1]
    retention = [float((mb & mf).sum()) / float(mf.sum()) for mf, mb in (layer.masks() for layer in layers.values())]
    assert logged["sparsity/retention_mean"] == pytest.approx(sum(retention) / len(retention), rel=1e-6)


# ---- seeded augmentation ---------------------------------------------------------------------------

def test_augmentation_depends_on_seed_epoch_and_index_only(tmp_path, digits):
    """Each example's random draws are fixed by (seed, epoch, index): a resumed run repeats them exactly
    (the loader's read-ahead does not shift them), and the next epoch draws new ones."""
    drawn: list[tuple[int, float]] = []

    def augment(batch):  # a random transform: records what it drew for each example (label = its index)
        noise = [float(torch.rand(())) for _ in batch["labels"]]
        drawn.extend(zip(batch["labels"], noise))
        return {"pixel_values": [torch.full((3, 16, 16), n) for n in noise], "labels": batch["labels"]}

    data = datasets.Dataset.from_dict({"pixel_values": [[0.0]] * 8, "labels": list(range(8))}).with_transform(augment)

    class Record(TrainerCallback):  # keep only what the training loop loads
        def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            drawn.clear()

    def run(resume: bool) -> dict[tuple[int, int], float]:
        trainer = BiMaskTrainer(model=_model(digits), args=_args(tmp_path, max_steps=-1, num_train_epochs=2,
                                                                 per_device_train_batch_size=4, save_strategy="steps",
                                                                 save_steps=1, ignore_data_skip=False),
                                train_dataset=data, data_collator=digits.collate_fn, callbacks=[Record()])
        trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3") if resume else None)
        # Loaded for training, in order: epoch 0 is examples 0-7, epoch 1 the next 8; a run resumed after
        # step 3 loads only epoch 1's last batch.
        epochs = [1] * 4 if resume else [0] * 8 + [1] * 8
        assert len(drawn) == len(epochs)
        return {(e, label): value for e, (label, value) in zip(epochs, drawn)}

    straight = run(resume=False)
    assert len(straight) == 16
    assert all(straight[0, i] != straight[1, i] for i in range(8))  # a new epoch, new draws
    resumed = run(resume=True)  # resumed inside epoch 1: its last batch is read again
    assert len(resumed) == 4 and all(resumed[k] == straight[k] for k in resumed), (resumed, straight)


# ---- resuming transformers models ------------------------------------------------------------------

def _tiny_vit(digits, seed: int = 0):
    from transformers import ViTConfig, ViTForImageClassification

    set_seed(seed)
    return ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=64, image_size=16, patch_size=4,
                                               num_labels=len(digits.labels)))


def test_resumed_transformers_vit_continues_from_its_checkpoint(tmp_path, digits):
    """transformers 5 saves ViT under its original key names (``...attention.attention.query``), not the
    module names (``...attention.q_proj``): the resumed run must still load every weight and permutation
    and end exactly where the straight run ends (it used to restart silently from fresh weights)."""

    def run(resume: bool) -> dict[str, torch.Tensor]:
        trainer = BiMaskTrainer(model=_tiny_vit(digits, seed=1 if resume else 0),  # resume must overwrite all
                                args=_args(tmp_path, save_strategy="steps", save_steps=2),
                                train_dataset=digits.train_dataset, data_collator=digits.collate_fn)
        trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2") if resume else None)
        return {k: v.clone() for k, v in trainer.model.state_dict().items()}

    straight = run(resume=False)
    saved = load_file(tmp_path / "out" / "checkpoint-2" / "model.safetensors")
    assert not set(saved) <= set(straight), "the checkpoint no longer uses renamed keys: this test checks nothing"
    perms = [k for k in straight if k.endswith(PERMUTATION_KEY)]
    assert perms and any(not torch.equal(straight[k], torch.arange(len(straight[k]))) for k in perms)
    resumed = run(resume=True)
    for key, value in straight.items():
        assert torch.equal(resumed[key], value), key


def test_resuming_from_another_models_checkpoint_is_an_error(tmp_path, digits):
    trainer = BiMaskTrainer(model=_tiny_vit(digits), args=_args(tmp_path, max_steps=2, save_strategy="steps",
                                                                save_steps=2),
                            train_dataset=digits.train_dataset, data_collator=digits.collate_fn)
    trainer.train()
    other = BiMaskTrainer(model=_model(digits), args=_args(tmp_path, max_steps=4),
                          train_dataset=digits.train_dataset, data_collator=digits.collate_fn)
    with pytest.raises(Exception, match="checkpoint"):
        other.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))


# ---- what a re-save keeps, and what reaches the disk before the swap ----------------------------

def test_a_resaved_folder_keeps_its_permissions(tmp_path, digits):
    folder = tmp_path / "model"
    model = bh.sparsify(_model(digits), bh.BiMaskConfig())
    bh.save_sparse_model(model, folder, data_config=digits.data_config)
    folder.chmod(0o2751)  # a shared group folder (setgid), not what a new folder gets from the umask
    bh.save_sparse_model(model, folder, data_config=digits.data_config)
    assert folder.stat().st_mode & 0o7777 == 0o2751


def test_every_file_is_flushed_to_disk_before_the_swap(tmp_path, digits, monkeypatch):
    """A rename is atomic, but a power loss after it can leave empty files under the new names unless
    the files (and the folders' entries) were fsync'ed: every file first, the parent folder after."""
    import bimask_hf.storage as storage

    folder = tmp_path / "model"
    model = bh.sparsify(_model(digits), bh.BiMaskConfig())
    bh.save_sparse_model(model, folder, data_config=digits.data_config)
    events: list[tuple[str, str]] = []
    real_fsync, real_exchange = os.fsync, storage._exchange

    def fsync(fd):  # type: ignore[no-untyped-def]
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def exchange(a, b):  # type: ignore[no-untyped-def]
        events.append(("swap", a))
        return real_exchange(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(storage, "_exchange", exchange)
    bh.save_sparse_model(model, folder, data_config=digits.data_config)
    swap = [i for i, (kind, _) in enumerate(events) if kind == "swap"]
    assert len(swap) == 1, events
    staging = events[swap[0]][1]
    flushed = {os.path.relpath(path, staging) for kind, path in events[: swap[0]] if kind == "fsync"
               and path.startswith(staging)}
    written = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert written and written <= flushed, sorted(written - flushed)
    assert "." in flushed  # the staging folder's own entries
    assert ("fsync", str(tmp_path)) in events[swap[0]:]  # the swap itself, in the parent folder


def test_data_seed_decides_the_augmentation(tmp_path, digits):
    """``--data_seed`` (when set) seeds the augmentation, as it seeds the data order in the Trainer:
    runs that differ only in ``--seed`` draw the same crops, a new ``--data_seed`` draws new ones."""
    drawn: dict[int, float] = {}

    def augment(batch):  # a random transform: records what it drew for each example (label = its index)
        noise = [float(torch.rand(())) for _ in batch["labels"]]
        drawn.update(zip(batch["labels"], noise))
        return {"pixel_values": [torch.full((3, 16, 16), n) for n in noise], "labels": batch["labels"]}

    data = datasets.Dataset.from_dict({"pixel_values": [[0.0]] * 8, "labels": list(range(8))}).with_transform(augment)

    def draws(seed: int, data_seed: int) -> dict[int, float]:
        trainer = BiMaskTrainer(model=_model(digits), args=_args(tmp_path, seed=seed, data_seed=data_seed,
                                                                 per_device_train_batch_size=4),
                                train_dataset=data, data_collator=digits.collate_fn)
        drawn.clear()
        for _ in trainer.get_train_dataloader():
            pass
        return dict(drawn)

    first = draws(seed=0, data_seed=5)
    assert len(first) == 8
    assert draws(seed=1, data_seed=5) == first
    other = draws(seed=0, data_seed=6)
    assert all(other[i] != first[i] for i in range(8))


def test_each_refresh_is_seeded_by_its_own_step(tmp_path, digits):
    """The refresh after step s draws from (seed, s, layer): it equals refresh_permutations(model, step=s)
    on the weights and permutations of that moment (and a refresh seeded by another step differs), so
    runs resumed at any step repeat them."""
    import copy

    snapshots: dict[int, dict] = {}  # step -> weights and permutations just before its refresh
    refreshed: dict[int, dict] = {}  # step -> permutations just after it

    def permutations(state):
        return {k: v.clone() for k, v in state.items() if k.endswith(PERMUTATION_KEY)}

    class Record(TrainerCallback):  # runs before BiMaskCallback, which the trainer adds last
        def on_step_end(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
            snapshots[state.global_step] = {k: v.clone() for k, v in model.state_dict().items()}

        def on_step_begin(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
            if state.global_step in snapshots:
                refreshed[state.global_step] = permutations(model.state_dict())

        on_train_end = on_step_begin

    trainer = BiMaskTrainer(model=_model(digits), args=_args(tmp_path, max_steps=3, permutation_interval=1,
                                                             num_permutations=8),
                            train_dataset=digits.train_dataset, data_collator=digits.collate_fn, callbacks=[Record()])
    trainer.train()
    assert sorted(refreshed) == [1, 2, 3]
    other_seed_differs = False
    for step, state in snapshots.items():
        replay = copy.deepcopy(trainer.model)
        replay.load_state_dict(state)
        bh.refresh_permutations(replay, step=step)
        assert all(torch.equal(v, refreshed[step][k]) for k, v in permutations(replay.state_dict()).items()), step
        replay.load_state_dict(state)
        bh.refresh_permutations(replay, step=step + 10)
        other_seed_differs |= any(not torch.equal(v, refreshed[step][k])
                                  for k, v in permutations(replay.state_dict()).items())
    assert other_seed_differs  # the step really decides the draws
