"""Every shipped recipe trains: each YAML in ``recipes/`` (and each CPU-capable accelerate config) runs
through the real CLI, made tiny by overrides, and must train, evaluate and save an exact N:M folder.

The folders are globbed, so a new recipe is picked up without touching this file. The overrides are the
same for every recipe: a few steps on scikit-learn's 8x8 digits (local, no network) standing in for
CIFAR / ImageNet, 16 px images, a random permutation search with two candidates (the matched search of
VGG-19 alone takes minutes on two cores; the searches have their own tests; a preset's own search is
kept), no worker processes, no trackers.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub.repocard import metadata_load

import bimask_hf as bh
from bimask_hf.train import main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
ENV.pop("ACCELERATE_USE_CPU", None)

STEPS = 2
TINY = ["--dataset", "digits", "--image_size", "16", "--max_steps", str(STEPS), "--max_train_samples", "32",
        "--max_eval_samples", "16", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
        "--num_permutations", "2", "--dataloader_num_workers", "0",
        "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true"]
# What a model needs to take 16 px images, merged into the recipe's own model_args.
MODEL_ARGS = {"deit_small_patch16_224": {"img_size": 16}}
# bf16 autocast convolutions run an order of magnitude slower than float32 on CPUs without bf16 units;
# cpu_bf16.yaml below runs a recipe in bf16 through accelerate instead.
CPU_OVERRIDES = {"bf16": "false"}

# Accelerate configs whose CPU run is another test's subject (it asserts the same: see assert_trained).
RUN_ELSEWHERE = {
    "cpu_2proc.yaml": "two-process DDP: tests/test_reliability.py::test_cpu_2proc_config_trains_ddp_without_env_var_"
                      "and_exits_0",
    "cpu_fsdp_2proc.yaml": "two-process FSDP2: tests/test_distributed.py::test_hub_cifar10_streams_per_rank_through_"
                           "the_cli_under_fsdp2",
}


def recipe_overrides(recipe: Path) -> list[str]:
    """The flags that make ``recipe`` tiny: :data:`TINY` plus what its own keys need on this machine."""
    values = _values(recipe)
    argv = list(TINY)
    if not values.get("preset"):  # a preset decides the search (the paper's: fresh random candidates)
        argv += ["--permutation_search", "random"]
    model_args = {**(values.get("model_args") or {}), **MODEL_ARGS.get(values.get("model", ""), {})}
    if model_args:
        argv += ["--model_args", json.dumps(model_args)]
    for key, value in CPU_OVERRIDES.items():
        if values.get(key):
            argv += [f"--{key}", value]
    return argv


def card_hyperparameters(folder: Path) -> dict[str, str]:
    """The ``| name | value |`` rows of a model card's hyperparameter table."""
    text = (folder / "README.md").read_text()
    return dict(re.findall(r"^\| ([\w ]+?) \| (.+?) \|$", text, flags=re.MULTILINE))


def assert_trained(folder: Path, steps: int, n: int, m: int, top1: float | None = None) -> None:
    """``folder`` is what a real run writes: ``steps`` optimizer steps (the Trainer's own count in its
    newest checkpoint, and the card's), an evaluation in the card, exact ``n:m`` weights."""
    hyper = card_hyperparameters(folder)
    assert hyper["global_steps"] == str(steps), hyper
    checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if checkpoints:
        state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
        assert state["global_step"] == steps
    results = metadata_load(folder / "README.md")["model-index"][0]["results"]
    values = {metric["name"]: metric["value"] for result in results for metric in result["metrics"]}
    assert math.isfinite(values["Top-1 accuracy"])
    if top1 is not None:
        assert values["Top-1 accuracy"] == pytest.approx(top1, abs=0.01)
    config = bh.BiMaskConfig.load_json(folder)
    assert (config["n"], config["m"]) == (n, m)
    checked = bh.check_nm(str(folder))
    assert checked and len(checked) == len(config["sparse_layers"])


def _values(recipe: Path) -> dict:
    return yaml.safe_load(recipe.read_text()) or {}


# One recipe goes through the console script (exit status, a fresh process): the first that evaluates
# during training, which is what used to skip training (transformers then sets do_eval=True).
CONSOLE_SCRIPT_RECIPE = next(r for r in RECIPES if _values(r).get("eval_strategy", "no") != "no")


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_trains_evaluates_and_saves_exact_nm(recipe, tmp_path, monkeypatch):
    values = _values(recipe)
    out = tmp_path / "out"
    argv = [str(recipe), *recipe_overrides(recipe), "--output_dir", str(out)]
    if recipe == CONSOLE_SCRIPT_RECIPE:
        script = shutil.which("bimask-train")
        assert script is not None
        proc = subprocess.run([script, *argv], env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "sparse training" in proc.stdout and "Hub-ready model folder" in proc.stdout
        top1 = float(proc.stdout.split("eval top-1 ")[1].split("%")[0])
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
        metrics = main(argv)
        assert metrics["eval_samples_per_second"] > 0
        top1 = metrics["eval_top1"]
    assert_trained(out, STEPS, values.get("n", 2), values.get("m", 4), top1=top1)
    if values.get("eval_strategy", "no") != "no":  # the recipe's own evaluation during training ran, too
        state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
        assert any("eval_top1" in entry for entry in state["log_history"]), state["log_history"]


def _needs_gpu(config: dict) -> str | None:
    if config.get("use_cpu") or "gpu_ids" not in config:
        return None
    return f"needs {config.get('num_processes', 1)} GPU process(es) (gpu_ids: {config['gpu_ids']})"


@pytest.mark.parametrize("config_file", ACCELERATE_CONFIGS, ids=[c.stem for c in ACCELERATE_CONFIGS])
def test_every_cpu_accelerate_config_trains_a_recipe(config_file, tmp_path):
    config = yaml.safe_load(config_file.read_text())
    if config_file.name in RUN_ELSEWHERE:
        pytest.skip(f"run by {RUN_ELSEWHERE[config_file.name]}")
    reason = _needs_gpu(config)
    if reason:
        pytest.skip(reason)
    recipe = ROOT / "recipes" / "fashion_mnist_quickstart.yaml"
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
                           "-m", "bimask_hf.train", str(recipe), *recipe_overrides(recipe), "--output_dir", str(out)],
                          env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("Hub-ready model folder") == 1
    values = _values(recipe)
    assert_trained(out, STEPS, values.get("n", 2), values.get("m", 4))
    assert card_hyperparameters(out)["mixed_precision"] == str(config.get("mixed_precision", "no"))


# ---- training unless evaluation only is asked for -------------------------------------------------

def test_training_is_skipped_only_when_asked(tmp_path):
    from bimask_hf.train import parse_args

    recipe = ROOT / "recipes" / "cifar10_resnet32.yaml"  # eval_strategy: epoch, so transformers sets do_eval
    base = [str(recipe), "--output_dir", str(tmp_path / "out")]
    _, _, args = parse_args(base)
    assert args.do_eval and args.do_train
    for flags in (["--do_train", "false"], ["--do_train=false"], ["--eval_only"], ["--eval_only", "true"]):
        _, _, args = parse_args([*base, "--pretrained_path", str(tmp_path), *flags])
        assert not args.do_train, flags
    evaluate_only = tmp_path / "eval.yaml"
    evaluate_only.write_text(recipe.read_text() + "do_train: false\npretrained_path: org/model\n")
    assert not parse_args([str(evaluate_only)])[2].do_train
    with pytest.raises(SystemExit, match="contradict"):
        parse_args([*base, "--eval_only", "--do_train", "true", "--pretrained_path", str(tmp_path)])
    with pytest.raises(SystemExit, match="--pretrained_path"):  # evaluating freshly initialised weights
        parse_args([*base, "--do_train", "false"])


def test_evaluation_only_reports_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    trained = tmp_path / "trained"
    recipe = ROOT / "recipes" / "fashion_mnist_quickstart.yaml"
    main([str(recipe), *recipe_overrides(recipe), "--output_dir", str(trained)])
    before = {p: p.stat().st_mtime_ns for p in trained.rglob("*")}
    out = tmp_path / "evaluated"
    metrics = main([str(recipe), *recipe_overrides(recipe), "--eval_only", "--pretrained_path", str(trained),
                    "--output_dir", str(out)])
    assert math.isfinite(metrics["eval_top1"]) and metrics["eval_samples_per_second"] > 0
    assert not [p for p in out.rglob("*") if p.is_file()]  # the Trainer makes the folder, nothing goes in
    assert {p: p.stat().st_mtime_ns for p in trained.rglob("*")} == before


def test_randaugment_posterize_at_full_magnitude_keeps_zero_bits():
    """The deit recipe's RandAugment (``rand-m9-mstd0.5-inc1``) draws magnitude 10 for about 2% of its
    posterize calls, which keeps 0 bits; recent Pillow refuses ``bits=0``, which stopped the run."""
    from PIL import Image

    from bimask_hf.data.transforms import RecipeSettings, build_transforms, resolve_settings

    train, _ = build_transforms("deit", image_size=(16, 16), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), in_chans=3,
                                settings=resolve_settings("deit", RecipeSettings()))
    augment = next(t for t in train.transforms[1].transforms if hasattr(t, "ops"))
    posterize = next(op for op in augment.ops if op.name == "PosterizeIncreasing")
    posterize.magnitude, posterize.magnitude_std, posterize.prob = 10, 0, 1.0
    image = Image.new("RGB", (16, 16), (200, 120, 40))
    assert posterize(image).getextrema() == ((0, 0), (0, 0), (0, 0))  # 0 bits kept: black, as older Pillow gave
    posterize.magnitude = 5  # 2 bits kept
    assert posterize(image).getpixel((0, 0)) == (192, 64, 0)
