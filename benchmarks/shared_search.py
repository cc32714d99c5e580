"""Wall time of one permutation refresh with 1 process and with 2 processes sharing the search.

At a refresh every rank searches its share of the layers and broadcasts the results
(``bimask_hf.distributed.search_permutations_shared``). This script runs the same refresh of a
randomly initialised timm model, sparsified 2:4, in one process and under ``torchrun`` with two CPU
processes on gloo (one thread each), side by side in one run, and prints the wall time of each (best
of ``--repeats``, the slowest rank's time for two processes, broadcasts included), the search time of
the busiest rank (its own layers only), the ratio of the wall times, and whether the permutations are
identical. Examples::

    python benchmarks/shared_search.py                          # resnet50, matched search
    python benchmarks/shared_search.py --model resnet18 --quick  # seconds-long smoke run for CI

Two processes only help when the machine has two free cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


def worker(args: argparse.Namespace) -> None:
    """One process of a run: time ``--repeats`` refreshes and write the result (rank 0)."""
    import timm
    import torch.distributed as dist

    import bimask_hf as bh

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = bh.sparsify(timm.create_model(args.model, num_classes=10),
                        bh.BiMaskConfig(permutation_search=args.method, num_permutations=args.num_permutations))
    times, searched = [], []
    for step in range(args.repeats):
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        stats = bh.refresh_permutations(model, step=step)
        elapsed = torch.tensor([time.perf_counter() - start, stats["seconds"]], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the refresh ends when the slowest rank does
        times.append(float(elapsed[0]))
        searched.append(float(elapsed[1]))
    perms = {name: layer.bimask_permutation.tolist() for name, layer in bh.sparse_layers(model).items()}
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"seconds": min(times), "search_seconds": min(searched), "layers": len(perms), "permutations": perms}, f)
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--method", default="matched")
    p.add_argument("--num_permutations", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="one repeat of a random best-of-4 search (smoke run)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.repeats, args.method, args.num_permutations = 1, "random", 4
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [__file__, "--worker", "--model", args.model, "--method", args.method,
              "--num_permutations", str(args.num_permutations), "--repeats", str(args.repeats)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for procs in (1, 2):
            out = os.path.join(tmp, f"{procs}.json")
            launcher = [sys.executable] if procs == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
            subprocess.run([*launcher, *common, "--out", out], env=env, check=True)
            with open(out, encoding="utf-8") as f:
                results[procs] = json.load(f)
    one, two = results[1], results[2]
    print(f"model {args.model}, {one['layers']} Bi-Mask layers, search {args.method}, best of {args.repeats}")
    print("processes  refresh_s  busiest_rank_search_s")
    print(f"1          {one['seconds']:.4f}     {one['search_seconds']:.4f}")
    print(f"2          {two['seconds']:.4f}     {two['search_seconds']:.4f}")
    print(f"ratio_2_over_1 {two['seconds'] / one['seconds']:.3f}")
    print(f"identical_permutations {one['permutations'] == two['permutations']}")


if __name__ == "__main__":
    main()
