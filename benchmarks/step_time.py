"""Training-step time and memory of every mode, as ratios to dense, measured side by side in one run.

A step is forward + cross-entropy + backward + SGD step, with the mode's mask work (masks are
recomputed every forward) and the permutation search amortised at the configured interval
(search time / ``--interval`` added to each step). Modes are interleaved round by round so machine
noise hits all of them alike; the median over rounds is reported. Memory is the bytes autograd saves
for backward during one step (deterministic), plus the masks.

    python benchmarks/step_time.py                 # ResNet-32/CIFAR b128 and DeiT-small-sized ViT
    python benchmarks/step_time.py --models resnet32_cifar resnet50 deit_small --unfold
    python benchmarks/step_time.py --quick         # seconds; what CI runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bimask_hf as bh  # noqa: E402
from unfold_baseline import use_unfold_convs  # noqa: E402

# name -> (timm architecture, kwargs, batch, image size, quick batch, quick size)
MODELS = {
    "resnet32_cifar": ("resnet32_cifar", {}, 128, 32, 16, 32),
    "resnet50": ("resnet50", {}, 16, 224, 2, 64),
    "deit_small": ("deit_small_patch16_224", {}, 16, 224, 2, 224),
    "vit_small_cifar": ("vit_small_patch16_224", {"img_size": 32, "patch_size": 4}, 128, 32, 8, 32),
}
MODES = ["dense", "srste", "bimask", "bimask-random", "transposable", "pre", "post"]


def build(name: str, mode: str, interval: int, quick: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor, float]:
    arch, kwargs, batch, size, qbatch, qsize = MODELS[name]
    if quick:
        batch, size = qbatch, qsize
        if "img_size" in kwargs:
            kwargs = {**kwargs, "img_size": size}
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=10 if "cifar" in name else 1000, **kwargs)
    search_seconds = 0.0
    if mode != "dense-plain":
        base = mode.removesuffix("-random").removesuffix("-unfold")
        search = "random" if mode.endswith("-random") else "swap"
        bh.sparsify(model, bh.BiMaskConfig(mode=base, permutation_search=search, permutation_interval=interval))
        if mode.endswith("-unfold"):
            use_unfold_convs(model)
        if base == "bimask":
            search_seconds = bh.refresh_permutations(model, step=interval)["seconds"]
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    return model, x, y, search_seconds


def saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in one step (distinct storages), plus the masks."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = sum(v for k, v in seen.items() if k not in param_ptrs)
    for layer in bh.sparse_layers(model).values():
        if layer.forward_mask is not None and layer.backward_mask is not None:
            total += layer.forward_mask.numel()
            if layer.backward_mask.data_ptr() != layer.forward_mask.data_ptr():
                total += layer.backward_mask.numel()
    return total


def time_steps(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int, post: bool) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if post:
            bh.project_(model)
    return (time.perf_counter() - start) / steps


def run(name: str, modes: list[str], rounds: int, steps: int, interval: int, quick: bool) -> list[dict]:
    runs = {}
    for mode in modes:
        model, x, y, search = build(name, mode if mode != "dense" else "dense-plain", interval, quick)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        mem = saved_bytes(model, x, y)
        time_steps(model, opt, x, y, 1, mode == "post")  # warm-up
        runs[mode] = dict(model=model, opt=opt, x=x, y=y, search=search, mem=mem, times=[])
    for _ in range(rounds):
        for mode in modes:
            r = runs[mode]
            r["times"].append(time_steps(r["model"], r["opt"], r["x"], r["y"], steps, mode == "post"))
    base = statistics.median(runs["dense"]["times"])
    base_mem = runs["dense"]["mem"]
    out = []
    for mode in modes:
        r = runs[mode]
        step = statistics.median(r["times"]) + r["search"] / interval
        out.append(dict(
            model=name, mode=mode, batch=int(r["x"].shape[0]), image=int(r["x"].shape[-1]), step_s=step,
            search_s=r["search"], ratio=step / base, mem_mb=r["mem"] / 2**20, mem_ratio=r["mem"] / base_mem,
        ))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet32_cifar", "deit_small"], choices=sorted(MODELS))
    parser.add_argument("--modes", nargs="+", default=MODES)
    parser.add_argument("--unfold", action="store_true", help="also time the unfold-based Bi-Mask baseline")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per mode per round")
    parser.add_argument("--interval", type=int, default=100, help="permutation refresh interval")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny batches, 1 round: a smoke run for CI")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    modes = list(dict.fromkeys(["dense", *args.modes] + (["bimask-unfold"] if args.unfold else [])))
    rounds, steps = (1, 1) if args.quick else (args.rounds, args.steps)
    rows = []
    print(f"torch {torch.__version__}, {args.threads} threads, {rounds} rounds x {steps} steps, interval {args.interval}")
    print(f"{'model':<16} {'mode':<14} {'batch':>5} {'img':>4} {'step s':>8} {'x dense':>8} {'search s':>9} {'saved MB':>9} {'mem x':>6}")
    for name in args.models:
        for row in run(name, modes, rounds, steps, args.interval, args.quick):
            rows.append(row)
            print(f"{row['model']:<16} {row['mode']:<14} {row['batch']:>5} {row['image']:>4} {row['step_s']:>8.4f} "
                  f"{row['ratio']:>8.3f} {row['search_s']:>9.3f} {row['mem_mb']:>9.1f} {row['mem_ratio']:>6.3f}")
    target = [r for r in rows if r["model"] == "resnet32_cifar" and r["mode"] == "bimask"]
    if target and not args.quick:
        ratio = target[0]["ratio"]
        print(f"TARGET bimask <= 1.10x dense on ResNet-32/CIFAR b128: {ratio:.3f}x -> {'PASS' if ratio <= 1.10 else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
