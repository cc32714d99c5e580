"""The eager CPU mask work per layer: bimask-hf's one-pass C kernels against its tensor-op versions.

For each weight shape and N:M pattern, one process times, side by side and interleaved (best of
``--repeats`` medians of ``--inner`` calls, 1 thread by default), what an eager training step computes for
one sparse layer:

* ``Mf``: ``nm_mask_for_weight(W, n, m, dtype=uint8)`` (conv groups: ``channels_last``, ``M`` input
  channels ``kh*kw`` entries apart; Linear rows: ``M`` adjacent entries);
* ``Mb``: ``backward_mask_for_weight(W, Mf, perm, n, m, dtype=uint8)`` with a random row permutation;
* ``decay``: the weight gradient's decay term ``grad + (W - W*Mf) * decay`` (in place in the kernel);

with the kernels (``bimask_hf.kernels``) and with them switched off, and checks that both give the same
masks and the same gradient bit for bit. ``x faster`` is the tensor-op time over the kernel time.

    python benchmarks/mask_kernels.py                   # ResNet-32, ResNet-50 and ViT-S layer shapes, 2:4
    python benchmarks/mask_kernels.py --patterns 2:4 1:4 4:8 --threads 2
    python benchmarks/mask_kernels.py --quick           # seconds; what CI runs
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe, machine_info, write_json  # noqa: E402

from bimask_hf import kernels
from bimask_hf.functional import _weight_grad_extra
from bimask_hf.masks import backward_mask_for_weight, nm_mask_for_weight

# ResNet-32/CIFAR 3x3 convs (widths 32, 64, 128), a ResNet-50 3x3 conv and 1x1 expansion, ViT-S MLP layers
FULL_SHAPES = [(32, 32, 3, 3), (64, 64, 3, 3), (128, 128, 3, 3), (512, 512, 3, 3), (2048, 512, 1, 1),
               (1536, 384), (384, 1536)]
QUICK_SHAPES = [(16, 16, 3, 3), (32, 64)]


def _time(fn: Callable[[], object], inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def measure(shape: tuple[int, ...], n: int, m: int, repeats: int, inner: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen)
    perm = torch.randperm(shape[0], generator=gen)
    grad = torch.randn(shape, generator=gen)
    mf = nm_mask_for_weight(w, n, m, dtype=torch.uint8)
    parts: dict[str, Callable[[], object]] = {
        "Mf": lambda: nm_mask_for_weight(w, n, m, dtype=torch.uint8),
        "Mb": lambda: backward_mask_for_weight(w, mf, perm, n, m, dtype=torch.uint8),
        "decay": lambda: _weight_grad_extra(grad, w, mf, 2e-4),  # the kernel adds into grad, as in backward
    }
    # the same parts on a fresh gradient each call, to compare results
    checks = {**parts, "decay": lambda: _weight_grad_extra(grad.clone(), w, mf, 2e-4)}
    same = {}
    for name, fn in checks.items():
        with kernels.disabled():
            ref = fn()
        same[name] = torch.equal(fn(), ref)
    times: dict[str, list[float]] = {f"{name}_{kind}": [] for name in parts for kind in ("kernel", "ops")}
    for _ in range(repeats):  # interleaved: load changes hit both versions alike
        for name, fn in parts.items():
            times[f"{name}_kernel"].append(_time(fn, inner))
            with kernels.disabled():
                times[f"{name}_ops"].append(_time(fn, inner))
    row = {"shape": list(shape), "pattern": f"{n}:{m}", "same": all(same.values())}
    for key, values in times.items():
        row[f"{key}_us"] = 1e6 * min(values)
    for name in parts:
        row[f"{name}_speedup"] = row[f"{name}_ops_us"] / row[f"{name}_kernel_us"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patterns", nargs="+", default=["2:4"], help="N:M patterns, e.g. 2:4 1:4 4:8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--inner", type=int, default=20, help="calls per timing")
    parser.add_argument("--quick", action="store_true", help="two small shapes, 2 repeats of 2 calls")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    if not kernels.available():
        sys.exit("the C kernels are not available here (no C compiler, or BIMASK_HF_KERNELS=0): nothing to compare")
    torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    repeats, inner = (2, 2) if args.quick else (args.repeats, args.inner)
    machine = machine_info(args.threads)
    print(describe(machine))
    print(f"torch {torch.__version__}, {args.threads} thread(s), best of {repeats} x {inner} calls; times in us")
    print(f"{'shape':<18} {'N:M':>4} {'Mf C':>8} {'Mf ops':>8} {'x':>5} {'Mb C':>8} {'Mb ops':>8} {'x':>5} "
          f"{'decay C':>8} {'decay ops':>9} {'x':>5} {'same':>5}")
    rows = []
    for pattern in args.patterns:
        n, m = (int(v) for v in pattern.split(":"))
        for shape in shapes:
            r = measure(shape, n, m, repeats, inner)
            rows.append(r)
            print(f"{'x'.join(map(str, shape)):<18} {r['pattern']:>4} {r['Mf_kernel_us']:>8.1f} {r['Mf_ops_us']:>8.1f} "
                  f"{r['Mf_speedup']:>5.1f} {r['Mb_kernel_us']:>8.1f} {r['Mb_ops_us']:>8.1f} {r['Mb_speedup']:>5.1f} "
                  f"{r['decay_kernel_us']:>8.1f} {r['decay_ops_us']:>9.1f} {r['decay_speedup']:>5.1f} "
                  f"{'yes' if r['same'] else 'NO':>5}", flush=True)
    write_json(args.json, machine, rows=rows)
    if not all(r["same"] for r in rows):
        sys.exit("the kernels and the tensor ops disagree")


if __name__ == "__main__":
    main()
