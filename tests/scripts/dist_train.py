"""Tiny Bi-Mask runs of a CNN and a ViT under whatever launcher starts this script (DDP, FSDP2, multi-node).

For each model: ``--max_steps`` steps from seed 0 with a checkpoint half way, then a final save
(a Hub folder); with ``--resume`` a second trainer resumes from the checkpoint and trains to the end.
Before training, one shared permutation search on a fresh model records which layers this rank
searched. Writes ``<dump>.rank<R>.pt`` with the full (gathered) state dicts, the permutations, the
losses and whether the parameters were sharded.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import PartialState
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import ViTConfig, ViTForImageClassification, set_seed

import bimask_hf as bh
from bimask_hf import BiMaskTrainer, BiMaskTrainingArguments, create_model, load_image_classification_data
from bimask_hf.distributed import is_sharded
from bimask_hf.layers import BiMaskLayer


def build_model(kind: str, labels: list[str]) -> torch.nn.Module:
    set_seed(0)
    if kind == "cnn":
        return create_model("resnet8_cifar", labels=labels, model_args={"base_width": 16})
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=16, patch_size=4, num_labels=len(labels))
    return ViTForImageClassification(config)


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def train(kind: str, mode: str, data, a, output_dir: str, resume: str | None = None) -> tuple[BiMaskTrainer, dict]:
    model = build_model(kind, data.labels)
    args = BiMaskTrainingArguments(
        output_dir=output_dir, max_steps=a.max_steps, per_device_train_batch_size=8, learning_rate=0.05,
        optim="sgd", optim_args="momentum=0.9", save_strategy="steps", save_steps=a.max_steps // 2,
        logging_steps=1, report_to="none", permutation_interval=a.interval, permutation_search="random",
        num_permutations=8, mode=mode, seed=0, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
        save_only_model=False,
    )
    trainer = BiMaskTrainer(model=model, args=args, train_dataset=data.train_dataset, data_collator=data.collate_fn)
    trainer.train(resume_from_checkpoint=resume)
    perms = {name: layer.bimask_permutation.clone() for name, layer in bh.sparse_layers(trainer.model).items()}
    record = {
        "state_dict": full_state(trainer.model),
        "permutations": perms,
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "sharded": any(is_sharded(p) for p in trainer.model.parameters()),
    }
    return trainer, record


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--output_dir", required=True)
    p.add_argument("--dump", required=True)
    p.add_argument("--runs", default="cnn:bimask,vit:bimask,cnn:pre,vit:post,cnn:transposable,vit:srste",
                   help="model:mode pairs; the first two also get a final save (and --resume)")
    p.add_argument("--max_steps", type=int, default=6)
    p.add_argument("--interval", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="also resume from the half-way checkpoint")
    a = p.parse_args()
    PartialState()  # joins the process group before the shared search below

    data = load_image_classification_data("digits", image_size=16, in_chans=3, seed=0, rank=0, world_size=1,
                                          max_train_samples=256)
    searched: list[str] = []
    original = BiMaskLayer.refresh_permutation

    def counting(self, *args, **kwargs):  # records which layers this rank searched
        searched.append(self._bimask_name)
        return original(self, *args, **kwargs)

    out: dict = {}
    model = bh.sparsify(build_model("vit", data.labels), bh.BiMaskConfig(permutation_search="random", num_permutations=8))
    for name, layer in bh.sparse_layers(model).items():
        layer._bimask_name = name
    BiMaskLayer.refresh_permutation = counting
    bh.refresh_permutations(model, step=3)
    BiMaskLayer.refresh_permutation = original
    out["search"] = {"searched": searched, "permutations": {
        name: layer.bimask_permutation.clone() for name, layer in bh.sparse_layers(model).items()}}

    for index, run in enumerate(a.runs.split(",")):
        kind, mode = run.split(":")
        trainer, out[run] = train(kind, mode, data, a, f"{a.output_dir}/{run}")
        rank = trainer.args.process_index
        out[run]["world_size"] = trainer.args.world_size
        if index < 2:
            trainer.save_model(f"{a.output_dir}/{kind}-final")
            if a.resume:
                _, out[run + "_resumed"] = train(kind, mode, data, a, f"{a.output_dir}/{run}",
                                                 resume=f"{a.output_dir}/{run}/checkpoint-{a.max_steps // 2}")
    torch.save(out, f"{a.dump}.rank{rank}.pt")


if __name__ == "__main__":
    main()
