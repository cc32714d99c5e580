"""A tiny BiMaskTrainer run on scikit-learn's digits, used by the multi-process and resume tests.

Run as a script (plain python or ``accelerate launch``); writes ``<dump>.rank<R>.pt`` with the final
state dict (permutations included), the logged losses and the sparsity logs.
"""

from __future__ import annotations

import argparse
import os
import signal

import torch
from transformers import TrainerCallback, set_seed

from bimask_hf import BiMaskTrainer, BiMaskTrainingArguments, create_model, load_image_classification_data


class KillAfterSave(TrainerCallback):
    """SIGKILL this process right after the checkpoint of ``step`` is written (a crash, not a clean stop)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--output_dir", required=True)
    p.add_argument("--max_steps", type=int, default=8)
    p.add_argument("--save_steps", type=int, default=1000)
    p.add_argument("--kill_at", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--mode", default="bimask")
    p.add_argument("--interval", type=int, default=3)
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--dump", required=True)
    a = p.parse_args()

    set_seed(0)
    data = load_image_classification_data("digits", image_size=16, in_chans=3, seed=0, rank=0, world_size=1)
    model = create_model("resnet8_cifar", labels=data.labels, model_args={"base_width": 16})
    args = BiMaskTrainingArguments(
        output_dir=a.output_dir, max_steps=a.max_steps, per_device_train_batch_size=16, learning_rate=0.05,
        optim="sgd", optim_args="momentum=0.9", lr_scheduler_type="cosine", save_strategy="steps", save_steps=a.save_steps,
        logging_steps=1, report_to="none", permutation_interval=a.interval, permutation_search="random",
        num_permutations=8, mode=a.mode, seed=0, use_cpu=True, bf16=a.bf16, dataloader_num_workers=0,
        gradient_accumulation_steps=a.grad_accum, disable_tqdm=True, save_only_model=False,
    )
    callbacks = [KillAfterSave(a.kill_at)] if a.kill_at else []
    trainer = BiMaskTrainer(model=model, args=args, train_dataset=data.train_dataset, data_collator=data.collate_fn,
                            callbacks=callbacks)
    trainer.train(resume_from_checkpoint=True if a.resume else None)
    rank = trainer.args.process_index
    logs = trainer.state.log_history
    torch.save(
        {
            "state_dict": {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()},
            "losses": [entry["loss"] for entry in logs if "loss" in entry],
            "sparsity": [{k: v for k, v in e.items() if k.startswith("sparsity/")} for e in logs if "loss" in e],
            "world_size": trainer.args.world_size,
            "global_step": trainer.state.global_step,
        },
        f"{a.dump}.rank{rank}.pt",
    )


if __name__ == "__main__":
    main()
