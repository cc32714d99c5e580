"""Training-step time and memory of every mode, as ratios to dense, measured side by side in one run.

A step is forward + cross-entropy + backward + SGD step, with the mode's mask work (masks are
recomputed every forward) and the permutation search amortised at the configured interval
(search time / ``--interval`` added to each step). Modes are interleaved round by round, in a new random
order every round (seeded), so machine noise and order effects hit all of them alike; the median over
rounds is reported (and the ratio of the fastest rounds, ``x (min)``, as a noise check). Memory is
reported twice: the bytes autograd saves for backward during one step (deterministic), plus the masks;
and the peak of all CPU memory allocated during one step (activations, gradients, masks, temporaries)
above what was live before it, from the PyTorch profiler's memory timeline.

On a shared machine pass ``--threads 1``: a 2-thread pool stalls whenever the other core is busy.

``faults k`` is the median count of minor page faults per step, in thousands: glibc hands large freed
blocks back to the kernel and takes fresh zeroed pages for the next ones, and how many a step takes
changes with the order of allocations, from run to run and between models (ResNet-32 b128, 2 threads:
16k-70k per step, 2-4 % of a dense step, for dense and Bi-Mask alike). ``--tune-malloc`` keeps freed memory
in the process (no heap trimming, no ``mmap``), so the steps take none and the ratios measure the work.

``--compile`` adds ``dense+compile`` and ``bimask+compile`` (``torch.compile``, inductor by default): the
compiled bimask step is reported against the compiled dense step, eager modes against eager dense. The
``Mf %``, ``Mb %`` and ``decay %`` columns time the per-step mask work of the ``bimask`` model on its own
(forward masks ``Mf``, backward masks ``Mb``, the decay term, over all sparse layers) as a share of the
dense step of the same kind: eagerly for ``bimask``, as compiled kernels for ``bimask+compile``.

``bimask`` uses the library's default permutation search (``--search``, default ``matched``) and, eagerly
on CPU, the C mask kernels of ``bimask_hf.kernels``; ``bimask-tensorops`` the same with those kernels
switched off (masks by tensor ops); ``bimask-dispatched`` calls those kernels as ``torch.library`` ops through
the dispatcher (as the layers do while a profiler records), to measure its cost; ``bimask-random`` the paper's best-of-100 random search; ``bimask-unfold`` (``--unfold``) the research-style
``unfold``/``fold`` convolution of ``unfold_baseline.py`` with the same masks.

    python benchmarks/step_time.py                 # ResNet-32/CIFAR b128 and DeiT-small-sized ViT
    python benchmarks/step_time.py --models resnet32_cifar resnet50 deit_small --unfold \
        --batch resnet50=8 deit_small=8 --json docs/step_time.json --plot docs/step_time.png
    python benchmarks/step_time.py --quick         # seconds; what CI runs
    python benchmarks/step_time.py --models resnet32_cifar resnet50 deit_small --modes bimask --compile \
        --threads 1 2 --rounds 3 --steps 1 --no-peak      # the real-batch targets (minutes per model)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import resource
import statistics
import sys
import time

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import describe, machine_info, write_json  # noqa: E402
from unfold_baseline import use_unfold_convs  # noqa: E402

import bimask_hf as bh  # noqa: E402
from bimask_hf import kernels  # noqa: E402
from bimask_hf.functional import _pruned, _weight_grad_extra  # noqa: E402  (the decay term as the layers compute it)

# name -> (timm architecture, kwargs, batch, image size, quick batch, quick size)
MODELS = {
    "resnet32_cifar": ("resnet32_cifar", {}, 128, 32, 16, 32),
    "resnet50": ("resnet50", {}, 32, 224, 2, 64),
    "deit_small": ("deit_small_patch16_224", {}, 64, 224, 2, 224),
    "vit_small_cifar": ("vit_small_patch16_224", {"img_size": 32, "patch_size": 4}, 128, 32, 8, 32),
}
MODES = ["dense", "srste", "bimask", "bimask-random", "transposable", "pre", "post"]
COMPILED = "+compile"
TENSOR_OPS = "-tensorops"  # the same mode with the C mask kernels switched off (eager masks by tensor ops)
DISPATCHED = "-dispatched"  # the same mode with the C kernels called as torch.library ops (as under a profiler)


def kernel_path(mode: str):
    """Context of ``mode``'s eager mask work: tensor ops (``-tensorops``), the C kernels as ``torch.library`` ops
    through the dispatcher (``-dispatched``), or the C kernels called directly (otherwise)."""
    if mode.endswith(TENSOR_OPS):
        return kernels.disabled()
    return kernels.dispatched() if mode.endswith(DISPATCHED) else contextlib.nullcontext()


def build(
    name: str, mode: str, interval: int, quick: bool, batch_override: int | None = None, search_method: str = "matched"
) -> tuple[nn.Module, torch.Tensor, torch.Tensor, float]:
    """Model of ``name`` patched for ``mode`` (``dense-plain``: not patched), a random batch, and the
    seconds of one permutation search (bi-directional modes only)."""
    arch, kwargs, batch, size, qbatch, qsize = MODELS[name]
    if quick:
        batch, size = qbatch, qsize
        if "img_size" in kwargs:
            kwargs = {**kwargs, "img_size": size}
    if batch_override:
        batch = batch_override
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=10 if "cifar" in name else 1000, **kwargs)
    search_seconds = 0.0
    mode = mode.removesuffix(COMPILED)
    if mode == "dense":
        mode = "dense-plain"
    if mode != "dense-plain":
        base = mode.removesuffix(TENSOR_OPS).removesuffix(DISPATCHED).removesuffix("-random").removesuffix("-unfold")
        search = "random" if mode.endswith("-random") else search_method
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
    return total


def mask_work(model: nn.Module, repeats: int = 3) -> dict[str, float]:
    """Seconds per step of the mask work alone (median of ``repeats``), summed over the sparse layers, as
    the eager training step runs it (masks in ``step_mask_dtype``, each layer's work through
    ``functional.mask_work``, which picks its threads): ``forward`` (``Mf``), ``backward`` (``Mb``,
    bi-directional layers) and ``decay`` (``(1 - Mf) * W``)."""
    from bimask_hf.functional import mask_work as run_mask_work
    from bimask_hf.layers import PERMUTATION_KEY
    from bimask_hf.masks import backward_mask_for_weight, step_mask_dtype

    layers = list(bh.sparse_layers(model).values())
    grads = {layer: torch.zeros_like(layer.weight.detach()) for layer in layers}
    times: dict[str, list[float]] = {"forward": [], "backward": [], "decay": []}
    for _ in range(repeats):
        spent = dict.fromkeys(times, 0.0)
        for layer in layers:
            w = layer.weight.detach()
            dtype = step_mask_dtype(w)
            t0 = time.perf_counter()
            mf = run_mask_work(layer.forward_mask_for, w, w, dtype)
            t1 = time.perf_counter()
            if layer.effective_mode == "bimask":
                run_mask_work(backward_mask_for_weight, w, w, mf, getattr(layer, PERMUTATION_KEY), layer.n, layer.m,
                              dtype=dtype)
            t2 = time.perf_counter()
            if layer.decay:  # on a gradient-like tensor, in place where the kernel runs
                run_mask_work(_weight_grad_extra, w, grads[layer], w, mf, layer.decay)
            t3 = time.perf_counter()
            spent["forward"] += t1 - t0
            spent["backward"] += t2 - t1
            spent["decay"] += t3 - t2
        for key, value in spent.items():
            times[key].append(value)
    return {key: statistics.median(values) for key, values in times.items()}


def dispatcher_cost(name: str, quick: bool, batch: int | None, repeats: int = 7) -> dict:
    """What calling the C kernels as ``torch.library`` ops costs per training step of ``name``: the eager mask
    work of all sparse layers (:func:`mask_work`) called directly and through the dispatcher
    (:func:`bimask_hf.kernels.dispatched`), interleaved, medians; against one dense step of the same model."""
    model, x, y, _ = build(name, "bimask", 100, quick, batch)
    calls = []
    counted = {}
    for part in ("forward_mask", "backward_mask", "add_decay_"):
        counted[part] = getattr(kernels, part)
        setattr(kernels, part, lambda *a, _real=counted[part], **k: calls.append(1) or _real(*a, **k))
    try:
        mask_work(model, 1)
    finally:
        for part, real in counted.items():
            setattr(kernels, part, real)
    direct, dispatched = [], []
    for _ in range(repeats):
        direct.append(sum(mask_work(model, 1).values()))
        with kernels.dispatched():
            dispatched.append(sum(mask_work(model, 1).values()))
    dense, x, y, _ = build(name, "dense", 100, quick, batch)
    opt = torch.optim.SGD(dense.parameters(), lr=1e-3, momentum=0.9)
    time_steps(dense, opt, x, y, 1, False)  # warm-up
    step = time_steps(dense, opt, x, y, 1, False)[0]
    extra = statistics.median(dispatched) - statistics.median(direct)
    return dict(model=name, batch=int(x.shape[0]), calls=len(calls), direct_ms=1e3 * statistics.median(direct),
                dispatched_ms=1e3 * statistics.median(dispatched), extra_ms=1e3 * extra,
                per_call_us=1e6 * extra / max(1, len(calls)), dense_step_s=step, share=extra / step)


def mask_work_compiled(model: nn.Module, backend: str, repeats: int = 3) -> dict[str, float]:
    """:func:`mask_work` as a compiled step runs it: each part is one ``torch.compile``'d function over all
    sparse layers, with masks carried as 0/1 floats (``step_mask_dtype``), so the times are those of
    the generated mask kernels (one warm-up call compiles them)."""
    from bimask_hf.layers import PERMUTATION_KEY
    from bimask_hf.masks import backward_mask_for_weight, step_mask_dtype

    layers = list(bh.sparse_layers(model).values())
    bidir = [i for i, layer in enumerate(layers) if layer.effective_mode == "bimask"]
    decaying = [i for i, layer in enumerate(layers) if layer.decay]

    def forward(ws: list[torch.Tensor]) -> list[torch.Tensor]:
        return [layer.forward_mask_for(w, step_mask_dtype(w)) for layer, w in zip(layers, ws)]

    def backward(ws: list[torch.Tensor], mfs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [backward_mask_for_weight(ws[i], mfs[i], getattr(layers[i], PERMUTATION_KEY), layers[i].n,
                                         layers[i].m, dtype=step_mask_dtype(ws[i])) for i in bidir]

    def decay(ws: list[torch.Tensor], mfs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [_pruned(ws[i], mfs[i]).mul_(layers[i].decay) for i in decaying]

    parts = {"forward": torch.compile(forward, backend=backend), "backward": torch.compile(backward, backend=backend),
             "decay": torch.compile(decay, backend=backend)}
    ws = [layer.weight.detach() for layer in layers]
    mfs = parts["forward"](ws)
    times: dict[str, list[float]] = {key: [] for key in parts}
    for rep in range(repeats + 1):  # the first round compiles
        for key, fn in parts.items():
            t0 = time.perf_counter()
            fn(ws) if key == "forward" else fn(ws, mfs)
            if rep:
                times[key].append(time.perf_counter() - t0)
    return {key: statistics.median(values) for key, values in times.items()}


def peak_step_bytes(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, post: bool) -> int | None:
    """Peak CPU bytes allocated during one training step above those live before it (None if unavailable).

    Replays the allocation/free events of the PyTorch profiler's memory timeline (``profile_memory`` with
    ``record_shapes`` and ``with_stack``); that timeline is a private PyTorch API, so failures give None.
    """
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import Action, MemoryProfileTimeline

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
            time_steps(model, opt, x, y, 1, post)
        current = peak = 0
        for _, action, key, size in MemoryProfileTimeline(prof._memory_profile()).timeline:
            if key[0].device.type != "cpu":
                continue
            if action == Action.CREATE:
                current += size
            elif action == Action.DESTROY:
                current -= size
            peak = max(peak, current)
        return peak
    except Exception as err:  # noqa: BLE001 - a private API: report instead of failing the benchmark
        print(f"  (peak memory unavailable: {type(err).__name__}: {err})")
        return None


def minor_faults() -> int:
    """Page faults this process has taken so far that needed no disk (fresh pages from the kernel)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_steps(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int, post: bool
) -> tuple[float, float]:
    """(seconds, minor page faults) per step."""
    faults = minor_faults()
    start = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if post:
            bh.project_(model)
    return (time.perf_counter() - start) / steps, (minor_faults() - faults) / steps


def tune_malloc() -> bool:
    """Keep freed memory in the process (glibc: no trimming of the heap, no ``mmap`` per large block), as
    ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_MAX_`` or jemalloc would: after warm-up the steps then take no
    page faults. Returns False where ``mallopt`` is not available (not glibc)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
    return bool(mallopt(m_trim_threshold, 2**31 - 1) and mallopt(m_top_pad, 64 << 20) and mallopt(m_mmap_max, 0))


def run(
    name: str,
    modes: list[str],
    rounds: int,
    steps: int,
    interval: int,
    quick: bool,
    batch: int | None = None,
    search_method: str = "matched",
    peak: bool = True,
    seed: int = 0,
    compile_backend: str = "inductor",
) -> list[dict]:
    """Time every mode on one model; rows with absolute numbers and ratios to ``dense`` (compiled modes:
    to ``dense+compile``)."""
    runs = {}
    for mode in modes:
        model, x, y, search = build(name, mode, interval, quick, batch, search_method)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        compiled = mode.endswith(COMPILED)
        work = None
        with kernel_path(mode):
            if mode.removesuffix(COMPILED).removesuffix(TENSOR_OPS).removesuffix(DISPATCHED) == "bimask":
                work = mask_work_compiled(model, compile_backend) if compiled else mask_work(model)
            net = torch.compile(model, backend=compile_backend) if compiled else model
            mem = saved_bytes(net, x, y)
            start = time.perf_counter()
            time_steps(net, opt, x, y, 2 if compiled else 1, mode == "post")  # warm-up (compiles; momentum buffers)
            warmup = time.perf_counter() - start
            peak_bytes = peak_step_bytes(net, opt, x, y, mode == "post") if peak and not compiled else None
        runs[mode] = dict(model=net, opt=opt, x=x, y=y, search=search, mem=mem, peak=peak_bytes, times=[],
                          faults=[], work=work, warmup=warmup)
        print(f"  (warm-up {warmup:.1f} s: {name} {mode})", flush=True)
    order = random.Random(seed)
    for _ in range(rounds):
        shuffled = list(modes)
        order.shuffle(shuffled)  # a new order every round: no mode always runs first / after a given one
        for mode in shuffled:
            r = runs[mode]
            with kernel_path(mode):
                seconds, faults = time_steps(r["model"], r["opt"], r["x"], r["y"], steps, mode == "post")
            r["times"].append(seconds)
            r["faults"].append(faults)
    out = []
    for mode in modes:
        ref = runs["dense" + (COMPILED if mode.endswith(COMPILED) else "")]
        base, base_min = statistics.median(ref["times"]), min(ref["times"])
        base_mem, base_peak = ref["mem"], ref["peak"]
        eager_base = statistics.median(runs["dense"]["times"])
        r = runs[mode]
        work = r["work"] or {}
        step = statistics.median(r["times"]) + r["search"] / interval
        peak_mb = None if r["peak"] is None else r["peak"] / 2**20
        peak_ratio = None if r["peak"] is None or not base_peak else r["peak"] / base_peak
        out.append(dict(
            model=name, mode=mode, batch=int(r["x"].shape[0]), image=int(r["x"].shape[-1]), step_s=step,
            step_min_s=min(r["times"]), ratio_min=(min(r["times"]) + r["search"] / interval) / base_min,
            times_s=r["times"], search_s=r["search"], ratio=step / base, mem_mb=r["mem"] / 2**20,
            mem_ratio=r["mem"] / base_mem, peak_mb=peak_mb, peak_ratio=peak_ratio, warmup_s=r["warmup"],
            mask_forward_s=work.get("forward"), mask_backward_s=work.get("backward"), mask_decay_s=work.get("decay"),
            mask_share=(sum(work.values()) / base) if work else None,
            search_share=r["search"] / (interval * eager_base), faults=statistics.median(r["faults"]),
        ))
    return out


def parse_batches(items: list[str]) -> dict[str, int]:
    """``["resnet50=8", "deit_small=8"]`` -> ``{"resnet50": 8, "deit_small": 8}``."""
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in MODELS or not value.isdigit():
            raise SystemExit(f"--batch expects MODEL=INT with MODEL in {sorted(MODELS)}, got {item!r}")
        out[name] = int(value)
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet32_cifar", "deit_small"], choices=sorted(MODELS))
    parser.add_argument("--modes", nargs="+", default=MODES)
    parser.add_argument("--unfold", action="store_true", help="also time the unfold-based Bi-Mask baseline")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per mode per round")
    parser.add_argument("--interval", type=int, default=100, help="permutation refresh interval")
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="thread counts, e.g. 1 2")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile'd dense and bimask (bimask+compile vs dense+compile)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--quick", action="store_true", help="tiny batches, 1 round: a smoke run for CI")
    parser.add_argument("--batch", nargs="+", default=[], metavar="MODEL=B",
                        help="batch-size overrides, e.g. resnet50=8 deit_small=8")
    parser.add_argument("--search", default="matched", choices=["matched", "swap", "random", "identity"],
                        help="permutation search of the 'bimask' mode (default: the library default, matched)")
    parser.add_argument("--no-peak", action="store_true", help="skip the profiler-based peak-memory measurement")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-round random mode order")
    parser.add_argument("--tune-malloc", action="store_true",
                        help="keep freed memory in the process (glibc mallopt: no heap trimming, no mmap), so that "
                             "page faults do not add noise; the faults column shows them")
    parser.add_argument("--dispatcher-cost", action="store_true",
                        help="only measure what the torch.library ops' dispatcher adds to the eager mask work per "
                             "step (direct ctypes calls vs kernels.dispatched(), interleaved) against a dense step")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--plot", help="write a PNG of the time and memory ratios")
    parser.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    args = parser.parse_args()
    batches = parse_batches(args.batch)
    modes = list(dict.fromkeys(["dense", *args.modes] + (["bimask-unfold"] if args.unfold else [])))
    if args.compile:
        modes += ["dense" + COMPILED, "bimask" + COMPILED]
    rounds, steps = (1, 1) if args.quick else (args.rounds, args.steps)
    malloc = "default malloc"
    if args.tune_malloc:
        malloc = "malloc tuned (no trimming, no mmap)" if tune_malloc() else "malloc not tunable here (not glibc)"
    machine = machine_info(args.threads, allocator=malloc)
    print(describe(machine))
    if args.dispatcher_cost:
        costs = []
        for threads in args.threads:
            torch.set_num_threads(threads)
            for name in args.models:
                c = dispatcher_cost(name, args.quick, batches.get(name), 3 if args.quick else 7)
                costs.append({**c, "threads": threads})
                print(f"dispatcher cost {name} b{c['batch']}, {threads} thread(s): {c['calls']} kernel calls per step, "
                      f"mask work {c['direct_ms']:.2f} ms direct / {c['dispatched_ms']:.2f} ms dispatched: "
                      f"+{c['extra_ms']:.2f} ms ({c['per_call_us']:.1f} us per call) = {100 * c['share']:.3f} % of a "
                      f"{c['dense_step_s']:.3f} s dense step", flush=True)
        write_json(args.json, machine, dispatcher=costs)
        return
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"torch {torch.__version__}, {threads} threads (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}), "
              f"{rounds} rounds x {steps} steps, interval "
              f"{args.interval}, bimask search {args.search}, random mode order per round (seed {args.seed}), {malloc}")
        print(f"{'model':<16} {'mode':<15} {'batch':>5} {'img':>4} {'step s':>8} {'x dense':>8} {'x (min)':>8} "
              f"{'search s':>9} {'search %':>8} {'Mf %':>6} {'Mb %':>6} {'decay %':>7} {'saved MB':>9} {'mem x':>6} "
              f"{'peak MB':>8} {'peak x':>6} {'faults k':>8}")
        for name in args.models:
            for row in run(name, modes, rounds, steps, args.interval, args.quick, batches.get(name), args.search,
                           not args.no_peak, args.seed, args.compile_backend):
                row["threads"] = threads
                rows.append(row)
                dense_s = row["step_s"] / row["ratio"]  # the dense step of the same kind (eager or compiled)
                shares = [None if row["mask_forward_s"] is None else 100 * row[k] / dense_s
                          for k in ("mask_forward_s", "mask_backward_s", "mask_decay_s")]
                print(f"{row['model']:<16} {row['mode']:<15} {row['batch']:>5} {row['image']:>4} {row['step_s']:>8.4f} "
                      f"{row['ratio']:>8.3f} {row['ratio_min']:>8.3f} {row['search_s']:>9.3f} "
                      f"{100 * row['search_share']:>8.2f} {_fmt(shares[0], '6.2f'):>6} {_fmt(shares[1], '6.2f'):>6} "
                      f"{_fmt(shares[2], '7.2f'):>7} {row['mem_mb']:>9.1f} {row['mem_ratio']:>6.3f} "
                      f"{_fmt(row['peak_mb'], '8.1f'):>8} {_fmt(row['peak_ratio'], '6.3f'):>6} "
                      f"{row['faults'] / 1000:>8.1f}", flush=True)
    if args.markdown:
        print("\n| model | batch | image | mode | step (s, median) | × dense | × dense (min) | search (s, every "
              f"{args.interval} steps) | saved MB | × dense | peak MB | × dense |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['batch']} | {r['image']} | {r['mode']} | {r['step_s']:.4f} | {r['ratio']:.3f} | "
                  f"{r['ratio_min']:.3f} | "
                  f"{r['search_s']:.3f} | {r['mem_mb']:.1f} | {r['mem_ratio']:.3f} | {_fmt(r['peak_mb'], '.1f')} | "
                  f"{_fmt(r['peak_ratio'], '.3f')} |")
    if not args.quick:
        for r in rows:  # ratios to the dense step of the same kind (eager or compiled), same model and threads
            if r["mode"] in ("bimask", "bimask" + COMPILED):
                limit = 1.03 if r["mode"].endswith(COMPILED) else 1.05
                print(f"TARGET {r['mode']} <= {limit:.2f}x on {r['model']} b{r['batch']}, {r['threads']} thread(s): "
                      f"{r['ratio']:.3f}x -> {'PASS' if r['ratio'] <= limit else 'FAIL'}")
    write_json(args.json, machine, rows=rows)
    if args.plot:
        from plots import plot_step_time

        plot_step_time(rows, args.plot, title=f"training-step time and memory vs dense, torch {torch.__version__}, "
                       f"{'/'.join(map(str, args.threads))} CPU thread(s)")
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
