"""Step time of N:M-preserving LoRA (bimask_hf.get_peft_model) against plain peft LoRA on the same sparse model.

    python benchmarks/lora_step.py                      # ViT (hidden 384, 4 blocks, 64 tokens), batch 32
    python benchmarks/lora_step.py --hidden 768 --threads 2

Both variants train the same LoRA adapters (r=8 on q/v/fc1/fc2) of the same 2:4 model; they are timed
interleaved, round by round, and the median forward+backward+step times are compared. The masked update
costs one dense ``O x K`` product ``(B@A) * Mf`` per adapted layer and step, which plain LoRA avoids.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import LoraConfig
from peft import get_peft_model as plain_get_peft_model
from transformers import ViTConfig, ViTForImageClassification

import bimask_hf as bh

TARGETS = ["q_proj", "v_proj", "fc1", "fc2"]


def _sparse_vit(hidden: int, layers: int, image: int) -> torch.nn.Module:
    config = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                       intermediate_size=4 * hidden, image_size=image, patch_size=8, num_labels=100)
    torch.manual_seed(0)
    return bh.merge(bh.sparsify(ViTForImageClassification(config), bh.BiMaskConfig()))


def _step_time(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer) -> float:
    start = time.perf_counter()
    loss = model(pixel_values=x, labels=y).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--image", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, init_lora_weights=False)
    variants = {
        "plain LoRA (peft)": plain_get_peft_model(_sparse_vit(args.hidden, args.layers, args.image), lora),
        "N:M LoRA (bimask-hf)": bh.get_peft_model(_sparse_vit(args.hidden, args.layers, args.image), lora),
    }
    opts = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
            for name, m in variants.items()}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.image, args.image, generator=gen)
    y = torch.randint(0, 100, (args.batch,), generator=gen)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for name, model in variants.items():  # warm-up
        model.train()
        _step_time(model, x, y, opts[name])
    for _ in range(args.rounds):
        for name, model in variants.items():
            times[name].append(_step_time(model, x, y, opts[name]))
    base = statistics.median(times["plain LoRA (peft)"])
    print(f"ViT hidden {args.hidden}, {args.layers} blocks, {(args.image // 8) ** 2} tokens, batch {args.batch}, "
          f"LoRA r={args.rank} on {','.join(TARGETS)}, {args.threads} thread(s), median of {args.rounds}")
    print(f"{'variant':24s} {'step s':>8s} {'ratio':>7s}")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:24s} {med:8.4f} {med / base:7.3f}")


if __name__ == "__main__":
    main()
