"""GPU numbers in one prepared script (under 5 minutes on one H100): dense vs Bi-Mask training steps, and what
2:4 semi-structured sparse matmuls would buy the forward and input-gradient passes of ``Linear`` layers.

Part 1 -- training steps. ResNet-50 (batch 128, 224x224, channels_last) and DeiT-small (batch 256) under bf16
autocast, SGD with momentum; modes ``dense`` (unpatched model), ``srste`` and ``bimask`` (library default
search, amortised at one refresh every 100 steps). Modes are interleaved round by round in a random order;
the median over rounds of the CUDA-event step time is reported, with the peak CUDA memory of one step above
what was allocated before it. Our layers run PyTorch's dense kernels on ``W*Mf`` / ``W*Mb``, so on a GPU this
measures the *overhead* of the masks (recomputed every forward), not a speed-up: that needs sparse kernels.

Part 2 -- 2:4 sparse matmuls (``torch.sparse.to_sparse_semi_structured``, sparse tensor cores, sm80+), on the
``Linear`` shapes of DeiT-small (and of ViT-Base) with T tokens, bf16:

* forward ``y = x (W*Mf)^T``: ``W*Mf`` is 2:4 along its rows (the reduction dim K), exactly the layout
  semi-structured sparsity needs, so ``F.linear(x, to_sparse_semi_structured(W*Mf))`` is accelerated as is;
* input gradient ``dx = g (W*Mb)``: the reduction is over O, and ``W*Mb`` is 2:4 along O only *after the row
  permutation p* of Bi-Mask. ``S = ((W*Mb)[p])^T`` (K x O) is then 2:4 along its rows, and
  ``dx = g[:, p] (W*Mb)[p] = F.linear(g[:, p], S)``. The column gather ``g[:, p]`` is timed separately: a
  real kernel would fold ``p`` into the layout of the previous layer instead (the uni-directional mask
  ``W*Mf`` is not N:M along O at all, which is the point of Bi-Mask);
* NOT accelerated: the weight gradient ``g^T x`` (dense, straight-through; the same cost in every mode), and
  the per-step mask computation and compression of the changing weights (timed here as ``compress``, which
  a training step would pay twice per layer).

On a machine without a CUDA GPU the script prints that and exits with status 0. ``--dry-run`` runs both
parts on the CPU at toy sizes (semi-structured kernels are skipped; the permutation identity and the 2:4
layout of ``((W*Mb)[p])^T`` are still checked), which is what CI runs::

    python benchmarks/gpu_check.py                   # on a GPU machine
    python benchmarks/gpu_check.py --json gpu.json   # also save the rows
    python benchmarks/gpu_check.py --dry-run         # CPU, seconds: checks the code paths
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe, machine_info, write_json  # noqa: E402

import bimask_hf as bh
from bimask_hf.masks import backward_mask, nm_mask
from bimask_hf.search import search_permutation

# name -> (timm architecture, batch, image size, channels_last); dry-run sizes in DRY
MODELS = {"resnet50": ("resnet50", 128, 224, True), "deit_small": ("deit_small_patch16_224", 256, 224, False)}
# dry run: timm's tiny test models of the same families, so the CPU check takes seconds
DRY = {"resnet50": ("test_resnet", 2, 64, True), "deit_small": ("test_vit", 2, 64, False)}
MODES = ("dense", "srste", "bimask")
# (name, out_features O, in_features K) of 2:4 Linear layers
LINEARS = [
    ("deit_small.qkv", 1152, 384), ("deit_small.proj", 384, 384), ("deit_small.fc1", 1536, 384),
    ("deit_small.fc2", 384, 1536), ("vit_base.fc1", 3072, 768), ("vit_base.fc2", 768, 3072),
]  # fmt: skip


def log(msg: str) -> None:
    """Print and flush (the output is read remotely)."""
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------ timing
class Timer:
    """Wall time of a callable: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object], repeat: int) -> float:
        """Mean seconds per call over ``repeat`` calls (after the caller's warm-up)."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeat):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / repeat
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        return (time.perf_counter() - t0) / repeat


# ------------------------------------------------------------------------------------------------ part 1
def build(name: str, mode: str, device: torch.device, dry: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor, float]:
    """Model (``dense``: not patched), a random batch, and the seconds of one permutation search."""
    arch, batch, size, channels_last = (DRY if dry else MODELS)[name]
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=1000, **({"img_size": size} if "vit" in arch else {}))
    search_s = 0.0
    if mode != "dense":
        bh.sparsify(model, bh.BiMaskConfig(mode=mode))
    model = model.to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if mode == "bimask":
        _sync(device)
        t0 = time.perf_counter()
        bh.refresh_permutations(model, step=0)
        _sync(device)
        search_s = time.perf_counter() - t0
    y = torch.randint(0, 1000, (batch,), device=device)
    return model, x, y, search_s


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """Forward + loss under bf16 autocast, backward, SGD step."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def peak_step_bytes(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> int | None:
    """Peak CUDA bytes of one step above those allocated before it (None on CPU)."""
    if x.device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    train_step(model, opt, x, y)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def bench_training(name: str, device: torch.device, dry: bool, rounds: int, steps: int, interval: int) -> list[dict]:
    """Every mode on one model, interleaved; rows with ratios to dense."""
    timer = Timer(device)
    runs = {}
    for mode in MODES:
        model, x, y, search_s = build(name, mode, device, dry)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        for _ in range(1 if dry else 3):  # warm-up: cuDNN autotuning, momentum buffers
            train_step(model, opt, x, y)
        peak = peak_step_bytes(model, opt, x, y)
        runs[mode] = dict(model=model, opt=opt, x=x, y=y, search=search_s, peak=peak, times=[])
        log(f"  built {name} {mode}: batch {x.shape[0]}, search {search_s:.3f} s")
    order = random.Random(0)
    for _ in range(rounds):
        modes = list(MODES)
        order.shuffle(modes)
        for mode in modes:
            r = runs[mode]
            r["times"].append(timer(lambda r=r: train_step(r["model"], r["opt"], r["x"], r["y"]), steps))
    base = statistics.median(runs["dense"]["times"])
    rows = []
    for mode in MODES:
        r = runs[mode]
        step = statistics.median(r["times"]) + r["search"] / interval
        peak_ratio = r["peak"] / runs["dense"]["peak"] if r["peak"] and runs["dense"]["peak"] else None
        rows.append(dict(
            part="train", model=name, mode=mode, batch=int(r["x"].shape[0]), step_ms=step * 1e3,
            ratio=step / base, search_s=r["search"], peak_mb=None if r["peak"] is None else r["peak"] / 2**20,
            peak_ratio=peak_ratio,
        ))
    del runs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------ part 2
def bimask_weight(out_f: int, in_f: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random weight, its 2:4 forward mask, a searched permutation and the backward mask (on ``device``)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out_f, in_f, generator=gen)
    mf = nm_mask(weight, 2, 4)
    perm = search_permutation(mf, 2, 4, "matched")
    mb = backward_mask(weight, mf, perm, 2, 4)
    return weight.to(device), mf.to(device), perm.to(device), mb.to(device)


def check_layout(weight: torch.Tensor, mf: torch.Tensor, perm: torch.Tensor, mb: torch.Tensor) -> None:
    """Assert what the sparse input-gradient path relies on (any device; float64, so TF32 cannot blur it)."""
    wf, wb = (weight * mf).double(), (weight * mb).double()
    assert int(((wf != 0).reshape(wf.shape[0], -1, 4).sum(-1) > 2).sum()) == 0, "W*Mf is not 2:4 along K"
    s = wb[perm].t()  # (K, O): 2:4 along its rows once O is taken in permutation order
    assert int(((s != 0).reshape(s.shape[0], -1, 4).sum(-1) > 2).sum()) == 0, "((W*Mb)[p])^T is not 2:4 along O"
    g = torch.randn(8, weight.shape[0], device=weight.device, dtype=torch.float64)
    torch.testing.assert_close(F.linear(g[:, perm], s), g @ wb, rtol=1e-9, atol=1e-9)


def _masks(weight: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Both 2:4 masks of a weight, as a training step recomputes them."""
    return backward_mask(weight, nm_mask(weight, 2, 4), perm, 2, 4)


def bench_sparse_linears(device: torch.device, dry: bool, tokens: int, repeat: int) -> list[dict]:
    """Dense vs semi-structured 2:4 matmuls for the forward and the input-gradient pass of each Linear."""
    rows = []
    have_sparse = device.type == "cuda" and hasattr(torch.sparse, "to_sparse_semi_structured")
    if have_sparse and torch.cuda.get_device_capability(device) < (8, 0):
        log("  semi-structured sparsity needs sm80+; skipping the sparse kernels")
        have_sparse = False
    if have_sparse:
        backend = "cuSPARSELt" if getattr(torch.backends, "cusparselt", None) and torch.backends.cusparselt.is_available() else "CUTLASS"
        log(f"  semi-structured backend: {backend} (torch {torch.__version__})")
    timer = Timer(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name, out_f, in_f in LINEARS[:2] if dry else LINEARS:
        weight, mf, perm, mb = bimask_weight(out_f, in_f, device)
        check_layout(weight, mf, perm, mb)
        wf = (weight * mf).to(dtype)
        wb = (weight * mb).to(dtype)
        wb_t = wb[perm].t().contiguous()
        x = torch.randn(tokens, in_f, device=device, dtype=dtype)
        g = torch.randn(tokens, out_f, device=device, dtype=dtype)
        w_dense = weight.to(dtype)
        # label -> (function, arguments): bound now, timed below
        cases: dict[str, tuple[Callable[..., object], tuple]] = {
            "fwd dense": (F.linear, (x, w_dense)),
            "dgrad dense": (torch.matmul, (g, w_dense)),
            "dgrad gather g[:,p]": (torch.index_select, (g, 1, perm)),
        }
        if have_sparse:
            try:
                sf = torch.sparse.to_sparse_semi_structured(wf)
                sb = torch.sparse.to_sparse_semi_structured(wb_t)
                g_perm = g[:, perm].contiguous()
                y_sparse, y_dense = F.linear(x, sf), F.linear(x, wf)
                dx_sparse, dx_dense = F.linear(g_perm, sb), g @ wb
                err_f = float((y_sparse.float() - y_dense.float()).norm() / y_dense.float().norm())
                err_b = float((dx_sparse.float() - dx_dense.float()).norm() / dx_dense.float().norm())
                log(f"  {name}: relative error sparse vs dense: fwd {err_f:.2e}, dgrad {err_b:.2e}")
                cases.update({
                    "fwd 2:4 sparse": (F.linear, (x, sf)),
                    "dgrad 2:4 sparse": (F.linear, (g_perm, sb)),
                    "compress W*Mf": (torch.sparse.to_sparse_semi_structured, (wf,)),
                    "masks Mf+Mb": (_masks, (weight, perm)),
                })
            except Exception as err:  # noqa: BLE001 - kernel or shape not supported: report, keep the dense rows
                log(f"  {name}: semi-structured kernels failed: {type(err).__name__}: {err}")
        times = {}
        for label, (fn, fn_args) in cases.items():
            fn(*fn_args)  # warm-up
            times[label] = timer(lambda fn=fn, fn_args=fn_args: fn(*fn_args), repeat)
        for label, seconds in times.items():
            base = times["fwd dense"] if label.startswith("fwd") else times["dgrad dense"] if label.startswith("dgrad") else None
            rows.append(dict(part="linear", layer=name, shape=f"{out_f}x{in_f}", tokens=tokens, case=label,
                             ms=seconds * 1e3, speedup=(base / seconds) if base and "sparse" in label else None))
    return rows


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    """Run both parts (or explain why not) and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="run on the CPU at toy sizes (no timings worth reading)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per model")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode per round")
    parser.add_argument("--interval", type=int, default=100, help="permutation refresh interval (search amortised)")
    parser.add_argument("--tokens", type=int, default=32768, help="rows of the activations in part 2")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-linear", action="store_true")
    parser.add_argument("--json", help="write all rows to this file")
    args = parser.parse_args(argv)
    machine = machine_info()
    print(describe(machine))

    if not torch.cuda.is_available() and not args.dry_run:
        log("gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False), so there is nothing to measure "
            "here. Run it on a machine with an NVIDIA GPU (sm80+ for the 2:4 sparse kernels); "
            "--dry-run checks the code paths on the CPU.")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    dry = args.dry_run
    if dry:
        torch.set_num_threads(1)  # one thread: a shared CI machine cannot stall a thread pool
        args.rounds, args.steps, args.tokens = 1, 1, 64
    else:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    log(f"gpu_check on {name}; torch {torch.__version__}, timm {timm.__version__}")
    start = time.perf_counter()
    rows: list[dict] = []
    if not args.skip_train:
        log("\nPart 1: training steps (bf16 autocast), ratios to the unpatched dense model")
        for model in args.models:
            try:
                rows += bench_training(model, device, dry, args.rounds, args.steps, args.interval)
            except Exception as err:  # noqa: BLE001 - one-shot GPU session: report and go on to the next part
                if dry:
                    raise
                log(f"  {model}: FAILED {type(err).__name__}: {err}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        log(f"{'model':<11} {'mode':<7} {'batch':>5} {'step ms':>9} {'x dense':>8} {'search s':>9} {'peak MB':>9} {'peak x':>7}")
        for r in rows:
            peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
            peak_x = "-" if r["peak_ratio"] is None else f"{r['peak_ratio']:.3f}"
            log(f"{r['model']:<11} {r['mode']:<7} {r['batch']:>5} {r['step_ms']:>9.1f} {r['ratio']:>8.3f} "
                f"{r['search_s']:>9.3f} {peak:>9} {peak_x:>7}")
    if not args.skip_linear:
        log(f"\nPart 2: 2:4 Linear matmuls, {args.tokens} tokens (speed-up = dense time / sparse time)")
        lin = bench_sparse_linears(device, dry, args.tokens, 2 if dry else 50)
        rows += lin
        log(f"{'layer':<16} {'OxK':>10} {'case':<20} {'ms':>9} {'speed-up':>9}")
        for r in lin:
            speed = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
            log(f"{r['layer']:<16} {r['shape']:>10} {r['case']:<20} {r['ms']:>9.4f} {speed:>9}")
    log(f"\ngpu_check done in {time.perf_counter() - start:.0f} s")
    write_json(args.json, machine, device=name, torch=torch.__version__, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
