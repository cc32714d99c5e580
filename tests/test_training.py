"""BiMaskTrainer end to end: real DDP on two CPU processes, SIGKILL + resume, bf16, callbacks, CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import TrainerCallback, set_seed

import bimask_hf as bh
from bimask_hf import BiMaskTrainer, BiMaskTrainingArguments, create_model
from bimask_hf.layers import PERMUTATION_KEY

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "scripts" / "tiny_train.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _run(cmd: list[str], check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _params_and_perms(state_dict: dict) -> dict:
    return {k: v for k, v in state_dict.items() if "running_" not in k and "num_batches" not in k}


@pytest.mark.slow
def test_ddp_two_cpu_processes_keep_ranks_identical(tmp_path):
    out, dump = tmp_path / "ddp", tmp_path / "dump"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(TINY), "--output_dir", str(out), "--max_steps", "16", "--interval", "4", "--dump", str(dump)]
    proc = subprocess.run(cmd, env={**ENV, "ACCELERATE_USE_CPU": "1"}, cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    r0 = torch.load(f"{dump}.rank0.pt")
    r1 = torch.load(f"{dump}.rank1.pt")
    assert r0["world_size"] == 2 and r1["world_size"] == 2
    a, b = _params_and_perms(r0["state_dict"]), _params_and_perms(r1["state_dict"])
    assert a.keys() == b.keys()
    for key in a:  # weights and permutations; BN running stats are per-rank in DDP by design
        assert torch.equal(a[key], b[key]), key
    perms = [k for k in a if k.endswith(PERMUTATION_KEY)]
    assert perms and any(not torch.equal(a[k], torch.arange(len(a[k]))) for k in perms)
    # identical weights and permutations give identical masks on both ranks
    for key in perms:
        weight = a[key.replace(PERMUTATION_KEY, "weight")]
        mat = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
        mf = bh.nm_mask(mat, 2, 4)
        assert torch.equal(bh.backward_mask(mat, mf, a[key], 2, 4), bh.backward_mask(mat, mf, b[key], 2, 4))
    losses = r0["losses"]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses


@pytest.mark.slow
def test_sigkill_and_resume_gives_the_straight_run(tmp_path):
    common = ["--max_steps", "12", "--save_steps", "6", "--interval", "4", "--grad_accum", "2"]
    straight = tmp_path / "straight"
    _run([sys.executable, str(TINY), "--output_dir", str(straight), *common, "--dump", str(straight)])
    crashed = tmp_path / "crashed"
    proc = _run([sys.executable, str(TINY), "--output_dir", str(crashed), *common, "--kill_at", "6",
                 "--dump", str(crashed)], check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]  # really killed, not a clean exit
    assert (crashed / "checkpoint-6").is_dir() and not Path(f"{crashed}.rank0.pt").exists()
    _run([sys.executable, str(TINY), "--output_dir", str(crashed), *common, "--resume", "--dump", str(crashed)])
    a, b = torch.load(f"{straight}.rank0.pt"), torch.load(f"{crashed}.rank0.pt")
    assert a["global_step"] == b["global_step"] == 12
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert b["losses"][-6:] == pytest.approx(a["losses"][-6:], rel=1e-5)


# ---- in-process tests of the callback's per-step work --------------------------------------------

def _trainer(tmp_path, digits, callbacks=(), **kwargs):
    set_seed(0)
    model = create_model("resnet8_cifar", labels=digits.labels, model_args={"base_width": 16})
    defaults = dict(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=16, learning_rate=0.05,
                    report_to="none", use_cpu=True, save_strategy="no", logging_steps=2, disable_tqdm=True,
                    seed=0, permutation_search="random", num_permutations=4)
    args = BiMaskTrainingArguments(**{**defaults, **kwargs})
    return BiMaskTrainer(model=model, args=args, train_dataset=digits.train_dataset, eval_dataset=digits.eval_dataset,
                         data_collator=digits.collate_fn, callbacks=list(callbacks))


class _Recorder(TrainerCallback):
    """Sees the permutations before every step (so after the previous step's callbacks all ran)."""

    def __init__(self):
        self.refresh_steps, self.post_ok, self.logs = [], [], []

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.model = model
        self.last = self._perms()

    def _perms(self):
        return [getattr(layer, PERMUTATION_KEY).clone() for layer in bh.sparse_layers(self.model).values()]

    def _check(self, step):
        perms = self._perms()
        if any(not torch.equal(a, b) for a, b in zip(perms, self.last)):
            self.refresh_steps.append(step)
        self.last = perms

    def on_step_begin(self, args, state, control, **kw):
        self._check(state.global_step)

    def on_train_end(self, args, state, control, **kw):
        self._check(state.global_step)

    def on_step_end(self, args, state, control, **kw):
        for layer in bh.sparse_layers(self.model).values():
            mf, _ = layer.compute_masks()
            self.post_ok.append(bool(((layer.weight != 0) <= mf).all()))

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs))
        # |Mb| / |Mf| of every bi-directional layer at this moment, counted from the masks themselves
        self.retentions = getattr(self, "retentions", [])
        layers = [layer for layer in bh.sparse_layers(self.model).values() if layer.effective_mode == "bimask"]
        self.retentions.append([int(mb.sum()) / int(mf.sum()) for mf, mb in (layer.compute_masks() for layer in layers)])


def test_refresh_every_interval_optimizer_steps_with_grad_accumulation(tmp_path, digits):
    rec = _Recorder()
    trainer = _trainer(tmp_path, digits, [rec], max_steps=9, permutation_interval=3, gradient_accumulation_steps=2)
    trainer.train()
    # with accumulation the interval counts optimizer steps: refreshes only at start and steps 3, 6, 9
    assert 0 in rec.refresh_steps and set(rec.refresh_steps) <= {0, 3, 6, 9}, rec.refresh_steps
    assert len(set(rec.refresh_steps) - {0}) >= 1
    train_logs = [log for log in rec.logs if "loss" in log]
    assert train_logs and all({"sparsity/sparse_density", "sparsity/model_density", "sparsity/retention_mean", "sparsity/retention_min",
                               "sparsity/permutation_search_seconds"} <= set(log) for log in train_logs)
    assert all(log["sparsity/sparse_density"] == pytest.approx(0.5) and log["sparsity/model_density"] > 0.5 for log in train_logs)
    # the logged retentions are the mean / min of the per-layer |Mb| / |Mf| at the moment of the log
    for log, ratios in zip(rec.logs, rec.retentions):
        if "loss" in log:
            assert log["sparsity/retention_mean"] == pytest.approx(sum(ratios) / len(ratios))
            assert log["sparsity/retention_min"] == pytest.approx(min(ratios)) and min(ratios) < max(ratios)


def test_post_mode_projects_after_every_optimizer_step(tmp_path, digits):
    rec = _Recorder()
    _trainer(tmp_path, digits, [rec], mode="post", max_steps=4).train()
    assert rec.post_ok and all(rec.post_ok)  # weights outside the mask are exactly zero after each step


def test_srste_mode_keeps_dense_weights(tmp_path, digits):
    rec = _Recorder()
    _trainer(tmp_path, digits, [rec], mode="srste", max_steps=2).train()
    assert not all(rec.post_ok)  # the parameter itself stays dense: only its forward use is masked
    assert rec.refresh_steps == []


def test_evaluation_reports_top1_top5(tmp_path, digits):
    trainer = _trainer(tmp_path, digits, max_steps=2)
    trainer.train()
    metrics = trainer.evaluate()
    # the same numbers by hand: run the model over the eval set and count hits in percent
    model = trainer.model.eval()
    hits1 = hits5 = total = 0
    loader = torch.utils.data.DataLoader(digits.eval_dataset, batch_size=64, collate_fn=digits.collate_fn)
    with torch.no_grad():
        for batch in loader:
            logits = model(pixel_values=batch["pixel_values"]).logits
            top5 = logits.topk(5, dim=-1).indices
            labels = batch["labels"]
            hits1 += int((top5[:, 0] == labels).sum())
            hits5 += int((top5 == labels[:, None]).any(-1).sum())
            total += len(labels)
    assert metrics["eval_top1"] == pytest.approx(100.0 * hits1 / total)
    assert metrics["eval_top5"] == pytest.approx(100.0 * hits5 / total)
    assert hits5 > hits1  # a 2-step model is not perfect: the two metrics must differ here


def test_label_smoothing_changes_the_loss(tmp_path, digits):
    plain = _trainer(tmp_path, digits, max_steps=1)
    smooth = _trainer(tmp_path, digits, max_steps=1, label_smoothing_factor=0.1)
    batch = next(iter(plain.get_train_dataloader()))
    with torch.no_grad():
        a = plain.compute_loss(plain.model, dict(batch))
        b = smooth.compute_loss(smooth.model, dict(batch))
    logits = plain.model(pixel_values=batch["pixel_values"]).logits
    ref = torch.nn.functional.cross_entropy(logits, batch["labels"], label_smoothing=0.1)
    assert not torch.isclose(a, b) and torch.isclose(b, ref, rtol=1e-4)


def test_no_weight_decay_on_norm_layers_and_biases(tmp_path, digits):
    trainer = _trainer(tmp_path, digits, weight_decay=1e-3)
    names = trainer.get_decay_parameter_names(trainer.model)
    assert "timm_model.layer1.0.conv1.weight" in names
    assert not any("bn" in n or n.endswith(".bias") for n in names)


def test_bf16_mixed_precision_run(tmp_path, digits):
    trainer = _trainer(tmp_path, digits, bf16=True, max_steps=4, learning_rate=0.05, optim="sgd")
    seen = []
    layer = next(iter(bh.sparse_layers(trainer.model).values()))
    hook = layer.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer.train()
    hook.remove()
    assert torch.bfloat16 in seen  # the sparse layers really ran under bf16 autocast
    assert layer.weight.dtype == torch.float32
    # The same run in float32 from the same seed: bf16 changes rounding, not the training. The sparse
    # layers' updates must agree closely (a lost or wrong weight gradient under autocast would not).
    name = next(iter(bh.sparse_layers(trainer.model)))
    reference = _trainer(tmp_path / "fp32", digits, max_steps=4, learning_rate=0.05, optim="sgd")
    start = reference.model.get_submodule(name).weight.detach().clone()
    reference.train()
    update_fp32 = reference.model.get_submodule(name).weight.detach() - start
    update_bf16 = layer.weight.detach() - start
    assert update_fp32.norm() > 0
    # bf16 rounding of small, partly cancelling gradients moves individual entries (measured: ~25 % in norm)
    assert (update_bf16 - update_fp32).norm() < 0.5 * update_fp32.norm()
    assert torch.nn.functional.cosine_similarity(update_bf16.flatten(), update_fp32.flatten(), dim=0) > 0.9
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    losses32 = [log["loss"] for log in reference.state.log_history if "loss" in log]
    assert losses == pytest.approx(losses32, rel=0.05)


# ---- the command line ---------------------------------------------------------------------------

def _image_folder(root: Path, per_class: int = 12) -> Path:
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    gen = torch.Generator().manual_seed(0)
    for split, count in (("train", per_class), ("val", per_class // 2)):
        for name, rgb in colours.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                noise = (torch.rand(16, 16, 3, generator=gen) * 40).to(torch.uint8).numpy()
                img = Image.new("RGB", (16, 16), rgb)
                arr = (torch.tensor(list(img.getdata())).reshape(16, 16, 3).numpy() // 2 + noise).astype("uint8")
                Image.fromarray(arr).save(root / split / name / f"{i}.png")
    return root


@pytest.mark.slow
def test_cli_end_to_end_on_local_imagefolder(tmp_path):
    data = _image_folder(tmp_path / "data")
    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model: resnet8_cifar\nrecipe: cifar\nimage_size: 16\nper_device_train_batch_size: 12\n"
        "num_train_epochs: 2\nlearning_rate: 0.05\nreport_to: none\nuse_cpu: true\nlogging_steps: 1\n"
        "permutation_interval: 2\nsave_strategy: 'no'\n"
    )
    proc = _run([sys.executable, "-m", "bimask_hf.train", str(recipe), "--data_path", str(data), "--job_dir", str(out),
                 "--N", "1", "--M", "4"])
    assert "1:4 sparse training" in proc.stdout and "layer1.0.conv1" in proc.stdout
    assert "eval top-1" in proc.stdout
    for name in ("model.safetensors", "config.json", "bimask_config.json", "README.md"):
        assert (out / name).is_file(), name
    cfg = bh.BiMaskConfig.load_json(out)
    assert cfg["n"] == 1 and cfg["m"] == 4 and cfg["sparse_layers"]
    from safetensors.torch import load_file

    weights = load_file(out / "model.safetensors")
    assert not any(k.endswith(PERMUTATION_KEY) for k in weights)
    # TimmWrapper folders store timm's own key names (no "timm_model." prefix), so timm loads them too
    checked = bh.check_nm(weights, 1, 4, layers=[name.removeprefix("timm_model.") for name in cfg["sparse_layers"]])
    assert len(checked) == 6
    ev = _run([sys.executable, "-m", "bimask_hf.evaluation", str(out), "--dataset", str(data), "--split", "val",
               "--update-card"])
    assert "top-1" in ev.stdout and "top-5" in ev.stdout
    top1 = float(ev.stdout.split("top-1 ")[1].split("%")[0])
    from huggingface_hub.repocard import metadata_load

    meta = metadata_load(out / "README.md")
    results = meta["model-index"][0]["results"]
    # The val/ folder is the "validation" split: bimask-eval's result replaced the training run's one.
    assert [r["dataset"]["split"] for r in results] == ["validation"]
    values = {m["name"]: m["value"] for r in results for m in r["metrics"] if r["dataset"]["split"] == "validation"}
    assert values["Top-1 accuracy"] == pytest.approx(top1, abs=0.01)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--dataset", "/no/such/folder"], "does not exist"),
        (["--dataset", "not_a_dataset_name"], "nknown"),
        (["--model", "not_a_model_xyz", "--dataset", "digits"], "Unknown model"),
        (["--dataset", "digits", "--n", "5"], "n must be <= m"),
        (["--dataset", "digits", "--nm_layers", "no_such_layer"], "matches no Linear/Conv2d"),
    ],
)
def test_cli_bad_input_fails_before_training(tmp_path, argv, message):
    from bimask_hf.train import build, parse_args

    with pytest.raises((ValueError, SystemExit)) as err:
        build(*parse_args([*argv, "--output_dir", str(tmp_path), "--use_cpu", "true", "--report_to", "none",
                           "--model", "resnet8_cifar"] if "--model" not in argv else
                          [*argv, "--output_dir", str(tmp_path), "--use_cpu", "true", "--report_to", "none"]))
    assert message in str(err.value)


def test_pretrained_path_to_a_bimask_folder_keeps_its_pattern(tmp_path, digits):
    # bimask-train --pretrained_path: a bimask-hf folder is loaded with its N:M layers (1:4 here, not the
    # 2:4 default); a folder without bimask_config.json is a plain model, sparsified with the arguments' 2:4.
    from bimask_hf.train import build, parse_args

    model = create_model("resnet8_cifar", labels=digits.labels, model_args={"base_width": 16})
    bh.sparsify(model, bh.BiMaskConfig(n=1, m=4))
    folder = tmp_path / "sparse"
    bh.save_sparse_model(model, str(folder))
    argv = ["--model", "resnet8_cifar", "--dataset", "digits", "--image_size", "16", "--in_chans", "3",
            "--max_train_samples", "32", "--max_eval_samples", "16", "--output_dir", str(tmp_path / "out"),
            "--use_cpu", "true", "--report_to", "none"]
    _, trainer = build(*parse_args([*argv, "--pretrained_path", str(folder)]))
    assert {(layer.n, layer.m) for layer in bh.sparse_layers(trainer.model).values()} == {(1, 4)}
    os.remove(folder / "bimask_config.json")
    _, trainer = build(*parse_args([*argv, "--pretrained_path", str(folder)]))  # plain: sparsified with the args
    assert {(layer.n, layer.m) for layer in bh.sparse_layers(trainer.model).values()} == {(2, 4)}


def test_unknown_recipe_key_is_rejected(tmp_path):
    from bimask_hf.train import parse_args

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: resnet18\nlearning_rat: 0.1\n")
    with pytest.raises(SystemExit, match="learning_rat"):
        parse_args([str(recipe)])


def test_sparsity_metrics_reach_offline_trackers(tmp_path, digits, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb").mkdir()
    monkeypatch.chdir(tmp_path)  # TensorBoard writes under ./runs or the output dir
    trainer = _trainer(tmp_path, digits, max_steps=4, report_to=["tensorboard", "wandb"], run_name="bimask-offline")
    trainer.train()
    import wandb

    wandb.finish()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(p for p in tmp_path.rglob("events.out.tfevents.*") if "wandb" not in str(p))
    assert events, "no TensorBoard event file written"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/sparsity/retention_mean" in tags and "train/sparsity/sparse_density" in tags, tags
    assert acc.Scalars("train/sparsity/sparse_density")[-1].value == pytest.approx(0.5)
    history = list((tmp_path / "wandb").rglob("*.wandb"))
    assert history, "no offline wandb run written"
    assert b"sparsity/retention_min" in history[0].read_bytes()


def test_soft_target_cross_entropy_matches_its_formula_in_float32():
    from bimask_hf.trainer import soft_target_cross_entropy

    torch.manual_seed(0)
    logits = torch.randn(6, 5, dtype=torch.float64)
    targets = torch.softmax(torch.randn(6, 5, dtype=torch.float64), dim=-1)  # mixup-like soft labels
    expected = -(targets * (logits - logits.logsumexp(-1, keepdim=True))).sum(-1).mean()
    assert torch.allclose(soft_target_cross_entropy(logits, targets).double(), expected, atol=1e-6)
    low = soft_target_cross_entropy(logits.bfloat16(), targets.bfloat16())
    assert low.dtype == torch.float32
