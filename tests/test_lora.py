"""LoRA fine-tuning of sparse models (bimask_hf.get_peft_model): the N:M pattern and the outputs survive the merge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset

peft = pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402
from peft.tuners.lora import Linear as LoraLinear  # noqa: E402
from transformers import AutoModelForImageClassification  # noqa: E402

import bimask_hf as bh  # noqa: E402
from bimask_hf import BiMaskTrainer, BiMaskTrainingArguments  # noqa: E402
from bimask_hf.hub import save_sparse_model  # noqa: E402
from bimask_hf.lora import load_peft_model  # noqa: E402

from . import models  # noqa: E402
from .olah_server import serve_local_repos, use_endpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "v_proj", "fc1", "fc2", "classifier"]  # classifier: a dense target gets plain LoRA


def _lora_config() -> LoraConfig:
    # init_lora_weights=False: B is random too, so the update is nonzero from the first step
    return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)


@pytest.fixture(scope="module")
def sparse_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = bh.sparsify(models.tiny_vit(), bh.BiMaskConfig())
    return save_sparse_model(model, tmp_path_factory.mktemp("lora") / "vit-2-4")


def _sparse_names(folder: str) -> list[str]:
    return bh.BiMaskConfig.load_json(folder)["sparse_layers"]


def _train_steps(model, steps: int = 3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05)
    gen = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        x = torch.randn(4, 3, 32, 32, generator=gen)
        loss = model(pixel_values=x, labels=torch.randint(0, 10, (4,), generator=gen)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


def _logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(pixel_values=x).logits


def test_plain_automodel_lora_merge_stays_nm_and_computes_what_was_trained(sparse_folder):
    base = AutoModelForImageClassification.from_pretrained(sparse_folder)
    peft_model = bh.get_peft_model(base, _lora_config())
    assert isinstance(peft_model, peft.PeftModel)
    masked = [n for n, m in peft_model.named_modules() if type(m).__name__ == "MaskedLoraLinear"]
    assert len(masked) == 8  # q_proj, v_proj, fc1, fc2 in both blocks; never the dense classifier
    head = peft_model.get_submodule("base_model.model.classifier")
    assert type(head) is LoraLinear  # plain LoRA on a dense target
    assert not bh.sparse_layers(peft_model)  # adapters are never sparsified
    _train_steps(peft_model)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    adapted = _logits(peft_model, x)
    merged = peft_model.merge_and_unload()  # peft's own merge
    assert bh.check_nm(merged, 2, 4, layers=_sparse_names(sparse_folder))
    torch.testing.assert_close(_logits(merged, x), adapted, atol=1e-5, rtol=0)
    # the sparse layers really changed (inside their mask), the dense head too
    plain = AutoModelForImageClassification.from_pretrained(sparse_folder)
    fc1 = "vit.layers.0.mlp.fc1.weight"
    before, after = plain.state_dict()[fc1], merged.state_dict()[fc1]
    assert not torch.equal(before, after) and torch.equal(before != 0, after != 0)


def test_plain_lora_would_lose_the_pattern(sparse_folder):
    """The failure this module exists for: peft's own get_peft_model merges a dense update."""
    base = AutoModelForImageClassification.from_pretrained(sparse_folder)
    plain = peft.get_peft_model(base, _lora_config())
    merged = plain.merge_and_unload()
    with pytest.raises(bh.NMPatternError):
        bh.check_nm(merged, 2, 4, layers=_sparse_names(sparse_folder))


def test_adapters_round_trip_on_the_sparse_base(sparse_folder, tmp_path):
    base = AutoModelForImageClassification.from_pretrained(sparse_folder)
    peft_model = bh.get_peft_model(base, _lora_config())
    _train_steps(peft_model, steps=1)
    peft_model.save_pretrained(tmp_path / "adapters")
    files = set(os.listdir(tmp_path / "adapters"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    x = torch.randn(2, 3, 32, 32)
    reloaded = load_peft_model(AutoModelForImageClassification.from_pretrained(sparse_folder), tmp_path / "adapters")
    assert isinstance(reloaded, peft.PeftModel)
    torch.testing.assert_close(_logits(reloaded, x), _logits(peft_model, x), atol=1e-6, rtol=0)
    merged = reloaded.merge_and_unload()
    bh.check_nm(merged, 2, 4, layers=_sparse_names(sparse_folder))


@pytest.fixture(scope="module")
def lora_hub(tmp_path_factory, sparse_folder):
    with serve_local_repos(str(tmp_path_factory.mktemp("olah"))) as hub:
        hub.add_model_repo("bimask-test/vit-2-4", sparse_folder)
        yield hub


def test_hub_base_lora_and_adapters_that_plain_peft_refuses(lora_hub, sparse_folder, tmp_path, monkeypatch):
    """A base loaded by plain transformers from a Hub id (bimask_config.json read through the Hub cache);
    its adapters say how to load them, and plain PeftModel.from_pretrained refuses them (dense merge)."""
    use_endpoint(monkeypatch, lora_hub.endpoint)
    cache = str(tmp_path / "cache")

    def base():
        return AutoModelForImageClassification.from_pretrained("bimask-test/vit-2-4", cache_dir=cache)

    peft_model = bh.get_peft_model(base(), _lora_config())
    assert len([m for m in peft_model.modules() if type(m).__name__ == "MaskedLoraLinear"]) == 8
    _train_steps(peft_model, steps=1)
    peft_model.save_pretrained(tmp_path / "adapters")
    with open(tmp_path / "adapters" / "adapter_config.json") as f:
        saved = json.load(f)
    assert saved["bimask_hf"]["loader"] == "bimask_hf.lora.load_peft_model"
    assert sorted(saved["bimask_hf"]["target_modules"]) == sorted(TARGETS)
    assert "load_peft_model(base" in (tmp_path / "adapters" / "README.md").read_text()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    reloaded = load_peft_model(base(), tmp_path / "adapters")
    torch.testing.assert_close(_logits(reloaded, x), _logits(peft_model, x), atol=1e-6, rtol=0)
    bh.check_nm(reloaded.merge_and_unload(), 2, 4, layers=_sparse_names(sparse_folder))
    with pytest.raises(ValueError, match=r"bimask_hf\.lora\.load_peft_model"):
        peft.PeftModel.from_pretrained(base(), tmp_path / "adapters")


def _image_dataset(n: int = 24) -> Dataset:
    gen = torch.Generator().manual_seed(3)
    data = Dataset.from_dict({"pixel_values": torch.randn(n, 3, 32, 32, generator=gen).numpy(),
                              "labels": torch.randint(0, 10, (n,), generator=gen).tolist()})
    return data.with_format("torch")


def test_bimask_trainer_fine_tunes_a_model_under_bimask_training_and_saves_merged_nm(tmp_path):
    torch.manual_seed(0)
    model = bh.sparsify(models.tiny_vit(), bh.BiMaskConfig())
    reference_masks = {n: layer.forward_mask.clone() for n, layer in bh.sparse_layers(model).items()}
    peft_model = bh.get_peft_model(model, _lora_config())
    args = BiMaskTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=8,
                                   learning_rate=0.01, report_to="none", use_cpu=True, save_strategy="no",
                                   disable_tqdm=True, permutation_interval=1, merge_lora=True)
    trainer = BiMaskTrainer(model=peft_model, args=args, train_dataset=_image_dataset(),
                            card_info={"base_model": "org/vit-2-4"})
    assert not bh.sparse_layers(trainer.model)  # nothing (adapters included) was sparsified
    trainer.train()
    x = torch.randn(2, 3, 32, 32)
    adapted = _logits(trainer.model, x)
    trainer.save_model()
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").is_file()
    merged_folder = out / "merged"
    checked = bh.check_nm(str(merged_folder))
    assert sorted(checked) == sorted(reference_masks)
    merged = AutoModelForImageClassification.from_pretrained(merged_folder)
    torch.testing.assert_close(_logits(merged, x), adapted, atol=1e-5, rtol=0)
    for name, mask in reference_masks.items():  # the masks fixed at the start are the merged zero pattern
        assert torch.equal(merged.get_submodule(name).weight != 0, mask), name
    card = (merged_folder / "README.md").read_text()
    assert "LoRA fine-tuned from [org/vit-2-4]" in card


def test_bimask_trainer_refuses_plain_lora_on_bimask_layers(tmp_path):
    model = bh.sparsify(models.tiny_vit(), bh.BiMaskConfig())
    plain = peft.get_peft_model(model, LoraConfig(r=2, target_modules=["fc1"]))
    args = BiMaskTrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="bimask_hf.get_peft_model"):
        BiMaskTrainer(model=plain, args=args, train_dataset=_image_dataset(8))


def test_get_peft_model_needs_sparse_layers():
    with pytest.raises(ValueError, match="no sparse Linear layers"):
        bh.get_peft_model(models.tiny_vit(), _lora_config())


@pytest.mark.slow
def test_lora_under_two_process_ddp(sparse_folder, tmp_path):
    script = tmp_path / "lora_ddp.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(sparse_folder),
           str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    r0, r1 = (torch.load(tmp_path / "out" / f"lora.rank{r}.pt") for r in (0, 1))
    assert r0.keys() == r1.keys() and any("lora_A" in k for k in r0)
    for key in r0:  # DDP keeps the adapters identical on both ranks
        assert torch.equal(r0[key], r1[key]), key
    assert bh.check_nm(str(tmp_path / "out" / "merged"))


_DDP_SCRIPT = '''
import os, sys
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForImageClassification
import bimask_hf as bh
from bimask_hf import BiMaskTrainer, BiMaskTrainingArguments

folder, out = sys.argv[1], sys.argv[2]
model = bh.get_peft_model(AutoModelForImageClassification.from_pretrained(folder),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1", "fc2"]))
gen = torch.Generator().manual_seed(3)
data = Dataset.from_dict({"pixel_values": torch.randn(32, 3, 32, 32, generator=gen).numpy(),
                          "labels": torch.randint(0, 10, (32,), generator=gen).tolist()}).with_format("torch")
args = BiMaskTrainingArguments(output_dir=out, max_steps=3, per_device_train_batch_size=4, learning_rate=0.1,
                               report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                               merge_lora=True, ddp_backend="gloo")
trainer = BiMaskTrainer(model=model, args=args, train_dataset=data)
trainer.train()
assert trainer.args.world_size == 2
state = {k: v for k, v in trainer.model.state_dict().items() if "lora_" in k}
trainer.save_model()
os.makedirs(out, exist_ok=True)
torch.save(state, os.path.join(out, f"lora.rank{trainer.args.process_index}.pt"))
'''


@pytest.mark.slow
def test_cli_lora_fine_tune_writes_adapters_and_merged_nm_folder(sparse_folder, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "bimask_hf.train", "--model", "vit", "--pretrained_path", str(sparse_folder),
           "--dataset", "digits", "--image_size", "32", "--output_dir", str(out), "--max_steps", "3",
           "--per_device_train_batch_size", "8", "--lora_r", "4", "--lora_target_modules", "q_proj,v_proj,fc1,fc2",
           "--merge_lora", "true", "--report_to", "none", "--use_cpu", "true", "--save_strategy", "no",
           "--max_eval_samples", "32"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "LoRA fine-tuning of a 2:4 sparse model, N:M masks fixed" in proc.stdout
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out))
    assert sorted(bh.check_nm(str(out / "merged"))) == sorted(_sparse_names(sparse_folder))
    assert f"LoRA fine-tuned from [{sparse_folder}]" in (out / "merged" / "README.md").read_text()


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["folded", "separate-dropout-path"])
def test_masked_lora_forward_and_gradients_match_explicit_formulas(dropout):
    """y = x ((W + s·B@A) ⊙ M)ᵀ + b; dA = s·Bᵀ((gᵀx) ⊙ M), dB = s·((gᵀx) ⊙ M)Aᵀ, dx = g((W + s·B@A) ⊙ M)."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 8))
    with torch.no_grad():
        base[0].weight.mul_(torch.rand(8, 16) > 0.5)
    mask = base[0].weight.detach() != 0
    w, bias = base[0].weight.detach().clone(), base[0].bias.detach().clone()
    config = LoraConfig(r=2, lora_alpha=6, target_modules=["0"], lora_dropout=dropout, init_lora_weights=False)
    model = bh.get_peft_model(base, config, sparse_layers=["0"])
    model.eval()  # dropout > 0 still takes the separate (unfolded) path, with identity dropout
    layer = model.base_model.model[0]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = 3.0  # lora_alpha / r
    x = torch.randn(5, 16, requires_grad=True)
    out = model(x)
    adapted = (w + s * b.detach() @ a.detach()) * mask
    torch.testing.assert_close(out, x.detach() @ adapted.T + bias)
    g = torch.randn_like(out)
    out.backward(g)
    gx = (g.T @ x.detach()) * mask
    torch.testing.assert_close(a.grad, s * b.detach().T @ gx)
    torch.testing.assert_close(b.grad, s * gx @ a.detach().T)
    torch.testing.assert_close(x.grad, g @ adapted)


def test_lora_on_sparse_convolutions_is_refused():
    model = bh.sparsify(models.timm_model("resnet18"), bh.BiMaskConfig())
    with pytest.raises(ValueError, match="sparse Conv2d layers"):
        bh.get_peft_model(model, LoraConfig(r=2, target_modules=["conv1"]))


# ---- guards from the mutation audit ---------------------------------------------------------------

def _masked_lora(dropout: float = 0.0):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 8))
    with torch.no_grad():
        base[0].weight.mul_(bh.nm_mask(base[0].weight, 2, 4))
    config = LoraConfig(r=2, lora_alpha=6, target_modules=["0"], lora_dropout=dropout, init_lora_weights=False)
    return bh.get_peft_model(base, config, sparse_layers=["0"])


def test_merge_adapter_and_unmerge_adapter_leave_the_output_unchanged():
    model = _masked_lora()
    model.eval()
    layer = model.base_model.model[0]
    w = layer.get_base_layer().weight.detach().clone()
    x = torch.randn(5, 16)
    with torch.no_grad():
        before = model(x)
        model.merge_adapter()
        merged = layer.get_base_layer().weight.detach().clone()
        torch.testing.assert_close(model(x), before)
        model.unmerge_adapter()
        torch.testing.assert_close(model(x), before)
    assert not torch.equal(merged, w) and not ((merged != 0) & (w == 0)).any()  # merged inside the mask
    torch.testing.assert_close(layer.get_base_layer().weight.detach(), w)  # unmerged: W again


def test_lora_dropout_acts_in_train_mode_on_the_update_only():
    """Train mode: y = x (W ⊙ M)ᵀ + b + dropout(x) ((s·B@A) ⊙ M)ᵀ, dropout drawn as F.dropout draws it."""
    model = _masked_lora(dropout=0.5)
    model.train()
    layer = model.base_model.model[0]
    base = layer.get_base_layer()
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    mask = base.nm_mask
    x = torch.randn(64, 16)
    torch.manual_seed(5)
    out = model(x).detach()
    torch.manual_seed(5)
    dropped = torch.nn.functional.dropout(x, 0.5, training=True)
    assert not torch.equal(dropped, x)
    expected = x @ base.weight.detach().T + base.bias.detach() + dropped @ ((3.0 * b @ a) * mask).T
    torch.testing.assert_close(out, expected)


def test_lora_on_a_sparse_conv_is_refused_in_a_model_with_sparse_linears_too():
    class ConvAndLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    def sparse_model():
        return bh.sparsify(ConvAndLinear(), bh.BiMaskConfig(target_modules=["conv", "fc"]))

    with pytest.raises(ValueError, match=r"sparse Conv2d layers \['conv'\]"):
        bh.get_peft_model(sparse_model(), LoraConfig(r=2, target_modules=["conv", "fc"]))
    model = bh.get_peft_model(sparse_model(), LoraConfig(r=2, target_modules=["fc"]))  # the Linear alone: fine
    assert type(model.base_model.model.fc).__name__ == "MaskedLoraLinear"
