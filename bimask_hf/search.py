"""Row-permutation search for the backward mask of Bi-Mask (the method: ``docs/method.md``).

The backward mask ``Mb`` is N:M along the rows of ``W * Mf`` after a row permutation ``p``: rows
``p[0:M], p[M:2M], ...`` form groups, and in every group and column the ``N`` largest ``|W * Mf|``
are kept. Entries of ``Mf`` always outrank pruned ones, so group ``g`` keeps ``min(C[g, c], N)``
entries in column ``c``, where ``C[g, c]`` counts the ``Mf`` ones of its rows. The retention

    ``R(p) = sum_{g, c} min(C[g, c], N) / |Mf|``

depends on the forward mask only, and every search here maximises it.

Methods (all vectorised; the only Python loops run over rounds or candidate chunks):

* ``"identity"`` -- no search: keeps ``init`` (``arange(O)`` by default).
* ``"random"`` -- the paper's kind of search made monotone: best of ``num_candidates`` random
  permutations, with the identity (or ``init``) as candidate 0 so the result never gets worse.
* ``"random_fresh"`` -- the paper's released search exactly: best of ``num_candidates`` fresh random
  permutations; ``init`` is not a candidate, so retention can drop at a refresh.
* ``"swap"`` -- local search between row groups. Each round pairs the groups at random and, for every
  pair, scores all ``M * M`` single-row swaps at once with one batched matmul (the gain of a swap is
  bilinear in the two rows, see :func:`_swap_gains`), then applies the best strictly improving swap
  of every pair simultaneously (the pairs are disjoint, so the gains add up exactly).
* ``"matched"`` (the strongest) -- every round splits the row groups into candidate blocks of up to
  256 rows (64 groups at M=4; round 0: consecutive groups; later rounds: every ``s``-th group, ``s``
  changing each round, so groups meet new partners) and, in every block, scores *all* single-row swaps
  between its groups with two integer matmuls (:func:`_block_swap_gains`), pairs the groups by repeated
  mutual-best matching on their best swap gain, and applies the best swap of every matched pair. Blocks
  bound the work per round (``O x 256 x K`` instead of ``O x O x K``) and the scratch memory: blocks are
  scored a chunk at a time under :data:`GAIN_CHUNK_BYTES` (64 MiB), so no ``O x O`` tensor is built at
  any size. A layer with at most 256 rows is one block (every swap between all groups, as before); there,
  once no swap helps and M <= 5, it tries every re-split of the ``2M`` rows of every pair of groups (35
  splits at M=4, scored for all pairs at once from joint histograms of column patterns) and then goes
  back to swaps. It stops at a local optimum, after ``max_rounds`` rounds, or after a round that gained
  less than :data:`DEFAULT_TOLERANCE` of ``|Mf|`` (:data:`BLOCKED_TOLERANCE` on layers of several
  blocks). It uses no randomness.

What each method gains and how long it takes, per layer shape: ``docs/benchmarks.md``, section 3
(``benchmarks/permutation_search.py``).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import time
from collections.abc import Iterator

import torch

from .config import PERMUTATION_SEARCHES, check_nm_pattern

__all__ = [
    "METHODS",
    "DEFAULT_MAX_ROUNDS",
    "DEFAULT_PATIENCE",
    "DEFAULT_TOLERANCE",
    "BLOCKED_TOLERANCE",
    "GAIN_CHUNK_BYTES",
    "search_permutation",
    "permutation_retention",
    "retention_share",
    "matmul_path",
]

#: Names accepted by :func:`search_permutation`.
METHODS: tuple[str, ...] = PERMUTATION_SEARCHES

#: Rounds run by the local searches when ``max_rounds`` is None.
DEFAULT_MAX_ROUNDS: dict[str, int] = {"swap": 64, "matched": 50}

#: ``"matched"`` also stops after a round that gains less than this share of ``|Mf|`` in retention
#: (it converges fully on small layers; big layers stop once rounds bring almost nothing).
DEFAULT_TOLERANCE: float = 2e-5

#: The same for ``"matched"`` on layers of several candidate blocks (over 256 rows): the rounds this skips
#: bring little of the gain for a large share of the time (``docs/benchmarks.md``, section 3).
BLOCKED_TOLERANCE: float = 5e-5

#: A local search stops early after this many consecutive rounds without any gain.
DEFAULT_PATIENCE: int = 8

#: Largest M whose group pairs are re-split exhaustively (C(2M-1, M-1) splits: 10, 35, 126).
_MAX_SPLIT_M = 5

#: Re-splits are tried (on all group pairs) while the joint-histogram matmul stays under this many MACs.
_SPLIT_BUDGET = 2**31

#: Rough bound on the scratch memory of one chunk of random candidates, in bytes.
_CHUNK_BYTES = 256 * 2**20

#: Bound on the scratch memory of ``"matched"``'s swap scores, in bytes: the candidate blocks of a round
#: are scored a chunk at a time (:func:`_block_chunk`), so no ``O x O`` tensor is ever built.
GAIN_CHUNK_BYTES = 64 * 2**20

#: Rows per candidate block of ``"matched"`` (every swap inside a block is scored each round): 64 groups
#: at M=4, 32 at M=8.
_BLOCK_ROWS = 256

#: Stride of the block layouts: round ``r`` takes every ``s``-th group with ``s ~ frac(r * _GOLDEN) * G``.
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _check_inputs(forward_mask: torch.Tensor, n: int, m: int) -> tuple[int, int]:
    if forward_mask.dim() != 2:
        raise ValueError(
            f"forward_mask must be 2-D (rows=outputs, columns=reduction), got {tuple(forward_mask.shape)}."
        )
    check_nm_pattern(n, m)
    rows, cols = forward_mask.shape
    if rows % m:
        raise ValueError(
            f"The backward mask is N:M along rows and needs O % M == 0, got O={rows}, M={m}; "
            "keep such a layer uni-directional."
        )
    return rows, cols


def _check_permutation(permutation: torch.Tensor, rows: int, name: str = "permutation") -> None:
    """Raise ``ValueError`` unless ``permutation`` holds each of ``0 .. rows-1`` exactly once (O(rows))."""
    if permutation.shape != (rows,):
        raise ValueError(f"{name} must have shape ({rows},), got {tuple(permutation.shape)}.")
    if permutation.is_floating_point() or permutation.is_complex() or permutation.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer row indices, got dtype {permutation.dtype}.")
    if rows == 0:
        return
    low, high = int(permutation.min()), int(permutation.max())
    if low < 0 or high >= rows:
        raise ValueError(f"{name} must be a permutation of 0..{rows - 1}, got entries from {low} to {high}.")
    counts = torch.bincount(permutation.long(), minlength=rows)
    if bool((counts != 1).any()):
        twice = int((counts > 1).nonzero()[0])
        raise ValueError(
            f"{name} must be a permutation of 0..{rows - 1} (each row once), but row {twice} appears "
            f"{int(counts[twice])} times and {int((counts == 0).sum())} row(s) are missing."
        )


def retention_share(retained: float, kept: float) -> float:
    """The one retention ratio of the library, ``retained / kept`` = ``|Mb & Mf| / |Mf|``.

    An empty forward mask (``kept == 0``) has retention 1.0: no forward weight loses its gradient, so
    the backward mask drops nothing (the same reading as a dense layer's 1.0). :func:`permutation_retention`,
    :func:`bimask_hf.masks.retention` and :func:`bimask_hf.inspection.layer_retention` all return this.

    Args:
        retained (`float`): ``|Mb & Mf|``, the forward-mask entries the backward mask keeps.
        kept (`float`): ``|Mf|``, the forward-mask entries.

    Returns:
        `float`: The retention, 1.0 when ``kept == 0``.
    """
    return 1.0 if kept == 0 else float(retained) / float(kept)


def _group_counts(mask: torch.Tensor, permutation: torch.Tensor, m: int) -> torch.Tensor:
    """``C[g, c]``: ones of ``mask`` among rows ``permutation[g*m:(g+1)*m]`` in column ``c`` (float)."""
    rows, cols = mask.shape
    return mask[permutation].reshape(rows // m, m, cols).sum(dim=1, dtype=torch.float32)


def permutation_retention(forward_mask: torch.Tensor, permutation: torch.Tensor, n: int, m: int) -> float:
    """Closed-form retention ``|Mb| / |Mf|`` of ``permutation`` (``sum min(C, N) / |Mf|``).

    Args:
        forward_mask (`torch.Tensor`): Boolean ``(O, K)`` forward mask ``Mf``.
        permutation (`torch.Tensor`): ``(O,)`` row order; rows ``permutation[g*m:(g+1)*m]`` form group ``g``.
        n (`int`): Entries the backward mask keeps per group (the N of N:M).
        m (`int`): Rows per group (the M of N:M); ``O % m`` must be 0.

    Returns:
        `float`: The share of ``Mf`` entries the backward mask keeps (1.0 for an empty mask, see
        :func:`retention_share`).

    Raises:
        ValueError: If ``forward_mask`` is not 2-D, the pattern is invalid, ``O % m != 0``, or
            ``permutation`` is not a permutation of the rows.
    """
    rows, _ = _check_inputs(forward_mask, n, m)
    _check_permutation(permutation, rows)
    mask = forward_mask.bool()
    total = int(torch.count_nonzero(mask))  # (a bool sum would copy the mask as int64 first)
    if total == 0:
        return retention_share(0, 0)
    counts = _group_counts(mask, permutation.to(mask.device, torch.long), m)
    return retention_share(float(counts.clamp_(max=n).sum()), total)


def _random_permutations(
    count: int, rows: int, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    """``count`` independent uniform random permutations of ``arange(rows)`` as a ``(count, rows)`` tensor."""
    keys = torch.rand(count, rows, generator=generator, device=generator.device if generator else device)
    return keys.argsort(dim=1).to(device)


def _random_search(
    mask: torch.Tensor,
    start: torch.Tensor,
    n: int,
    m: int,
    num_candidates: int,
    generator: torch.Generator | None,
    fresh: bool = False,
) -> torch.Tensor:
    """Best of ``start`` and ``num_candidates - 1`` random permutations, or with ``fresh`` of
    ``num_candidates`` random ones without ``start`` (ties: the earlier candidate)."""
    rows, cols = mask.shape
    if num_candidates <= 1 and not fresh:
        return start
    mask_u8 = mask.to(torch.uint8)
    # per candidate: gathered uint8 rows (O*K) + per-group counts; keep a chunk under _CHUNK_BYTES
    chunk = max(1, _CHUNK_BYTES // (2 * rows * cols))
    best_perm = start
    best_loss = math.inf if fresh else float(_group_counts(mask, start, m).sub_(n).clamp_(min=0).sum())
    remaining = num_candidates if fresh else num_candidates - 1
    while remaining > 0:
        b = min(chunk, remaining)
        remaining -= b
        perms = _random_permutations(b, rows, mask.device, generator)
        counts = mask_u8[perms].reshape(b, rows // m, m, cols).sum(dim=2, dtype=torch.uint8)
        # sum_c min(C, n) = |Mf| - sum_c max(C - n, 0): minimise the overflow
        loss = (counts.to(torch.int16) - n).clamp_(min=0).sum(dim=(1, 2), dtype=torch.int32)
        value, index = loss.min(dim=0)
        if float(value) < best_loss:
            best_loss = float(value)
            best_perm = perms[index]
    return best_perm


def _swap_gains(
    rows_g: torch.Tensor, rows_h: torch.Tensor, counts_g: torch.Tensor, counts_h: torch.Tensor, n: int
) -> torch.Tensor:
    """Gain in ``sum min(C, n)`` of swapping row ``a`` of group ``g`` with row ``b`` of group ``h``.

    With ``lt = [C < n]``, ``le = [C <= n]`` and ``eq = le - lt`` per group and column, moving ``r_b``
    in and ``r_a`` out of ``g`` changes its kept count by ``r_b.lt_g - r_a.le_g + (r_a*r_b).eq_g``, so
    the total gain is ``r_a.(lt_h - le_g) + r_b.(lt_g - le_h) + r_a.(eq_g + eq_h).r_b``: two
    matrix-vector products and one bilinear form, for all ``M*M`` swaps of all pairs at once.

    Args:
        rows_g: ``(P, M, K)`` 0/1 float rows of the first group of each pair.
        rows_h: ``(P, M, K)`` 0/1 float rows of the second group of each pair.
        counts_g: ``(P, K)`` column counts of the first groups.
        counts_h: ``(P, K)`` column counts of the second groups.
        n: The N of the backward mask.

    Returns:
        ``(P, M, M)`` gains (exact integers stored as floats).
    """
    lt_g, lt_h = (counts_g < n).float(), (counts_h < n).float()
    le_g, le_h = (counts_g <= n).float(), (counts_h <= n).float()
    eq = (le_g - lt_g) + (le_h - lt_h)
    out_g = torch.bmm(rows_g, (lt_h - le_g).unsqueeze(-1))  # (P, M, 1): row a leaves g for h
    out_h = torch.bmm(rows_h, (lt_g - le_h).unsqueeze(-1))  # (P, M, 1): row b leaves h for g
    both = torch.bmm(rows_g * eq.unsqueeze(1), rows_h.transpose(1, 2))  # (P, M, M)
    return both + out_g + out_h.transpose(1, 2)


def _pair_at_random(
    groups: int, device: torch.device, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    order = _random_permutations(1, groups, device, generator)[0]
    half = groups // 2
    return order[:half], order[half : 2 * half]


#: Largest integer magnitude float32 matmuls of small integers keep exact (see :func:`_exact_operands`).
_FLOAT32_EXACT = 2**24

#: Operand sizes of the one-time int8-versus-float matmul timing (:func:`_int8_matmul_faster`).
_PROBE_SHAPE = (64, 1024, 64)

#: ``"int8"`` or ``"float"`` while :func:`matmul_path` forces one; None: the measured choice.
_forced_path: str | None = None


def _int8_matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return torch._int_mm(a.to(torch.int8), b.to(torch.int8), out=out)


def _float32_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.mm(a.float(), b.float())


@functools.lru_cache(maxsize=1)
def _int8_matmul_faster() -> bool:
    """Whether ``torch._int_mm`` beats a float32 matmul on this CPU, timed once per process.

    Only CPUs with int8 dot-product instructions (VNNI, AMX) run ``_int_mm`` fast; elsewhere (AVX2
    without VNNI) it runs tens of times slower than the float matmul of the same 0/1 operands, and
    ``torch.backends.cpu.get_cpu_capability()`` does not say which (its "AVX512" covers CPUs with and
    without VNNI). Both are timed side by side, best of three, on one small product, on one thread.
    """
    if not hasattr(torch, "_int_mm"):
        return False
    rows, inner, cols = _PROBE_SHAPE
    a = (torch.arange(rows * inner).reshape(rows, inner) % 3 == 0).to(torch.int8)
    b = (torch.arange(inner * cols).reshape(inner, cols) % 5 == 0).to(torch.int8)
    best = {"int8": math.inf, "float": math.inf}
    # One thread: the instructions decide, not the thread pool (on a busy machine an OpenMP region of two
    # threads can wait milliseconds for the second core, which would make either look slow).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for warm_up in (True, False, False, False):  # interleaved, so load from elsewhere hits both alike
            for name, fn in (("int8", _int8_matmul), ("float", _float32_matmul)):
                start = time.perf_counter()
                fn(a, b)
                if not warm_up:
                    best[name] = min(best[name], time.perf_counter() - start)
    except (RuntimeError, NotImplementedError):  # builds without an int8 CPU GEMM
        return False
    finally:
        torch.set_num_threads(threads)
    return best["int8"] < best["float"]


def _matmul_path(a: torch.Tensor) -> str:
    """The matmul that scores swaps of ``a``'s device: the forced one, else the faster one."""
    if _forced_path is not None:
        return _forced_path
    return "int8" if a.device.type == "cpu" and _int8_matmul_faster() else "float"


def _exact_operands(a: torch.Tensor, bound: int) -> torch.Tensor:
    """``a`` (small non-negative integers, int8 or bool) as an operand of :func:`_mm_exact`.

    It stays int8 where the int8 GEMM is the faster one (a CPU with VNNI or AMX,
    :func:`_int8_matmul_faster`; :func:`matmul_path` forces one), and becomes a float elsewhere and on GPUs:
    float32 while ``bound``, the largest magnitude a product, a sum of products or any later sum of them
    reaches, is at most ``2**24``, float64 past it (exact to ``2**53``). Below the bound every such value is an
    integer the float holds, so no step rounds, in whatever order and blocking the BLAS adds the products
    (fused multiply-adds included): both paths give the same integers. The operands the search passes are 0,
    1 and powers of two, which bfloat16 and TF32 (``torch.set_float32_matmul_precision``) also hold exactly,
    and both accumulate in float32.
    """
    if _matmul_path(a) == "int8":
        return a.to(torch.int8)
    return a.to(torch.float32 if bound <= _FLOAT32_EXACT else torch.float64)


def _mm_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (2-D, or 3-D batched) of :func:`_exact_operands`: int32 for int8 operands, else their float dtype."""
    if a.dtype != torch.int8:
        return torch.matmul(a, b)
    if a.dim() == 2:
        return _int8_matmul(a, b)
    out = torch.empty(a.shape[0], a.shape[1], b.shape[-1], dtype=torch.int32, device=a.device)
    for i in range(a.shape[0]):  # int8 GEMMs are 2-D only
        _int8_matmul(a[i], b[i], out[i])
    return out


def _gram01(a: torch.Tensor) -> torch.Tensor:
    """``a @ a.T`` of a 2-D 0/1 matrix with entries exact (int32 on the int8 path, float on the float path).

    The float path converts ``a`` once and, the product being symmetric, computes three of its four
    quadrants (the fourth is the transpose of one of them).
    """
    converted = _exact_operands(a, a.shape[-1])
    if converted.dtype == torch.int8:
        return _int8_matmul(converted, converted.T)
    rows, half = a.shape[0], a.shape[0] // 2
    top, bottom = converted[:half], converted[half:]
    out = torch.empty(rows, rows, dtype=converted.dtype, device=a.device)
    torch.mm(top, top.T, out=out[:half, :half])
    torch.mm(bottom, bottom.T, out=out[half:, half:])
    torch.mm(bottom, top.T, out=out[half:, :half])
    out[:half, half:] = out[half:, :half].T
    return out


@contextlib.contextmanager
def matmul_path(path: str) -> Iterator[None]:
    """Make every search inside the block score swaps with one named matmul.

    Inside, the searches use the ``"int8"`` (``torch._int_mm``) or the ``"float"`` matmul instead of the
    one measured faster on this machine (for tests and side-by-side timing; the permutations are the same
    either way).

    Args:
        path (`str`): ``"int8"`` or ``"float"``.

    Yields:
        `None`: Control, with the path forced until the block exits.

    Raises:
        ValueError: For another name.
    """
    global _forced_path
    if path not in ("int8", "float"):
        raise ValueError(f"matmul path must be 'int8' or 'float', got {path!r}.")
    saved, _forced_path = _forced_path, path
    try:
        yield
    finally:
        _forced_path = saved


def _block_layout(groups: int, block_groups: int, round_index: int, device: torch.device) -> torch.Tensor:
    """Candidate blocks of round ``round_index``: ``(B, g)`` group indices, ``-1`` pads the last blocks.

    Round 0 takes consecutive groups; later rounds take every ``s``-th group (``s`` coprime to the
    number of groups and different each round), so groups meet new partners from round to round.
    The schedule is fixed: no randomness.
    """
    blocks = -(-groups // block_groups)
    size = -(-groups // blocks)
    order = torch.arange(groups, device=device)
    if blocks > 1 and round_index > 0:
        stride = 1 + int(groups * ((round_index * _GOLDEN) % 1.0))
        while math.gcd(stride, groups) != 1:
            stride += 1
        order = (order * stride + round_index) % groups
    pad = torch.full((blocks * size - groups,), -1, dtype=torch.long, device=device)
    return torch.cat([order, pad]).reshape(blocks, size)


def _swap_score_bound(cols: int, m: int) -> int:
    """Largest magnitude of the encoded swap scores of :func:`_block_swap_gains` on ``K = cols`` columns, and of
    every value computed on the way to them."""
    return (1 << (m * m - 1).bit_length()) * 2 * (cols + 1)


def _block_scratch_bytes(block_rows: int, cols: int, m: int) -> int:
    """Upper bound on the scratch bytes of scoring one candidate block in :func:`_block_swap_gains` and
    matching it: the gathered int8 rows and the group counts (``2 * rows * K``); the rows, their
    ``eq``-weighted copy, the groups' ``lt`` and ``eq`` (``3 * rows * K`` elements at most) and three
    ``(rows, rows)`` score tensors in the float path's dtype (float32, or float64 where the scores could pass
    ``2**24``); the ``(g, g)`` gains, indices and matching scores (six int64/float64 copies). The int8 path
    needs less, but both use this bound so that both cut the same blocks."""
    item = 4 if _swap_score_bound(cols, m) <= _FLOAT32_EXACT else 8
    groups = block_rows // m
    return 3 * item * block_rows * block_rows + (2 + 3 * item) * block_rows * cols + 48 * groups * groups


def _split_scratch_bytes(groups: int, cols: int, m: int) -> int:
    """Upper bound on the scratch bytes of :func:`_all_split_gains` on ``groups`` groups: the one-hot
    column codes (``G 2^m x K`` bytes), the int32 joint histograms, their float64 copy and the
    float64 split gains."""
    codes = groups * 2**m
    splits = math.comb(2 * m - 1, m - 1)
    return codes * cols * 9 + codes * codes * 4 + groups * groups * 4**m * 16 + groups * groups * splits * 8


def _block_groups(groups: int, cols: int, m: int) -> int:
    """Groups per candidate block: :data:`_BLOCK_ROWS` rows' worth, fewer when one block's scratch would
    exceed :data:`GAIN_CHUNK_BYTES` (never below 2, nor above ``groups``)."""
    size = min(groups, _BLOCK_ROWS // m)
    while size > 2 and _block_scratch_bytes(size * m, cols, m) > GAIN_CHUNK_BYTES:
        size -= 1
    return max(2, size)


def _block_chunk(block_rows: int, cols: int, m: int) -> int:
    """Blocks scored at once so that their scratch stays under :data:`GAIN_CHUNK_BYTES`."""
    return max(1, GAIN_CHUNK_BYTES // _block_scratch_bytes(block_rows, cols, m))


@functools.lru_cache(maxsize=8)
def _tie_break(size: int, m: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(size, size)``: ``m*m - 1 - (i*m + j)`` for rows ``i = a % m`` and ``j = b % m``, so that ties of the
    encoded swap scores of :func:`_block_swap_gains` go to the first swap index (row ``i`` of the first group,
    row ``j`` of the second)."""
    within = torch.arange(size, device=device) % m
    return ((m * m - 1) - (within.view(size, 1) * m + within.view(1, size))).to(dtype)


def _block_swap_gains(rows: torch.Tensor, valid: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best single-row swap between every two groups of each block: ``(B, g, g)`` gains and indices.

    ``rows`` is ``(B, g*m, K)`` 0/1 int8 (block ``b``'s groups in order, ``m`` rows each), ``valid``
    ``(B, g)`` marks real groups (padding: False). With ``lt = [C < n]``, ``le = [C <= n]`` and
    ``eq = le - lt`` per group and column, the gain of swapping row ``a`` (group ``g(a)``) with row
    ``b`` is ``S[a, b] + S[b, a]`` where ``S[a, b] = r_a.lt_{g(b)} - r_a.le_{g(a)} + r_a.(eq_{g(a)} * r_b)``:
    two exact matmuls per block (:func:`_mm_exact`; ``r_a.le_{g(a)} = r_a.lt_{g(a)} + r_a.eq_{g(a)}`` needs
    none). Index ``i*m + j`` means row ``i`` of the first group with row ``j`` of the second; pairs within a
    group and padding score -1.
    """
    blocks, size, cols = rows.shape
    g = size // m
    counts = rows.reshape(blocks, g, m, cols).sum(dim=2, dtype=torch.int8 if m < 128 else torch.int32)
    # every score is computed times 2^bits so that the swap index fits in the low bits: one max over the
    # encoded scores gives the best gain and its first index (torch's max with indices over a short last
    # dimension is several times slower). Every value below lies in [-bound, bound]: S and the lt
    # projections in [0, K], their sums in [-2K, 2K], plus the index.
    bits = (m * m - 1).bit_length()
    scale = 1 << bits
    bound = _swap_score_bound(cols, m)
    ops = _exact_operands(rows, bound)
    # int8 operands hold 0/scale up to 64 (larger m: scale the int32 products instead); floats hold any
    folded = scale <= 64 or ops.dtype != torch.int8
    lt = (counts < n).to(ops.dtype)  # (B, g, K)
    eq = (counts == n).to(ops.dtype)
    if folded:
        lt *= scale
        eq *= scale
    # rows times eq of their own group
    weighted = (ops.view(blocks, g, m, cols) * eq.unsqueeze(2)).view(blocks, size, cols)
    proj = _mm_exact(ops, lt.transpose(1, 2))  # (B, size, g): r_a.lt_h
    s = _mm_exact(weighted, ops.transpose(1, 2))  # (B, size, size): r_a.(eq_{g(a)} * r_b)
    if not folded:
        if bound >= 2**31:  # encoded scores would overflow int32 (huge K at large M)
            s, proj = s.long(), proj.long()
        s *= scale
        proj *= scale
    own_eq = weighted.sum(dim=2, keepdim=True, dtype=proj.dtype)  # r_a.eq_{g(a)}
    if not folded:
        own_eq *= scale
    own = torch.arange(size, device=rows.device) // m
    proj -= proj.gather(2, own.view(1, size, 1).expand(blocks, size, 1)) + own_eq  # - r_a.le_{g(a)}
    s += proj.unsqueeze(3).expand(blocks, size, g, m).reshape(blocks, size, size)  # now S of the docstring
    pair = torch.add(s, s.transpose(1, 2))
    pair += _tie_break(size, m, pair.dtype, rows.device)
    # max over the first group's rows, then over the second's: (B, g, g) encoded best swaps
    encoded = pair.view(blocks, g, m, size).amax(dim=2).view(blocks, g, g, m).amax(dim=3).long()
    best_gain = encoded >> bits  # floor division: exact for negative gains too
    best = (m * m - 1) - (encoded & (scale - 1))
    bad = ~(valid.unsqueeze(2) & valid.unsqueeze(1)) | torch.eye(g, dtype=torch.bool, device=rows.device)
    return best_gain.masked_fill_(bad, -1), best.long()


def _mutual_best_matching(best_gain: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Disjoint group pairs ``(g, h)`` with positive gain in every block, by repeated mutual-best selection.

    ``best_gain`` is ``(B, g, g)``; returns block, first and second group indices. Every iteration each
    free group points at its best free partner in its block; pairs that point at each other are matched
    (the globally best remaining pair always is), so this approximates greedy matching.
    """
    blocks, groups, _ = best_gain.shape
    device = best_gain.device
    idx = torch.arange(groups, device=device)
    # break ties towards lower indices deterministically
    score = best_gain.double() - idx.double().view(1, 1, -1) * 1e-9 - idx.double().view(1, -1, 1) * 1e-9
    found = []
    for _ in range(iterations):
        value, best = score.max(dim=2)
        # a matched group's row and column score -1, so it never points nor is pointed at (value > 0.5)
        mutual = (best.gather(1, best) == idx) & (idx < best) & (value > 0.5)
        if not bool(mutual.any()):
            break
        block, a = mutual.nonzero(as_tuple=True)
        b = best[block, a]
        found.append((block, a, b))
        for taken in (a, b):
            score[block, taken, :] = -1.0
            score[block, :, taken] = -1.0
    if not found:
        empty = idx[:0]
        return empty, empty, empty
    return tuple(torch.cat(parts) for parts in zip(*found))  # type: ignore[return-value]


def _swap_search(
    mask: torch.Tensor,
    start: torch.Tensor,
    n: int,
    m: int,
    rounds: int,
    generator: torch.Generator | None,
    patience: int = DEFAULT_PATIENCE,
) -> torch.Tensor:
    """Random-pairing swap search: ``rounds`` rounds of best-swap-per-random-pair of groups."""
    rows, cols = mask.shape
    groups = rows // m
    perm = start.clone()
    if groups < 2 or n >= m:
        return perm
    grouped = mask[perm].float().reshape(groups, m, cols)
    counts = grouped.sum(dim=1)
    idle = 0
    device = mask.device
    for _ in range(rounds):
        g, h = _pair_at_random(groups, device, generator)
        gains = _swap_gains(grouped[g], grouped[h], counts[g], counts[h], n)
        best_gain, best = gains.reshape(g.numel(), m * m).max(dim=1)
        take = best_gain > 0.5
        if not bool(take.any()):
            idle += 1
            if idle >= patience:
                break
            continue
        idle = 0
        g, h, best = g[take], h[take], best[take]
        i, j = best // m, best % m
        row_a = grouped[g, i]
        row_b = grouped[h, j]
        grouped[g, i] = row_b
        grouped[h, j] = row_a
        counts[g] += row_b - row_a
        counts[h] += row_a - row_b
        _swap_entries(perm, g * m + i, h * m + j)
    return perm


def _swap_entries(values: torch.Tensor, pos_a: torch.Tensor, pos_b: torch.Tensor) -> None:
    """Swap ``values[pos_a]`` and ``values[pos_b]`` in place (positions pairwise disjoint)."""
    moved = values[pos_a].clone()
    values[pos_a] = values[pos_b]
    values[pos_b] = moved


@functools.lru_cache(maxsize=16)
def _bipartitions(m: int) -> torch.Tensor:
    """All ways to split ``2m`` rows into two groups of ``m``: ``(S, 2m)`` 0/1 rows, row 0 = no change."""
    chosen = [c for c in itertools.combinations(range(2 * m), m) if 0 in c]
    return torch.tensor([[1.0 if r in c else 0.0 for r in range(2 * m)] for c in chosen])


@functools.lru_cache(maxsize=16)
def _split_gain_table(n: int, m: int) -> torch.Tensor:
    """``(4**m, S)``: kept-count gain of split ``s`` for one column whose pair pattern is ``(u, v)``.

    ``u`` / ``v`` are the column's ``m``-bit patterns in the first / second group (row ``r`` = bit ``r``);
    the entry is ``min(in, n) + min(out, n)`` under split ``s`` minus the same under no change.
    """
    split = _bipartitions(m).tolist()
    table = []
    for u in range(2**m):
        for v in range(2**m):
            bits = [(u >> r) & 1 for r in range(m)] + [(v >> r) & 1 for r in range(m)]
            total = sum(bits)
            kept = []
            for sel in split:
                inside = sum(b for b, k in zip(bits, sel) if k)
                kept.append(min(inside, n) + min(total - inside, n))
            table.append([k - kept[0] for k in kept])
    return torch.tensor(table, dtype=torch.float32)


def _all_split_gains(rows01: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best re-split of every group pair: ``(G, G)`` gains and split indices.

    Each group's columns are coded as ``m``-bit patterns; one integer matmul of the one-hot codes gives,
    for every pair, the joint histogram of column patterns, and a matmul with the per-pattern gain
    table scores every split of every pair.
    """
    rows, cols = rows01.shape
    groups = rows // m
    codes = (
        rows01.reshape(groups, m, cols).long() << torch.arange(m, device=rows01.device).view(1, m, 1)
    ).sum(1)
    onehot = codes.unsqueeze(1) == torch.arange(2**m, device=rows01.device).view(1, -1, 1)  # (G, 2^m, K)
    onehot = onehot.reshape(groups * 2**m, cols)
    joint = _gram01(onehot).reshape(groups, 2**m, groups, 2**m).permute(0, 2, 1, 3)
    # float64: histogram counts must stay exact even where float32 matmuls run as TF32
    gains = joint.reshape(groups * groups, 4**m).double() @ _split_gain_table(n, m).to(rows01.device).double()
    value, index = gains.max(dim=1)
    return value.reshape(groups, groups), index.reshape(groups, groups)


def _apply_repartitions(
    values: torch.Tensor, g: torch.Tensor, h: torch.Tensor, subset: torch.Tensor, m: int
) -> None:
    """Re-split groups ``g[i]``, ``h[i]`` of ``values`` (rows in group order) by ``subset[i]`` in place."""
    offsets = torch.arange(m, device=values.device)
    pos = torch.cat([g.unsqueeze(1) * m + offsets, h.unsqueeze(1) * m + offsets], dim=1)  # (P, 2m)
    members = values[pos]  # (P, 2m, ...)
    inside = subset.bool()
    tail = members.shape[2:]
    values[pos[:, :m]] = members[inside].reshape(-1, m, *tail)
    values[pos[:, m:]] = members[~inside].reshape(-1, m, *tail)


def _matched_search(
    mask: torch.Tensor,
    start: torch.Tensor,
    n: int,
    m: int,
    rounds: int,
    tolerance: float | None = None,
    matching_iterations: int = 8,
    chunk_blocks: int | None = None,
) -> torch.Tensor:
    """Blocked all-pairs search (see the module docstring).

    Every round splits the groups into candidate blocks (:func:`_block_layout`); in each block it
    scores every row swap, matches groups and applies the best swap of every matched pair. When one
    block holds all groups and no swap helps, it tries every re-split of every group pair
    (``3 <= m <= _MAX_SPLIT_M``, within ``_SPLIT_BUDGET`` and :data:`GAIN_CHUNK_BYTES`) and then goes
    back to swaps. ``chunk_blocks`` blocks are scored at once (default :func:`_block_chunk`); it
    changes the scratch memory, never the result.
    """
    rows, cols = mask.shape
    groups = rows // m
    perm = start.clone()
    if groups < 2 or n >= m:
        return perm
    device = mask.device
    rows01 = mask[perm].to(torch.int8)
    use_splits = 3 <= m <= _MAX_SPLIT_M
    block_groups = _block_groups(groups, cols, m)
    if tolerance is None:
        tolerance = DEFAULT_TOLERANCE if block_groups >= groups else BLOCKED_TOLERANCE
    min_gain = max(0.5, tolerance * float(torch.count_nonzero(mask)))  # (a bool sum copies it as int64)
    chunk = chunk_blocks or _block_chunk(block_groups * m, cols, m)
    offsets = torch.arange(m, device=device)
    for round_index in range(rounds):
        layout = _block_layout(groups, block_groups, round_index, device)  # (B, g) group indices
        blocks, size = layout.shape
        valid = layout >= 0
        row_index = (layout.clamp(min=0).unsqueeze(2) * m + offsets).reshape(blocks, size * m)
        swap_a, swap_b, split_groups, split_subsets = [], [], [], []
        round_gain = 0.0
        for lo in range(0, blocks, chunk):
            index, ok = row_index[lo : lo + chunk], valid[lo : lo + chunk]
            block_rows = rows01.index_select(0, index.reshape(-1)).view(*index.shape, cols)
            if not bool(ok.all()):
                block_rows *= ok.repeat_interleave(m, dim=1).unsqueeze(2)
            best_gain, best = _block_swap_gains(block_rows, ok, n, m)
            block, g, h = _mutual_best_matching(best_gain, matching_iterations)
            if block.numel():
                round_gain += float(best_gain[block, g, h].sum())
                pick = best[block, g, h]
                swap_a.append(index[block, g * m + pick // m])
                swap_b.append(index[block, h * m + pick % m])
            if block.numel() or not use_splits or blocks > 1:
                continue
            # one block holds every group and no swap helps: try every re-split of every group pair
            if (groups * 2**m) ** 2 * cols > _SPLIT_BUDGET or _split_scratch_bytes(groups, cols, m) > GAIN_CHUNK_BYTES:
                continue
            split_gain, subset = _all_split_gains(rows01, n, m)
            split_gain.fill_diagonal_(-1.0)
            _, first, second = _mutual_best_matching(split_gain.unsqueeze(0), matching_iterations)
            if first.numel():
                split_groups.append(torch.stack([first, second]))
                split_subsets.append(subset[first, second])
        if swap_a:
            pos_a, pos_b = torch.cat(swap_a), torch.cat(swap_b)
            _swap_entries(rows01, pos_a, pos_b)
            _swap_entries(perm, pos_a, pos_b)
        if split_groups:
            first, second = torch.cat(split_groups, dim=1)
            chosen = _bipartitions(m).to(device)[torch.cat(split_subsets)]
            _apply_repartitions(rows01, first, second, chosen, m)
            _apply_repartitions(perm, first, second, chosen, m)
            continue
        if not swap_a or round_gain < min_gain:
            break
    return perm


def search_permutation(
    forward_mask: torch.Tensor,
    n: int,
    m: int,
    method: str = "random",
    num_candidates: int = 100,
    generator: torch.Generator | None = None,
    *,
    init: torch.Tensor | None = None,
    max_rounds: int | None = None,
) -> torch.Tensor:
    """Find a row permutation maximising the backward-mask retention of ``forward_mask``.

    Args:
        forward_mask (`torch.Tensor`): Boolean ``(O, K)`` forward mask ``Mf``; ``O % m`` must be 0.
        n (`int`): Entries the backward mask keeps per group (the N of N:M).
        m (`int`): Rows per group (the M of N:M).
        method (`str`, *optional*, defaults to `"random"`): One of :data:`METHODS`.
        num_candidates (`int`, *optional*, defaults to 100): Random permutations tried by ``"random"``
            (candidate 0 is ``init``) and ``"random_fresh"`` (all fresh).
        generator (`torch.Generator`, *optional*): Source of randomness; same generator state, same result.
        init (`torch.Tensor`, *optional*): Starting permutation (default: identity); no method but
            ``"random_fresh"`` returns a worse one.
        max_rounds (`int`, *optional*): Rounds of the local searches (default :data:`DEFAULT_MAX_ROUNDS`).

    Returns:
        `torch.Tensor`: ``(O,)`` LongTensor permutation on ``forward_mask``'s device.

    Raises:
        ValueError: If ``method`` is unknown, the inputs are invalid, ``num_candidates < 1`` or
            ``max_rounds < 0``.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown permutation search method {method!r}; choose one of {', '.join(METHODS)}.")
    rows, _ = _check_inputs(forward_mask, n, m)
    mask = forward_mask.bool()
    device = mask.device
    if init is None:
        start = torch.arange(rows, device=device)
    else:
        _check_permutation(init, rows, "init")
        start = init.to(device, torch.long)
    if method == "identity":  # no search: keep the starting permutation
        return start.clone()
    if method in ("random", "random_fresh"):
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}.")
        return _random_search(mask, start, n, m, num_candidates, generator, fresh=method == "random_fresh").clone()
    rounds = DEFAULT_MAX_ROUNDS[method] if max_rounds is None else max_rounds
    if rounds < 0:
        raise ValueError(f"max_rounds must be >= 0, got {rounds}.")
    if method == "swap":
        return _swap_search(mask, start, n, m, rounds, generator)
    return _matched_search(mask, start, n, m, rounds)
