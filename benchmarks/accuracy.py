"""Accuracy study: one small ResNet on Fashion-MNIST, trained the same way under every sparse-training mode.

The library is used exactly as a user would use it in a plain PyTorch loop::

    model = timm.create_model("resnet8_cifar", num_classes=10, in_chans=1, base_width=16)
    bimask_hf.sparsify(model, BiMaskConfig(n=2, m=4, mode="bimask"))
    ...every permutation_interval optimizer steps (and at step 0): bimask_hf.refresh_permutations(model, step)
    ...after every optimizer step in "post" mode: bimask_hf.project_(model)

Methods (each at 2:4 and 1:4, except the pattern-free ``dense`` and ``unstructured-50%``):

* ``dense``            -- no sparsity (the reference);
* ``srste``            -- uni-directional N:M (SR-STE): forward and input gradient through ``W*Mf``;
* ``bimask-random``    -- Bi-Mask with ``permutation_search="random"`` (best of the current and 99 random
                          permutations, every 100 steps; not the paper's exact search, see bimask-paper);
* ``bimask-matched``   -- Bi-Mask with the library's default search (``permutation_search="matched"``);
* ``bimask-paper``     -- Bi-Mask with ``preset="paper"``: the paper's released algorithm (flat groups, its tie
                          order, best of 10 fresh random permutations as its CIFAR default, sparse 3x3 stem);
* ``transposable``     -- the paper's T-mask baseline (N:M along rows and columns of every MxM block);
* ``pre`` / ``post``   -- the seed's m3 / m4: weights projected in place before every forward / after every step;
* ``unstructured-50%`` -- ``density=0.5``, mode ``srste`` (the seed's ``--use_random_mask --random_mask_ratio 0.5``).

Recipe: ``resnet8_cifar`` with ``base_width=16`` (6 sparse 3x3 convs; stem and head stay dense, but
``bimask-paper`` sparsifies the 3x3 stem too, as the paper's CIFAR models: 16x1x3x3, groups across rows), 1 epoch,
SGD (momentum 0.9, weight decay 5e-4 on every parameter), lr 0.1 with a per-step cosine schedule to zero,
label smoothing 0.1, batch 128, random-crop (28, pad 2) + horizontal flip done on uint8 tensors, the
whole dataset preloaded; top-1 on the 10k test images at the end. Every run of one seed sees the same data
order, the same augmentation and the same initial weights, so differences between methods are paired: the
tables give each paired difference's mean, its 95 % t-interval over seeds and the sample SD (n-1).

Results go to a JSON file after every run; ``--resume`` skips finished runs (same settings only),
``--report-only`` prints the tables and draws the plots of the runs a file holds. Examples::

    python benchmarks/accuracy.py --methods dense srste bimask-matched bimask-paper transposable \
        --seeds 0 1 2 3 4                            # docs/accuracy.json: 45 runs, about 70 min on 1 idle core
    python benchmarks/accuracy.py --resume           # continue an interrupted study
    python benchmarks/accuracy.py --quick            # a few minutes: 1 seed, short training
    python benchmarks/accuracy.py --smoke            # seconds: what CI runs
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe, finish_machine_info, machine_info  # noqa: E402

import bimask_hf as bh  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Per-pixel statistics of the Fashion-MNIST training images, in [0, 1] units.
MEAN, STD = 0.2860, 0.3530

NM_METHODS = ("srste", "bimask-random", "bimask-matched", "bimask-paper", "transposable", "pre", "post")
FREE_METHODS = ("dense", "unstructured-50%")
METHODS = ("dense", *NM_METHODS, "unstructured-50%")
PATTERN_FREE = "-"


@dataclass
class Settings:
    """Everything that determines a run besides (method, pattern, seed); stored with the results."""

    arch: str = "resnet8_cifar"
    base_width: int = 16
    epochs: float = 1.0
    batch: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    label_smoothing: float = 0.1
    permutation_interval: int = 100
    num_permutations: int = 100
    train_limit: int | None = None
    test_limit: int | None = None
    channels_last: bool = True


# ------------------------------------------------------------------------------------------------ data
def _read_idx(path: Path) -> np.ndarray:
    """Read a gzip IDX file of unsigned bytes (magic 0x08, then the number of dimensions)."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes.")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(
    directory: Path = FASHION_MNIST_DIR, train_limit: int | None = None, test_limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train/test images as ``(N, 1, 28, 28)`` uint8 tensors and labels as int64, straight from the IDX files.

    ``train_limit`` / ``test_limit`` keep the first images only (for smoke runs).
    """
    missing = [name for pair in FILES.values() for name in pair if not (directory / name).is_file()]
    if missing:
        raise SystemExit(
            f"Fashion-MNIST is missing from {directory} ({', '.join(missing)}): install Debian's "
            "dataset-fashion-mnist package."
        )
    out = []
    for split, limit in (("train", train_limit), ("test", test_limit)):
        images, labels = (_read_idx(directory / name) for name in FILES[split])
        images, labels = images[:limit], labels[:limit]
        out += [torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))]
    return out[0], out[1], out[2], out[3]


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop (same size, ``pad`` zero pixels each side) and horizontal flip of a uint8 ``(B, C, H, W)`` batch."""
    batch, _, height, width = images.shape
    padded = F.pad(images, (pad, pad, pad, pad)).permute(0, 2, 3, 1)  # (B, H+2p, W+2p, C)
    off_y = torch.randint(0, 2 * pad + 1, (batch, 1), generator=generator)
    off_x = torch.randint(0, 2 * pad + 1, (batch, 1), generator=generator)
    rows = (off_y + torch.arange(height)).unsqueeze(2)  # (B, H, 1)
    cols = (off_x + torch.arange(width)).unsqueeze(1)  # (B, 1, W)
    crops = padded[torch.arange(batch).view(-1, 1, 1), rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)
    flip = (torch.rand(batch, generator=generator) < 0.5).view(-1, 1, 1, 1)
    return torch.where(flip, crops.flip(-1), crops)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels to standardised floats."""
    return (images.float() / 255.0 - MEAN) / STD


# ------------------------------------------------------------------------------------------------ runs
def method_config(method: str, pattern: str, settings: Settings, seed: int) -> bh.BiMaskConfig | None:
    """The :class:`bimask_hf.BiMaskConfig` of one method (None for dense: the model is not patched)."""
    if method == "dense":
        return None
    common = dict(permutation_interval=settings.permutation_interval, seed=seed)
    if method == "unstructured-50%":
        return bh.BiMaskConfig(mode="srste", density=0.5, **common)
    n, m = (int(v) for v in pattern.split(":"))
    if method == "bimask-random":
        return bh.BiMaskConfig(
            n=n, m=m, mode="bimask", permutation_search="random", num_permutations=settings.num_permutations,
            **common,
        )
    if method == "bimask-paper":
        return bh.BiMaskConfig(n=n, m=m, mode="bimask", preset="paper", **common)
    if method == "bimask-matched":
        return bh.BiMaskConfig(n=n, m=m, mode="bimask", permutation_search="matched", **common)
    if method in ("srste", "transposable", "pre", "post"):
        return bh.BiMaskConfig(n=n, m=m, mode=method, **common)
    raise ValueError(f"Unknown method {method!r}; choose from {METHODS}.")


def build_model(settings: Settings, config: bh.BiMaskConfig | None, seed: int) -> nn.Module:
    """The ResNet with seed-determined initial weights (identical for every method), patched by ``config``."""
    torch.manual_seed(seed)
    model = timm.create_model(settings.arch, num_classes=10, in_chans=1, base_width=settings.base_width)
    if config is not None:
        bh.sparsify(model, config)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, channels_last: bool) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = 0
    for start in range(0, len(images), 1000):
        x = normalize(images[start : start + 1000])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        correct += int((model(x).argmax(1) == labels[start : start + 1000]).sum())
    model.train()
    return 100.0 * correct / len(images)


def identity_retention(model: nn.Module) -> float | None:
    """Mean retention over the bi-directional layers if their permutation were the identity."""
    values = []
    for layer in bh.sparse_layers(model).values():
        if layer.effective_mode != "bimask":
            continue
        mf, _ = layer.masks()
        mb = bh.masks.backward_mask_for_weight(layer.weight, mf, torch.arange(mf.shape[0]), layer.n, layer.m)
        values.append(bh.retention(mf, mb))
    return sum(values) / len(values) if values else None


def train_run(
    method: str,
    pattern: str,
    seed: int,
    settings: Settings,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    log_every: int = 0,
) -> tuple[dict, nn.Module]:
    """Train one model and return its result row and the trained model."""
    x_train, y_train, x_test, y_test = data
    config = method_config(method, pattern, settings, seed)
    model = build_model(settings, config, seed)
    model.train()
    opt = torch.optim.SGD(
        model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    steps_per_epoch = max(1, len(x_train) // settings.batch)
    total = max(1, round(settings.epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * t / total)))
    gen_order = torch.Generator().manual_seed(10_000 + seed)
    gen_aug = torch.Generator().manual_seed(20_000 + seed)
    bidirectional = any(layer.effective_mode == "bimask" for layer in bh.sparse_layers(model).values())
    post = config is not None and config.mode == "post"
    search_s, refreshes, losses = 0.0, 0, []
    retention_first = None
    start = time.perf_counter()
    order = torch.randperm(len(x_train), generator=gen_order)
    for step in range(total):
        pos = (step % steps_per_epoch) * settings.batch
        if step and pos == 0:
            order = torch.randperm(len(x_train), generator=gen_order)
        if bidirectional and step % settings.permutation_interval == 0:
            stats = bh.refresh_permutations(model, step)
            search_s += stats["seconds"]
            refreshes += 1
            if retention_first is None:
                retention_first = stats.get("retention_mean")
        idx = order[pos : pos + settings.batch]
        x = normalize(augment(x_train[idx], gen_aug))
        if settings.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(x), y_train[idx], label_smoothing=settings.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if post:
            bh.project_(model)
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            print(f"    step {step + 1}/{total} loss {statistics.fmean(losses[-log_every:]):.4f}", flush=True)
    train_s = time.perf_counter() - start
    top1 = evaluate(model, x_test, y_test, settings.channels_last)
    row = dict(
        method=method, pattern=pattern, seed=seed, top1=top1, steps=total,
        final_loss=statistics.fmean(losses[-min(50, len(losses)) :]), train_s=train_s,
        eval_s=time.perf_counter() - start - train_s, search_s=search_s, refreshes=refreshes,
    )
    if bidirectional:
        rep = bh.report(model)
        row["retention"] = rep.retention_mean
        row["retention_first_refresh"] = retention_first
        row["retention_identity"] = identity_retention(model)
    if config is not None:
        row["density"] = bh.report(model).density
    return row, model


def run_key(method: str, pattern: str, seed: int) -> str:
    """Key of one run in the results JSON."""
    return f"{method}|{pattern}|{seed}"


def plan(methods: list[str], patterns: list[str], seeds: list[int]) -> list[tuple[str, str, int]]:
    """(method, pattern, seed) of every run, seed-major so an interrupted study has whole seeds."""
    runs = []
    for seed in seeds:
        for method in methods:
            if method in FREE_METHODS:
                runs.append((method, PATTERN_FREE, seed))
        for pattern in patterns:
            for method in methods:
                if method not in FREE_METHODS:
                    runs.append((method, pattern, seed))
    return runs


# ------------------------------------------------------------------------------------------------ report
def summarise(rows: list[dict]) -> list[dict]:
    """Mean, std (sample, n-1), min and max of top-1 per (method, pattern), in table order
    (pattern-free methods first, then the patterns in the order they were run)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["pattern"]), []).append(r)
    order = {m: i for i, m in enumerate(METHODS)}
    pattern_order = {p: i for i, p in enumerate(dict.fromkeys([PATTERN_FREE] + [r["pattern"] for r in rows]))}
    out = []
    for (method, pattern), rs in sorted(groups.items(), key=lambda kv: (pattern_order[kv[0][1]], order.get(kv[0][0], 99))):
        accs = [r["top1"] for r in rs]
        rets = [r["retention"] for r in rs if r.get("retention") is not None]
        out.append(dict(
            method=method, pattern=pattern, n=len(accs), mean=statistics.fmean(accs),
            std=statistics.stdev(accs) if len(accs) > 1 else 0.0, min=min(accs), max=max(accs),
            seconds=statistics.fmean(r["train_s"] + r["eval_s"] for r in rs),
            retention=statistics.fmean(rets) if rets else None,
        ))
    return out


# Two-sided 95 % quantiles of Student's t by degrees of freedom (1..30); larger samples use 30's.
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)

# Paired comparisons the tables and the plot report, (a, b) for top1(a) - top1(b).
COMPARISONS = (
    ("bimask-matched", "bimask-paper"), ("bimask-matched", "transposable"), ("bimask-paper", "transposable"),
    ("bimask-matched", "srste"), ("bimask-paper", "srste"), ("transposable", "srste"),
    ("srste", "dense"), ("bimask-matched", "dense"), ("bimask-paper", "dense"),
    ("bimask-random", "transposable"), ("bimask-random", "srste"), ("bimask-matched", "bimask-random"),
)


def paired(rows: list[dict], a: str, b: str, pattern: str) -> dict | None:
    """The per-seed differences top1(a) - top1(b) at ``pattern`` (same seed = same data, init and augmentation):
    their mean, sample SD (n-1), n and the 95 % t-interval of the mean (None with fewer than 2 seeds)."""
    by = {(r["method"], r["seed"]): r["top1"] for r in rows if r["pattern"] in (pattern, PATTERN_FREE)}
    diffs = [by[(a, s)] - by[(b, s)] for (m, s) in sorted(by) if m == a and (b, s) in by]
    if not diffs:
        return None
    n, mean = len(diffs), statistics.fmean(diffs)
    sd = statistics.stdev(diffs) if n > 1 else 0.0
    half = T95[min(n - 1, len(T95)) - 1] * sd / math.sqrt(n) if n > 1 else None
    return dict(a=a, b=b, pattern=pattern, n=n, mean=mean, sd=sd, diffs=diffs,
                lo=None if half is None else mean - half, hi=None if half is None else mean + half)


def verdict(d: dict) -> str:
    """What the interval supports: a difference of known sign, or none ("within noise")."""
    if d["lo"] is None:
        return "one seed: no interval"
    if d["lo"] > 0:
        return f"{d['a']} higher"
    if d["hi"] < 0:
        return f"{d['b']} higher"
    return "within noise"


def print_tables(rows: list[dict], patterns: list[str]) -> list[str]:
    """Print the plain table, the markdown table and the paper-claim checks; returns the claim lines."""
    summary = summarise(rows)
    print(f"\n{'method':<18} {'N:M':>4} {'runs':>4} {'top-1 mean':>10} {'SD n-1':>6} {'min':>7} {'max':>7} {'retention':>9} {'s/run':>6}")
    for s in summary:
        ret = "-" if s["retention"] is None else f"{s['retention']:.4f}"
        print(f"{s['method']:<18} {s['pattern']:>4} {s['n']:>4} {s['mean']:>10.2f} {s['std']:>6.2f} {s['min']:>7.2f} "
              f"{s['max']:>7.2f} {ret:>9} {s['seconds']:>6.0f}")
    print("\nMarkdown:\n")
    print("| method | N:M | runs | top-1 mean ± sample SD (n−1) | min – max | retention |")
    print("|---|---|---|---|---|---|")
    for s in summary:
        ret = "–" if s["retention"] is None else f"{s['retention']:.3f}"
        print(f"| {s['method']} | {s['pattern']} | {s['n']} | {s['mean']:.2f} ± {s['std']:.2f} | "
              f"{s['min']:.2f} – {s['max']:.2f} | {ret} |")
    claims, table = [], []
    for pattern in patterns:
        for a, b in COMPARISONS:
            d = paired(rows, a, b, pattern)
            if d is None:
                continue
            ci = "–" if d["lo"] is None else f"[{d['lo']:+.2f}, {d['hi']:+.2f}]"
            claims.append(f"{pattern} {a} - {b}: {d['mean']:+.2f} points, 95 % CI {ci}, sample SD {d['sd']:.2f} "
                          f"over {d['n']} paired seeds ({verdict(d)})")
            table.append(f"| {pattern} | {a} − {b} | {d['n']} | {d['mean']:+.2f} | {ci} | {d['sd']:.2f} | "
                         f"{min(d['diffs']):+.2f} – {max(d['diffs']):+.2f} | {verdict(d)} |")
    if claims:
        print("\nPaired differences (same seed = same init, data order and augmentation; 95 % t-interval of the "
              "mean difference; SD = sample SD (n-1) of the per-seed differences):")
        print("\n".join("  " + c for c in claims))
        print("\n| N:M | difference | seeds | mean | 95 % CI | sample SD (n−1) | min – max | verdict |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(table))
    return claims


def save_checkpoint(model: nn.Module, path: Path, settings: Settings, row: dict) -> None:
    """Save the trained weights (raw ``W``, pruned entries included, plus permutations) as safetensors."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"arch": settings.arch, "base_width": str(settings.base_width), "pattern": row["pattern"],
            "method": row["method"], "seed": str(row["seed"]), "top1": f"{row['top1']:.2f}",
            "note": "bimask-hf accuracy study (benchmarks/accuracy.py); raw weights, apply Mf = top-N of M |W|"}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)
    print(f"  saved {path} ({path.stat().st_size / 1024:.0f} KiB)")


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    """Run the study (or resume it) and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--patterns", nargs="+", default=["2:4", "1:4"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--arch", default=Settings.arch)
    parser.add_argument("--base-width", type=int, default=Settings.base_width)
    parser.add_argument("--epochs", type=float, default=Settings.epochs)
    parser.add_argument("--batch", type=int, default=Settings.batch)
    parser.add_argument("--lr", type=float, default=Settings.lr)
    parser.add_argument("--interval", type=int, default=Settings.permutation_interval,
                        help="permutation refresh interval in optimizer steps (the paper's --iter)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine a 2-thread pool stalls whenever "
                        "the other core is busy, 10-30x slower; one thread degrades gracefully)")
    parser.add_argument("--no-channels-last", action="store_true", help="keep NCHW memory format")
    parser.add_argument("--quick", action="store_true", help="a few minutes: seed 0 only, 0.3 epoch on 20k images")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds: 2:4 only, seed 0, width 8, 4 steps of 32 images, 200 test images (CI)")
    parser.add_argument("--json", help="results file (default docs/accuracy.json for the full study)")
    parser.add_argument("--resume", action="store_true", help="skip runs already in --json (same settings)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: print the tables and draw the plots of the runs already in --json")
    parser.add_argument("--plot", help="PNG plot (default docs/accuracy.png for the full study)")
    parser.add_argument("--checkpoint-dir", help="save bimask-matched seed-0 weights here as "
                        "fmnist_bimask_<N>x<M>.safetensors (default docs/ for the full study)")
    parser.add_argument("--log-every", type=int, default=0, help="print the training loss every this many steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    settings = Settings(arch=args.arch, base_width=args.base_width, epochs=args.epochs, batch=args.batch, lr=args.lr,
                        permutation_interval=args.interval, channels_last=not args.no_channels_last)
    patterns, seeds = args.patterns, args.seeds
    full = not (args.quick or args.smoke)
    if args.quick:
        settings.epochs, settings.train_limit, settings.permutation_interval = 0.3, 20_000, 20
        seeds = seeds[:1]
    if args.smoke:
        settings.epochs, settings.batch, settings.train_limit, settings.test_limit = 1.0, 32, 128, 200
        settings.permutation_interval, settings.base_width = 2, 8
        patterns, seeds = patterns[:1], seeds[:1]
    json_path = Path(args.json) if args.json else (ROOT / "docs" / "accuracy.json" if full else None)
    plot_path = Path(args.plot) if args.plot else (ROOT / "docs" / "accuracy.png" if full else None)
    ckpt_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else (ROOT / "docs" if full else None)

    done: dict[str, dict] = {}
    if args.resume and json_path and json_path.is_file():
        stored = json.loads(json_path.read_text())
        if stored.get("settings") != asdict(settings):
            print(f"--resume: {json_path} was made with other settings:\n  {stored.get('settings')}\n"
                  f"  now {asdict(settings)}\nRefusing to mix them; pass another --json or drop --resume.")
            return 2
        done = stored["runs"]

    machine = machine_info()
    print(describe(machine))
    runs = plan(args.methods, patterns, seeds)
    if args.report_only:
        if not (json_path and json_path.is_file()):
            print(f"--report-only needs an existing results file (--json), got {json_path}.")
            return 2
        done = json.loads(json_path.read_text())["runs"]
        missing = [run_key(*r) for r in runs if run_key(*r) not in done]
        if missing:
            print(f"{len(missing)} of {len(runs)} planned runs are not in {json_path}: {', '.join(missing)}")
        runs = [r for r in runs if run_key(*r) in done]
    data = None if args.report_only else load_fashion_mnist(train_limit=settings.train_limit, test_limit=settings.test_limit)
    if data is not None:
        print(f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads; "
              f"{settings.arch} (base width {settings.base_width}) on Fashion-MNIST "
              f"{len(data[0])} train / {len(data[2])} test; {settings.epochs:g} epochs of batch {settings.batch}; "
              f"{len(runs)} runs ({len(done)} already done)")
    for i, (method, pattern, seed) in enumerate(runs):
        key = run_key(method, pattern, seed)
        if key in done:
            continue
        row, model = train_run(method, pattern, seed, settings, data, args.log_every)
        done[key] = row
        ret = f" retention {row['retention']:.4f} (identity {row['retention_identity']:.4f})" if "retention" in row else ""
        print(f"[{i + 1}/{len(runs)}] {method:<16} {pattern:>3} seed {seed}: top-1 {row['top1']:.2f}  "
              f"loss {row['final_loss']:.4f}  {row['train_s']:.0f}+{row['eval_s']:.0f} s, "
              f"search {row['search_s']:.2f} s{ret}", flush=True)
        if ckpt_dir and method == "bimask-matched" and seed == seeds[0]:
            save_checkpoint(model, ckpt_dir / f"fmnist_bimask_{pattern.replace(':', 'x')}.safetensors", settings, row)
        if json_path:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = json_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"settings": asdict(settings), "machine": finish_machine_info(machine),
                                       "torch": torch.__version__,
                                       "threads": torch.get_num_threads(), "runs": done}, indent=1))
            os.replace(tmp, json_path)
    rows = [done[run_key(*r)] for r in runs if run_key(*r) in done]
    print_tables(rows, patterns)
    if plot_path:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from plots import plot_accuracy, plot_paired

        plot_accuracy(rows, plot_path, title=f"{settings.arch} (width {settings.base_width}) on Fashion-MNIST, "
                      f"{settings.epochs:g} epoch(s), {len(seeds)} seed(s); bars: sample SD (n-1); dashed: dense mean")
        diffs = [d for p in patterns for a, b in COMPARISONS if (d := paired(rows, a, b, p)) is not None]
        paired_path = plot_path.with_name(plot_path.stem + "_paired.png")
        if diffs:  # a single method, or a single seed, pairs nothing
            plot_paired(diffs, paired_path, title=f"paired top-1 differences over seeds, {settings.arch} on "
                        "Fashion-MNIST")
        print(f"plots: {plot_path}" + (f", {paired_path}" if diffs else " (no paired differences to plot)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
