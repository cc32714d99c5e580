"""Retention gains of the random permutation searches over many draws, against the deterministic ``matched``.

One draw of a random search is one sample of a wide distribution, so a single draw says little about
how much ``matched`` gains over it. For each ``randn`` layer shape of ``benchmarks/permutation_search.py``
(N:M top-|W| forward mask, every search from the identity) this draws ``--draws`` generators and reports,
over the draws, the median and the range (min - max) of the gain in retention over the identity of:

* ``random`` best-of-100 (candidate 0 is the identity, so the gain is never negative);
* ``random_fresh`` best-of-10 and best-of-100 (the paper's released search: fresh candidates only, so the
  gain can be negative);

and ``matched``'s gain (no randomness) with its ratio to each median. Retention is computed in closed form
(``permutation_retention``, docs/method.md section 3). Examples::

    python benchmarks/search_draws.py --draws 10 > docs/search_draws_output.txt   # minutes on an idle core
    python benchmarks/search_draws.py --quick                                     # seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from bimask_hf.masks import nm_mask, permutation_retention, search_permutation

SHAPES = [(64, 576), (128, 1152), (256, 2304), (512, 4608), (384, 1536), (768, 3072), (1536, 384), (2048, 512),
          (3072, 768)]
SEARCHES = (("random", 100), ("random_fresh", 10), ("random_fresh", 100))


def layer_rows(rows: int, cols: int, n: int, m: int, draws: int) -> dict:
    """Gains over the identity of every search on one randn layer: lists over draws, one value for matched."""
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * 7919 + cols))
    mf = nm_mask(weight, n, m)
    base = permutation_retention(mf, torch.arange(rows), n, m)
    out: dict = {"shape": f"{rows}x{cols}", "pattern": f"{n}:{m}", "identity": base}
    for method, k in SEARCHES:
        gains = []
        for draw in range(draws):
            perm = search_permutation(mf, n, m, method, k, torch.Generator().manual_seed(draw))
            gains.append(permutation_retention(mf, perm, n, m) - base)
        out[f"{method}-{k}"] = gains
    out["matched"] = permutation_retention(mf, search_permutation(mf, n, m, "matched"), n, m) - base
    return out


def summary_line(row: dict) -> str:
    """One markdown row: median [min, max] of each random search, matched's gain and its ratio to the medians."""
    cells = [row["shape"], row["pattern"], f"{row['identity']:.4f}"]
    ratios = []
    for method, k in SEARCHES:
        gains = row[f"{method}-{k}"]
        median = statistics.median(gains)
        cells.append(f"{median:+.4f} [{min(gains):+.4f}, {max(gains):+.4f}]")
        ratios.append(f"{row['matched'] / median:.0f}x" if median > 0 else "–")
    cells.append(f"{row['matched']:+.4f}")
    cells.extend(ratios)
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    """Run the draws and print the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=20, help="random generators per search and layer")
    parser.add_argument("--patterns", nargs="+", default=["2:4", "1:4"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="seconds: two small shapes, 2:4, 3 draws")
    parser.add_argument("--json", help="save every draw's gain here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes, patterns, draws = SHAPES, args.patterns, args.draws
    if args.quick:
        shapes, patterns, draws = SHAPES[:1] + [(32, 64)], ["2:4"], 3
    results = []
    head = " | ".join(f"{method} K={k}: median [min, max]" for method, k in SEARCHES)
    ratio_head = " | ".join(f"matched ÷ {method} K={k} median" for method, k in SEARCHES)
    print(f"gain in retention over the identity, {draws} draws per random search (randn weights)\n")
    print(f"| layer | N:M | R identity | {head} | matched | {ratio_head} |")
    print("|" + "---|" * (4 + 2 * len(SEARCHES)))
    for pattern in patterns:
        n, m = (int(v) for v in pattern.split(":"))
        for rows, cols in shapes:
            row = layer_rows(rows, cols, n, m, draws)
            results.append(row)
            print(summary_line(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"draws": draws, "torch": torch.__version__, "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
