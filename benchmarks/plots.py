"""PNG plots of the benchmark results (matplotlib, headless ``Agg`` backend).

Each function takes the rows a benchmark script produced (the same dicts it writes to its JSON) and writes
one PNG. They can also be re-drawn from saved JSON files::

    python benchmarks/plots.py --accuracy docs/accuracy.json --out docs/accuracy.png
    python benchmarks/plots.py --step-time docs/step_time.json --out docs/step_time.png
    python benchmarks/plots.py --mask-quality docs/mask_quality.json --out docs/mask_quality.png
    python benchmarks/plots.py --compile docs/step_time_compile.json --out docs/step_time_compile.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ACCURACY_ORDER = ("dense", "unstructured-50%", "srste", "bimask-random", "bimask-matched", "bimask-paper",
                  "transposable", "pre", "post")
COLORS = {
    "dense": "#444444", "unstructured-50%": "#8c564b", "srste": "#1f77b4", "bimask-random": "#ff7f0e",
    "bimask-matched": "#d62728", "bimask-paper": "#bcbd22", "transposable": "#2ca02c", "pre": "#9467bd",
    "post": "#e377c2",
    # step-time modes: "bimask" runs the default (matched) search
    "bimask": "#d62728", "bimask-unfold": "#7f7f7f",
}


def plot_accuracy(rows: Sequence[dict], out: str | Path, title: str = "") -> None:
    """Top-1 per method, one panel per N:M pattern: every seed as a dot, the mean as a short line with an error
    bar of one sample SD (n-1).

    ``dense`` and ``unstructured-50%`` (pattern ``"-"``) are drawn in every panel for reference.
    """
    patterns = list(dict.fromkeys(r["pattern"] for r in rows if r["pattern"] != "-")) or ["-"]
    fig, axes = plt.subplots(1, len(patterns), figsize=(6.5 * len(patterns), 4.2), sharey=True, squeeze=False)
    all_acc = [r["top1"] for r in rows]
    for ax, pattern in zip(axes[0], patterns):
        methods = [m for m in ACCURACY_ORDER if any(r["method"] == m and r["pattern"] in (pattern, "-") for r in rows)]
        for i, method in enumerate(methods):
            accs = [r["top1"] for r in rows if r["method"] == method and r["pattern"] in (pattern, "-")]
            mean = statistics.fmean(accs)
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            color = COLORS.get(method, "gray")
            ax.hlines(mean, i - 0.3, i + 0.3, color=color, lw=2.5)
            ax.errorbar(i, mean, yerr=std, color=color, capsize=5, lw=1.2)
            ax.scatter([i + 0.12] * len(accs), accs, color=color, s=16, zorder=3, alpha=0.8)
            if method == "dense":
                ax.axhline(mean, color=color, lw=0.8, ls="--")
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"N:M = {pattern}" if pattern != "-" else "pattern-free")
        ax.grid(axis="y", alpha=0.3)
    lo, hi = min(all_acc), max(all_acc)
    pad = max(0.2, 0.15 * (hi - lo))
    axes[0][0].set_ylim(lo - pad, hi + pad)
    axes[0][0].set_ylabel("test top-1 (%)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_paired(diffs: Sequence[dict], out: str | Path, title: str = "") -> None:
    """Paired differences (``benchmarks/accuracy.py``'s ``paired`` dicts), one panel per N:M pattern: the mean
    difference with its 95 % t-interval as an error bar, every seed's difference as a dot, zero dashed."""
    patterns = list(dict.fromkeys(d["pattern"] for d in diffs))
    fig, axes = plt.subplots(1, len(patterns), figsize=(6.5 * len(patterns), 4.2), sharex=True, squeeze=False)
    for ax, pattern in zip(axes[0], patterns):
        rows = [d for d in diffs if d["pattern"] == pattern]
        for i, d in enumerate(rows):
            err = None if d["lo"] is None else [[d["mean"] - d["lo"]], [d["hi"] - d["mean"]]]
            ax.errorbar(d["mean"], i, xerr=err, fmt="o", color="black", capsize=4, lw=1.2)
            ax.scatter(d["diffs"], [i + 0.18] * len(d["diffs"]), s=12, color="gray", alpha=0.8)
        ax.axvline(0.0, color="black", lw=0.8, ls="--")
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([f"{d['a']} − {d['b']} (n={d['n']})" for d in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("top-1 difference (points); bar: 95 % t-interval; dots: seeds")
        ax.set_title(f"N:M = {pattern}")
        ax.grid(axis="x", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _rows(path: str | Path) -> list[dict]:
    """The rows of a benchmark JSON: ``{"machine": ..., "rows": [...]}``, or a bare list (files before the
    machine was recorded)."""
    data = json.loads(Path(path).read_text())
    return data["rows"] if isinstance(data, dict) else data


def plot_step_time(rows: Sequence[dict], out: str | Path, title: str = "") -> None:
    """Step-time ratio and peak-memory ratio to dense, grouped by model (one bar per mode).

    The memory panel shows the profiler's peak step memory (``peak_ratio``) when every row has it, else
    the bytes saved for backward (``mem_ratio``).
    """
    models = list(dict.fromkeys(r["model"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    width = 0.8 / max(1, len(modes))
    if all(r.get("peak_ratio") is not None for r in rows):
        memory = ("peak_ratio", "peak step memory / dense")
    else:
        memory = ("mem_ratio", "saved-for-backward memory / dense")
    for j, (key, label) in enumerate((("ratio", "step time / dense (median)"), memory)):
        ax = axes[j]
        for k, mode in enumerate(modes):
            xs, ys = [], []
            for i, model in enumerate(models):
                row = next((r for r in rows if r["model"] == model and r["mode"] == mode), None)
                if row is not None and row.get(key) is not None:
                    xs.append(i + (k - (len(modes) - 1) / 2) * width)
                    ys.append(row[key])
            ax.bar(xs, ys, width=width, label=mode, color=COLORS.get(mode))
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels([f"{m}\n(b{next(r['batch'] for r in rows if r['model'] == m)})" for m in models], fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_mask_quality(rows: Sequence[dict], out: str | Path, title: str = "") -> None:
    """Retention gain over the identity permutation versus search time (log x), one panel per N:M pattern.

    Random best-of-K is drawn as a line through K = 10, 100, 1000; ``swap`` and ``matched`` as markers.
    """
    patterns = list(dict.fromkeys(r["pattern"] for r in rows))
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    cmap = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(patterns), figsize=(5.5 * len(patterns), 4.3), squeeze=False)
    markers = {"swap": "s", "matched": "*"}
    for ax, pattern in zip(axes[0], patterns):
        for i, shape in enumerate(shapes):
            layer = [r for r in rows if r["shape"] == shape and r["pattern"] == pattern]
            if not layer:
                continue
            color = cmap(i % 10)
            rnd = sorted((r for r in layer if r["method"].startswith("random")), key=lambda r: r["ms"])
            label = "trained ResNet-8, all sparse layers" if shape == "fmnist:all-layers" else f"randn {shape}"
            ax.plot([max(r["ms"], 1e-3) for r in rnd], [r["gain"] for r in rnd], "o-", color=color, ms=4,
                    label=label)
            for r in layer:
                if r["method"] in markers:
                    ax.scatter(max(r["ms"], 1e-3), r["gain"], marker=markers[r["method"]], color=color,
                               s=70 if r["method"] == "matched" else 30, edgecolors="black", linewidths=0.5, zorder=3)
        ax.set_xscale("log")
        ax.set_xlabel("search time (ms, log)")
        ax.set_title(f"N:M = {pattern}   (o-o random K=10/100/1000, ■ swap, ★ matched)", fontsize=9)
        ax.axhline(0.0, color="black", lw=0.6)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("retention gain over identity permutation")
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_compile(rows: Sequence[dict], out: str | Path, title: str = "") -> None:
    """Eager and compiled Bi-Mask step time over the dense step of the same kind, per model and thread count.

    Rows come from ``step_time.py --compile`` (modes ``bimask`` and ``bimask+compile``); the targets
    (1.05x eager, 1.03x compiled) are drawn as dashed lines, the fastest-round ratio as a black tick, and
    the eager mask work (``Mf`` + ``Mb`` + decay, share of the eager dense step) as a hatched bar.
    """
    by_case = {(r["model"], r.get("threads", 1), r["mode"]): r for r in rows}
    cases = list(dict.fromkeys((model, threads) for model, threads, mode in by_case if mode.startswith("bimask")))
    kinds = (("bimask", "eager / eager dense", "#d62728", 1.05),
             ("bimask+compile", "compiled / compiled dense", "#1f77b4", 1.03))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(cases) + 2), 4.3))
    width = 0.27
    for k, (mode, label, color, target) in enumerate(kinds):
        for i, (model, threads) in enumerate(cases):
            row = by_case.get((model, threads, mode))
            if row is None:
                continue
            x = i + (k - 1) * width
            ax.bar(x, row["ratio"], width=width, color=color, label=label if i == 0 else None)
            ax.hlines(row["ratio_min"], x - width / 2, x + width / 2, color="black", lw=1.5)
            ax.text(x, row["ratio"] + 0.004, f"{row['ratio']:.3f}", ha="center", fontsize=7)
            ax.hlines(target, x - width / 2, x + width / 2, color=color, lw=1.2, ls="--")
    for i, (model, threads) in enumerate(cases):
        row = by_case.get((model, threads, "bimask"))
        if row is not None and row.get("mask_share") is not None:
            x = i + width
            ax.bar(x, 1.0 + row["mask_share"], width=width, color="white", edgecolor="#7f7f7f", hatch="//",
                   label="1 + eager mask work / dense step" if i == 0 else None)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([f"{m}\nb{next(r['batch'] for r in rows if r['model'] == m)}, {t} thr"
                        for m, t in cases], fontsize=8)
    low = min([r["ratio_min"] for r in rows if r["mode"].startswith("bimask")] + [1.0])
    high = max([r["ratio"] for r in rows if r["mode"].startswith("bimask")] + [1.06])
    ax.set_ylim(min(0.95, low - 0.01), high + 0.03)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_ylabel("step time / dense step (median; tick: fastest rounds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Re-draw a plot from a benchmark's JSON file."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--accuracy", help="docs/accuracy.json from benchmarks/accuracy.py")
    group.add_argument("--step-time", help="JSON from benchmarks/step_time.py --json")
    group.add_argument("--mask-quality", help="JSON from benchmarks/permutation_search.py --json")
    group.add_argument("--compile", nargs="+", metavar="JSON",
                       help="one or more JSONs from benchmarks/step_time.py --compile --json (rows concatenated)")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    if args.accuracy:
        plot_accuracy(list(json.loads(Path(args.accuracy).read_text())["runs"].values()), args.out)
    elif args.compile:
        plot_compile([row for path in args.compile for row in _rows(path)], args.out)
    elif args.step_time:
        plot_step_time(_rows(args.step_time), args.out)
    else:
        plot_mask_quality(json.loads(Path(args.mask_quality).read_text())["rows"], args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
