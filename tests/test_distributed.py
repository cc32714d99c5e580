"""Beyond one process: FSDP2 against multi-node DDP, FSDP2 resume and final save, the shared permutation
search, and per-rank streaming of a Hub dataset served by the loopback olah server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, ViTForImageClassification

import bimask_hf as bh
from bimask_hf.distributed import assign_layers, describe_setup, full_tensor, shard_like
from bimask_hf.layers import PERMUTATION_KEY
from bimask_hf.masks import nm_mask_for_weight
from bimask_hf.trainer import unsupported_setup_reason

from .hub_datasets import CIFAR10_NAMES, write_cifar10_like
from .olah_server import free_port, serve_local_repos
from .test_recipes import assert_trained

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "scripts"
CONFIGS = ROOT / "recipes" / "accelerate"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1", "WANDB_MODE": "disabled"}
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]


def _start(cmd: list[str], log: Path, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    handle = open(log, "w")
    return subprocess.Popen(cmd, env=env or ENV, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT), log


def _finish(started: list[tuple[subprocess.Popen, Path]], timeout: int = 600) -> list[str]:
    outputs = []
    for proc, log in started:
        code = proc.wait(timeout=timeout)
        text = log.read_text()
        assert code == 0, f"{proc.args} failed ({code}):\n{text[-6000:]}"
        outputs.append(text)
    return outputs


def _weights(state: dict) -> dict:
    # BatchNorm running statistics come from each rank's own batches: not synchronised under FSDP
    return {k: v for k, v in state.items() if "running_" not in k and "num_batches" not in k}


# ---- FSDP2 vs DDP over two "machines" -----------------------------------------------------------

@pytest.mark.slow
def test_fsdp2_matches_multi_node_ddp_resumes_and_saves_exact_nm(tmp_path):
    script = str(SCRIPTS / "dist_train.py")
    fsdp = _start([*LAUNCH, "--config_file", str(CONFIGS / "cpu_fsdp_2proc.yaml"), script, "--resume",
                   "--output_dir", str(tmp_path / "fsdp"), "--dump", str(tmp_path / "fsdp")], tmp_path / "fsdp.log")
    port = str(free_port())
    machines = [
        _start([*LAUNCH, "--config_file", str(CONFIGS / "multi_node.yaml"), "--num_processes", "2",
                "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                "--main_process_port", port, "--mixed_precision", "no", script,
                "--output_dir", str(tmp_path / "ddp"), "--dump", str(tmp_path / "ddp")], tmp_path / f"machine{rank}.log")
        for rank in (0, 1)
    ]
    fsdp_log, machine0_log, machine1_log = _finish([fsdp, *machines])
    assert "mode=bimask, FSDP2 x2 (cpu)" in fsdp_log
    assert "mode=bimask, DDP x2 on 2 machines (cpu)" in machine0_log
    assert "sparse training" not in machine1_log  # the header comes from the main process only

    f0, f1 = (torch.load(tmp_path / f"fsdp.rank{r}.pt") for r in (0, 1))
    d0 = torch.load(tmp_path / "ddp.rank0.pt")
    for run in ("cnn:bimask", "vit:bimask", "cnn:pre", "vit:post", "cnn:transposable", "vit:srste"):
        kind, mode = run.split(":")
        assert f0[run]["sharded"] and not d0[run]["sharded"] and f0[run]["world_size"] == 2
        fsdp_state, ddp_state = _weights(f0[run]["state_dict"]), _weights(d0[run]["state_dict"])
        assert fsdp_state.keys() == ddp_state.keys()
        for key, value in ddp_state.items():  # same seed, same data order: same weights and permutations
            if key.endswith(PERMUTATION_KEY):
                assert torch.equal(fsdp_state[key], value), key
            else:
                torch.testing.assert_close(fsdp_state[key], value, rtol=1e-5, atol=1e-6, msg=f"{run} {key}")
        assert f0[run]["losses"] == pytest.approx(d0[run]["losses"], rel=1e-5)
        if mode == "post":  # projected in place after every step, on the shards too
            assert all(torch.equal(f0[run]["state_dict"][f"{n}.weight"] == 0,
                                   ~nm_mask_for_weight(f0[run]["state_dict"][f"{n}.weight"], 2, 4))
                       for n in f0[run]["permutations"])
        if mode != "bimask":
            continue
        perms = f0[run]["permutations"]
        assert perms.keys() == f1[run]["permutations"].keys()
        assert all(torch.equal(p, f1[run]["permutations"][n]) for n, p in perms.items())  # identical on ranks
        assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())  # and really searched

        resumed = _weights(f0[run + "_resumed"]["state_dict"])  # sharded checkpoint at step 3, resumed to 6
        for key, value in fsdp_state.items():
            torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6, msg=f"resumed {run} {key}")

        # the final save gathered the full weights: exact N:M zeros of the trained weights
        folder = tmp_path / "fsdp" / f"{kind}-final"
        config = bh.BiMaskConfig.load_json(folder)
        saved = load_file(folder / "model.safetensors")
        layers = config["sparse_layers"]
        assert len(layers) == (6 if kind == "cnn" else 12)
        for name in layers:
            weight = fsdp_state[f"{name}.weight"]
            stored = saved[f"{name.removeprefix('timm_model.')}.weight"] if kind == "cnn" else None
            if stored is not None:
                assert torch.equal(stored, weight * nm_mask_for_weight(weight, 2, 4))
        loader = AutoModelForImageClassification if kind == "cnn" else ViTForImageClassification
        model = loader.from_pretrained(folder)
        dense = {n: m.weight.detach() for n, m in model.named_modules() if n in layers}
        assert dense.keys() == set(layers)
        for name, weight in dense.items():
            expected = fsdp_state[f"{name}.weight"]
            assert torch.equal(weight, expected * nm_mask_for_weight(expected, 2, 4)), name
        bh.check_nm(model, 2, 4, layers=layers)

    # the shared permutation search: each rank searched its share; all ranks hold a single process's result
    sys.path.insert(0, str(SCRIPTS))
    try:
        from dist_train import build_model
    finally:
        sys.path.remove(str(SCRIPTS))
    single = bh.sparsify(build_model("vit", [str(i) for i in range(10)]),
                         bh.BiMaskConfig(permutation_search="random", num_permutations=8))
    bh.refresh_permutations(single, step=3)
    reference = {name: getattr(layer, PERMUTATION_KEY) for name, layer in bh.sparse_layers(single).items()}
    d1 = torch.load(tmp_path / "ddp.rank1.pt")
    for a, b in ((f0, f1), (d0, d1)):
        mine, theirs = set(a["search"]["searched"]), set(b["search"]["searched"])
        assert mine and theirs and not mine & theirs and mine | theirs == set(reference)
        for run in (a, b):
            for name, perm in reference.items():
                assert torch.equal(run["search"]["permutations"][name], perm), name


# ---- streaming a Hub dataset per rank -----------------------------------------------------------

@pytest.mark.slow
def test_hub_cifar10_streams_per_rank_through_the_cli_under_fsdp2(tmp_path):
    repo = tmp_path / "repo"
    sizes = write_cifar10_like(str(repo))
    with serve_local_repos(str(tmp_path / "hub")) as hub:
        hub.add_dataset_repo("uoft-cs/cifar10", str(repo))
        env = {**ENV, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
               "HF_DATASETS_OFFLINE": "0"}
        cli = ["--dataset", "cifar10", "--streaming", "true", "--model", "resnet8_cifar", "--model_args",
               '{"base_width": 8}', "--per_device_train_batch_size", "8", "--max_steps", "3", "--report_to", "none",
               "--shuffle_buffer", "16", "--permutation_search", "random", "--num_permutations", "4",
               "--save_strategy", "no", "--permutation_interval", "2", "--logging_steps", "1"]
        script = str(SCRIPTS / "stream_train.py")
        runs = [
            # FSDP2 with one unit per residual block (nested in the root unit), through the CLI
            _start([*LAUNCH, "--config_file", str(CONFIGS / "cpu_fsdp_2proc.yaml"), "--fsdp_auto_wrap_policy",
                    "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap", "BasicBlock", script, "launched",
                    str(tmp_path / "seen"), *cli, "--output_dir", str(tmp_path / "two")], tmp_path / "two.log", env),
            _start([sys.executable, script, "expected", str(tmp_path / "expected"), *cli,
                    "--output_dir", str(tmp_path / "one")], tmp_path / "one.log", env),
        ]
        two_log, one_log = _finish(runs)
    assert "FSDP2 x2 (cpu)" in two_log and "single process (cpu)" in one_log  # the CLI under FSDP2, and alone
    for out in ("one", "two"):
        assert "eval top-1" in (two_log if out == "two" else one_log)
        assert_trained(tmp_path / out, steps=3, n=2, m=4)  # what tests/test_recipes.py asserts of every recipe
    expected = torch.load(tmp_path / "expected.pt")
    assert expected["label_names"] == CIFAR10_NAMES and expected["image_feature"] == "Image"
    assert {split: len(labels) for split, labels in expected["stream"].items()} == sizes
    ranks = [torch.load(tmp_path / f"seen.rank{r}.pt") for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    everything = set(expected["seen"][0, 0]) | set(expected["seen"][1, 0])
    assert len(everything) == sizes["train"]
    for epoch in (0, 1):
        mine, theirs = ranks[0]["seen"][epoch], ranks[1]["seen"][epoch]
        assert not set(mine) & set(theirs) and set(mine) | set(theirs) == everything  # disjoint, whole dataset
        for rank in (0, 1):  # each rank read exactly its split_dataset_by_node share, in the shuffled order
            assert ranks[rank]["seen"][epoch] == expected["seen"][rank, epoch]
    for rank in (0, 1):  # a new epoch reseeds the shuffle on every rank
        assert ranks[rank]["seen"][0] != ranks[rank]["seen"][1]


# ---- in-process helpers -------------------------------------------------------------------------

def test_layers_are_assigned_largest_first_to_the_least_loaded_rank():
    costs = [9.0, 1.0, 4.0, 4.0, 2.0]
    owners = assign_layers(costs, 2)
    assert owners == [0, 0, 1, 1, 1]
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in (0, 1)]
    assert loads == [10.0, 10.0]
    assert assign_layers(costs, 1) == [0] * 5
    assert sorted(set(assign_layers(costs, 8))) == [0, 1, 2, 3, 4]  # more ranks than layers: one each


def test_unsupported_setups_are_named_with_the_fix():
    assert unsupported_setup_reason() is None
    assert unsupported_setup_reason(fsdp_version=2) is None
    assert unsupported_setup_reason(zero_stage=2) is None
    fsdp1 = unsupported_setup_reason(fsdp_version=1)
    assert "FSDP version 1" in fsdp1 and "fsdp_version: 2" in fsdp1
    zero3 = unsupported_setup_reason(zero_stage=3)
    assert "ZeRO-3" in zero3 and "FSDP2" in zero3


def test_single_process_helpers_are_identities():
    weight = torch.randn(8, 4)
    assert full_tensor(weight) is weight and shard_like(weight, weight) is weight
    assert describe_setup() == "single process (cpu)"


def test_masks_follow_fsdp2_refills():
    torch.manual_seed(0)
    layer = bh.BiMaskLinear(8, 8, n=2, m=4)
    before = layer.masks()[0].clone()
    refill = torch.randn(8, 8)
    assert not torch.equal(nm_mask_for_weight(refill, 2, 4), before)
    # FSDP2 all-gathers into the same storage without bumping the version counter: masks are never
    # cached, so they follow such a refill (and a fused optimizer's step) all the same
    with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(layer.weight):
        layer.weight.copy_(refill)
    assert torch.equal(layer.masks()[0], nm_mask_for_weight(refill, 2, 4))
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, refill * nm_mask_for_weight(refill, 2, 4),
                                                                    layer.bias))


# ---- the launcher's mixed precision reaches a CPU FSDP2 run -------------------------------------

@pytest.mark.slow
def test_cpu_fsdp2_computes_in_the_launchers_bf16():
    """``--mixed_precision bf16`` becomes the FSDP2 policy: the gathered weights are bf16 in forward (the
    fp32 case is the FSDP2-vs-DDP test above)."""
    proc = subprocess.run([*LAUNCH, "--config_file", str(CONFIGS / "cpu_fsdp_2proc.yaml"), "--mixed_precision",
                           "bf16", str(SCRIPTS / "fsdp_precision.py")], env=ENV, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sharded=True weight_in_forward=torch.bfloat16 output=torch.bfloat16" in proc.stdout


def test_saving_a_sharded_model_is_refused_with_the_way_to_gather_it(tmp_path):
    """A plain Trainer under FSDP2 leaves a sharded model: saving its slices would write a fraction of it."""
    code = f"""
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
import bimask_hf as bh
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
model = bh.sparsify(bh.create_model("resnet8_cifar", labels=[str(i) for i in range(4)],
                                    model_args={{"base_width": 8}}), bh.BiMaskConfig())
template = bh.distributed.meta_copy(model)
fully_shard(model)
try:
    bh.save_sparse_model(model, {str(tmp_path / "sharded")!r})
except ValueError as error:
    print("REFUSED:", error)
full = bh.distributed.gather_full_model(model, template, keep=True)
bh.save_sparse_model(full, {str(tmp_path / "full")!r})
print(bh.check_nm({str(tmp_path / "full")!r}) is not None)
dist.destroy_process_group()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "REFUSED: save_sparse_model got an FSDP2-sharded model" in out.stdout and "gather_full_model" in out.stdout
    assert not (tmp_path / "sharded").exists()
    assert out.stdout.strip().endswith("True")
