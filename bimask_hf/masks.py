"""N:M masks as pure, vectorised functions on 2-D weights.

Rows are outputs ``O``, columns the reduction ``K`` (a conv weight is first viewed as a matrix with
:func:`weight_to_matrix`). No function here loops in Python over rows, groups or candidates; all of
them run on CPU and CUDA and are deterministic. Equal scores are ranked by ``tie_break``: ``"low"``
(default: the lower index wins) or ``"high"`` (the higher index wins and, in ``Mb``, pruned entries
score 0 like kept exact zeros: the paper's released code, ``docs/method.md`` section 2).
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn.functional as F

from . import kernels
from .config import TIE_BREAKS, check_nm_pattern
from .search import _check_permutation, permutation_retention, retention_share, search_permutation

__all__ = [
    "check_nm_pattern",
    "nm_mask",
    "backward_mask",
    "retention",
    "search_permutation",
    "permutation_retention",
    "transposable_mask",
    "unstructured_mask",
    "weight_to_matrix",
    "matrix_to_weight",
    "keep_top_n",
    "TIE_BREAKS",
]

#: Orders of equal scores: ``"low"`` keeps the lower index (default), ``"high"`` the higher one (the paper's).


def ties_high(tie_break: str) -> bool:
    """True for ``tie_break="high"``.

    Args:
        tie_break (`str`): One of :data:`TIE_BREAKS`.

    Returns:
        `bool`: Whether equal scores go to the higher index.

    Raises:
        ValueError: If ``tie_break`` is not in :data:`TIE_BREAKS`.
    """
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break must be one of {TIE_BREAKS}, got {tie_break!r}.")
    return tie_break == "high"


def _check_matrix(weight: torch.Tensor, name: str = "weight") -> None:
    if weight.dim() != 2:
        raise ValueError(
            f"{name} must be a 2-D (rows=outputs, columns=reduction) tensor, got shape {tuple(weight.shape)}; "
            "view conv weights with weight_to_matrix() first."
        )


def _check_finite(weight: torch.Tensor, name: str = "weight") -> None:
    """Raise ``ValueError`` if ``weight`` holds NaN or infinity: magnitudes of those rank nothing."""
    if weight.is_floating_point() and not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(
            f"{name} has {bad} non-finite entr{'y' if bad == 1 else 'ies'} (NaN or inf) of {weight.numel()}; "
            "N:M masks rank |weight| and need finite values (a diverged run? check the learning rate)."
        )


def _count_dtype(scores: torch.Tensor) -> torch.dtype:
    """The float dtype rank counts and 0/1 keeps are computed in: the scores' own, float32 for integers."""
    return scores.dtype if scores.is_floating_point() else torch.float32


def _rank_keep(front: torch.Tensor, n: int, high: bool = False) -> torch.Tensor:
    """Keep the ``n`` largest along dim 0 of a contiguous ``(M, ...)`` tensor (ties: lower index wins, or
    the higher one if ``high``), as 0/1 values of ``front``'s float dtype (float32 for integer scores).

    Each pair of positions ``j < i`` is compared once over whole contiguous slices (``M*(M-1)/2``
    comparisons): entry ``i`` is beaten when ``s_j >= s_i`` (``s_j > s_i`` if ``high``) and entry ``j``
    when not. Comparisons write
    floats and the counts are floats: ATen's CPU kernels run float-to-float ops vectorised, but read and
    write bool tensors element by element (measured in ``docs/benchmarks.md``, section 2b, round 3). Faster
    than ``topk`` over a tiny last dimension, and device-independent.
    """
    size = front.shape[0]
    dtype = _count_dtype(front)
    rank = torch.empty(front.shape, dtype=dtype, device=front.device)
    beats = torch.empty(front.shape[1:], dtype=dtype, device=front.device)
    # Views of the M slices, taken once: on small layers the cost is the number of ops, and indexing
    # ``rank[i] += ...`` would add a select, a select and a copy per update.
    fronts, ranks = front.unbind(0), rank.unbind(0)
    compare = torch.gt if high else torch.ge
    for j in range(size):
        ranks[j].fill_(size - 1 - j)  # entry j starts beaten by all later entries ...
    for j in range(size):  # a loop over the pairs of positions of a group, not over groups
        for i in range(j + 1, size):
            compare(fronts[j], fronts[i], out=beats)  # ... and each comparison moves one defeat to the loser
            ranks[i].add_(beats)  # j beats the later i on ties unless ``high``
            ranks[j].sub_(beats)
    return torch.lt(rank, n, out=rank)


def _rank_keep_fused(scores: torch.Tensor, n: int, dim: int, high: bool = False) -> torch.Tensor:
    """:func:`_rank_keep` along ``dim`` for compiled graphs, as 0/1 values (``scores``' float dtype).

    Entry ``i`` of a group is beaten by entry ``j`` when ``s_j > s_i``, or ``s_j == s_i`` and ``j < i``
    (``j > i`` if ``high``), and kept when fewer than ``n`` entries beat it; the ``M`` slices along ``dim`` are compared pairwise
    as pure functions (no in-place slice updates), so inductor emits one loop over the groups fused with
    the consumer of the mask (``W * Mf``, ``W * Mb``, the decay term). Counts and the result are floats
    and no bool tensor is left for AOT autograd's partitioner to save between forward and backward:
    inductor's CPU kernels load, store and convert 1-byte masks much slower than floats
    (``docs/benchmarks.md``, section 2b, round 2).
    """
    dtype = _count_dtype(scores)
    cols = scores.unbind(dim)
    keeps = []
    for i, s_i in enumerate(cols):
        beaten = [(s_j >= s_i) if (j < i) != high else (s_j > s_i) for j, s_j in enumerate(cols) if j != i]
        rank = beaten[0].to(dtype)
        for b in beaten[1:]:
            rank = rank + b.to(dtype)
        keeps.append((n - rank).clamp_(0, 1))  # 1 where rank < n, with no bool for the partitioner to save
    return torch.stack(keeps, dim)


def _rank_keep_adjacent(scores: torch.Tensor, n: int, m: int, high: bool = False) -> torch.Tensor:
    """:func:`_rank_keep_fused` for groups of ``m`` adjacent entries along the last dim of a 2-D
    ``scores`` (Linear and 1x1-conv weights), as 0/1 values of ``scores``' float dtype.

    Written per entry rather than per group member: for each offset ``s`` the partner of entry ``k``
    (group position ``p = k % m``) is ``k + s`` when ``p + s < m`` (a later entry: it wins only when
    larger, or also ties if ``high``) and ``k + s - m`` otherwise (an earlier one: it also wins ties,
    unless ``high``). Both partners are shifted
    copies of ``scores``, so inductor's CPU kernels read every operand contiguously and vectorise the
    whole mask along the row; read as group members (stride ``m``) they ran scalar (``docs/benchmarks.md``,
    section 2b, round 4).
    """
    dtype = _count_dtype(scores)
    width = scores.shape[-1]
    pos = torch.arange(width, device=scores.device) % m
    rank = torch.zeros((), dtype=dtype, device=scores.device)
    wins, wins_ties = (torch.ge, torch.gt) if high else (torch.gt, torch.ge)
    for s in range(1, m):
        later = F.pad(scores[..., s:], (0, s))  # scores[k + s]
        earlier = F.pad(scores[..., : width - (m - s)], (m - s, 0))  # scores[k + s - m]
        rank = rank + torch.where(pos + s < m, wins(later, scores).to(dtype), wins_ties(earlier, scores).to(dtype))
    return (n - rank).clamp_(0, 1)


def keep_top_n(scores: torch.Tensor, n: int, dim: int = -1, *, tie_break: str = "low") -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest entries of ``scores`` along ``dim``.

    Args:
        scores (`torch.Tensor`): The scores to rank (any shape).
        n (`int`): How many entries to keep along ``dim``; all of them when ``n`` is at least its size.
        dim (`int`, *optional*, defaults to -1): The dimension to rank along.
        tie_break (`str`, *optional*, defaults to `"low"`): Order of equal scores: ``"low"`` keeps the lower
            index, ``"high"`` the higher one.

    Returns:
        `torch.Tensor`: A bool tensor of ``scores``' shape, ``True`` on the kept entries.

    Raises:
        ValueError: If ``tie_break`` is not in :data:`TIE_BREAKS`.
    """
    high = ties_high(tie_break)
    size = scores.shape[dim]
    if n >= size:
        return torch.ones_like(scores, dtype=torch.bool)
    if size <= 16 and torch.compiler.is_compiling():
        return _rank_keep_fused(scores, n, dim, high) != 0
    if size > 16:
        # A stable descending sort ranks ties by index; the higher index first on the reversed scores.
        s = scores.movedim(dim, -1)
        s = s.flip(-1) if high else s
        idx = s.sort(dim=-1, descending=True, stable=True).indices[..., :n]
        keep = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)
        return (keep.flip(-1) if high else keep).movedim(-1, dim)
    return _rank_keep(scores.movedim(dim, 0).contiguous(), n, high).movedim(0, dim) != 0


def step_mask_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype masks are carried in by the training step (0/1 values; the public mask functions return
    ``bool``):

    * eager on CPU: ``uint8``. ATen's CPU kernels read bool tensors element by element, uint8 ones
      vectorised (``docs/benchmarks.md``, section 2b, round 3). Same size as bool, so saving ``Mf`` for
      the backward pass costs nothing more.
    * in a ``torch.compile`` graph on CPU: the weight's float dtype, which inductor's CPU kernels load and
      store many times faster than 1-byte masks (see :func:`_rank_keep_fused`). Saved for the backward
      pass they take 4 bytes per weight instead of 1 (``docs/benchmarks.md``, section 2b, round 2).
    * on GPUs: ``bool`` (CUDA and Triton kernels handle bool masks well).
    """
    if weight.device.type != "cpu" or not weight.is_floating_point():
        return torch.bool
    return weight.dtype if torch.compiler.is_compiling() else torch.uint8


def _as_dtype(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bool:
        return keep if keep.dtype == torch.bool else keep != 0
    return keep.to(dtype)


def _grouped(weight: torch.Tensor, m: int, group_layout: str) -> torch.Tensor | None:
    """``weight`` viewed as ``(A, B, m, D)`` with the N:M groups along dim 2 (a view, no copy), or None
    when the groups do not line up with the weight's own layout.

    Linear (and ``flat`` conv) groups are ``m`` adjacent entries of a row (``D = 1``); ``channels_last``
    conv groups are ``m`` input channels at one kernel position, ``kh*kw`` entries apart. A ``flat`` conv
    whose rows do not split into groups (``K % M != 0``, a sparse stem such as the paper's ``K = 27``) is
    grouped over its flattened weight, groups running across rows, as the paper's N:M conv does.
    """
    if weight.dim() == 4 and group_layout == "channels_last" and weight.shape[1] % m == 0:
        out_ch, in_ch, kh, kw = weight.shape
        return weight.reshape(out_ch, in_ch // m, m, kh * kw)
    if weight.dim() == 2 or (weight.dim() == 4 and group_layout == "flat"):
        rows = weight.shape[0]
        cols = weight.numel() // rows
        if cols % m and weight.dim() == 4 and weight.numel() % m == 0:
            return weight.reshape(1, weight.numel() // m, m, 1)
        if cols % m:
            raise ValueError(f"N:M along columns needs K % M == 0, got K={cols}, M={m}.")
        return weight.reshape(rows, cols // m, m, 1)
    return None


def nm_mask_for_weight(
    weight: torch.Tensor,
    n: int,
    m: int,
    group_layout: str = "channels_last",
    *,
    dtype: torch.dtype = torch.bool,
    tie_break: str = "low",
) -> torch.Tensor:
    """:func:`nm_mask` of a Linear/Conv2d weight, returned in the weight's own shape.

    Same result as ``matrix_to_weight(nm_mask(weight_to_matrix(w, layout), n, m), w.shape, layout)``
    with no layout round trip (this runs at every forward).

    Args:
        weight (`torch.Tensor`): A Linear ``(O, K)`` or Conv2d ``(O, C/g, kh, kw)`` weight.
        n (`int`): Entries kept per group.
        m (`int`): Group size.
        group_layout (`str`, *optional*, defaults to `"channels_last"`): ``"channels_last"`` or ``"flat"``
            (see :func:`weight_to_matrix`).
        dtype (`torch.dtype`, *optional*, defaults to `torch.bool`): ``bool``, or the 0/1 ``uint8`` / float
            masks of the training step (:func:`step_mask_dtype`).
        tie_break (`str`, *optional*, defaults to `"low"`): One of :data:`TIE_BREAKS`.

    Returns:
        `torch.Tensor`: The forward mask ``Mf`` in ``weight``'s shape, of ``dtype``.
    """
    check_nm_pattern(n, m)
    high = ties_high(tie_break)
    grouped = _grouped(weight.detach(), m, group_layout)
    if grouped is None:
        keep = matrix_to_weight(
            nm_mask(weight_to_matrix(weight, group_layout), n, m, tie_break=tie_break), weight.shape, group_layout
        )
        return _as_dtype(keep, dtype)
    if m > 16:
        return _as_dtype(keep_top_n(grouped.abs(), n, dim=2, tie_break=tie_break).reshape(weight.shape), dtype)
    if torch.compiler.is_compiling():
        if grouped.shape[3] == 1:  # m adjacent entries: compared as shifted copies of the rows
            keep = _rank_keep_adjacent(grouped.abs().view(grouped.shape[0], -1), n, m, high)
        else:
            # Conv groups ranked in place, a group's M entries kh*kw apart: with float masks inductor
            # vectorises this along the kernel positions; on a channels-last copy its loops run scalar.
            keep = _rank_keep_fused(grouped.abs(), n, 2, high)
        return _as_dtype(keep.view(weight.shape), dtype)
    a, b, _, d = grouped.shape
    if dtype in (torch.uint8, torch.bool) and kernels.applies(weight, m, spread=d):
        return kernels.forward_mask(weight, n, m, d, dtype, high=high)  # one pass in C (same masks)
    # |W| with the position in the group leading (contiguous slices to compare), in one pass
    front = torch.empty((m, a, b, d), dtype=_count_dtype(weight), device=weight.device)
    torch.abs(grouped.permute(2, 0, 1, 3), out=front)
    keep = _rank_keep(front, n, high)
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    out.view(a, b, m, d).copy_(keep.permute(1, 2, 0, 3))  # back to the weight's layout and dtype in one pass
    return out


def backward_mask_for_weight(
    weight: torch.Tensor,
    forward_mask: torch.Tensor,
    permutation: torch.Tensor,
    n: int,
    m: int,
    *,
    dtype: torch.dtype = torch.bool,
    tie_break: str = "low",
) -> torch.Tensor:
    """:func:`backward_mask` of a Linear/Conv2d weight in its own shape.

    The backward mask groups rows, and each column is handled on its own, so the column order of
    the weight does not matter and no layout copy is needed.

    Args:
        weight (`torch.Tensor`): A Linear or Conv2d weight.
        forward_mask (`torch.Tensor`): Its forward mask ``Mf`` (bool or 0/1 values, same shape).
        permutation (`torch.Tensor`): The row permutation that forms the groups of ``m`` rows.
        n (`int`): Entries kept per group.
        m (`int`): Group size.
        dtype (`torch.dtype`, *optional*, defaults to `torch.bool`): As in :func:`nm_mask_for_weight`.
        tie_break (`str`, *optional*, defaults to `"low"`): As in :func:`nm_mask_for_weight`.

    Returns:
        `torch.Tensor`: The backward mask ``Mb`` in ``weight``'s shape, of ``dtype``.

    Raises:
        ValueError: If ``O % m != 0`` or ``tie_break`` is unknown.
    """
    high = ties_high(tie_break)
    rows = weight.shape[0]
    if rows % m:
        raise ValueError(f"N:M along rows needs O % M == 0, got O={rows}, M={m}.")
    if torch.compiler.is_compiling() or m > 16:
        return _as_dtype(_backward_mask_gathered(weight, forward_mask, permutation, n, m, high), dtype)
    if dtype in (torch.uint8, torch.bool) and kernels.applies(weight, m):
        return kernels.backward_mask(weight, forward_mask, permutation, n, m, dtype, high=high)  # one pass in C
    order = permutation.view(rows // m, m).T.reshape(-1)  # position-in-group major: one contiguous slice each
    # Gather the rows in group order once (index_select copies whole rows; advanced indexing is slower).
    kept = forward_mask.reshape(rows, -1).index_select(0, order).to(_count_dtype(weight))  # 0/1
    scores = _backward_scores(weight.detach().reshape(rows, -1).index_select(0, order).abs_(), kept, high)
    keep = _rank_keep(scores.view(m, rows // m, -1), n, high).view(rows, -1).mul_(kept)
    out = torch.empty(keep.shape, dtype=dtype, device=weight.device)
    out.index_copy_(0, order, _as_dtype(keep, dtype))  # rows back to their own places
    return out.view(weight.shape)


def _backward_scores(magnitude: torch.Tensor, kept: torch.Tensor, high: bool) -> torch.Tensor:
    """Scores ranked for ``Mb`` from ``|W|`` and 0/1 ``Mf``: ``|W|`` of kept entries, and -1 for pruned ones
    so that ``Mf`` entries always win; with the paper's ``high`` tie order ``|W * Mf|`` (pruned entries
    score 0 and tie with kept exact zeros, as in its released code). Arithmetic, no bool intermediates."""
    if high:
        return magnitude * kept
    return torch.addcmul(kept - 1, magnitude, kept)


def _backward_mask_gathered(
    weight: torch.Tensor, forward_mask: torch.Tensor, permutation: torch.Tensor, n: int, m: int, high: bool = False
) -> torch.Tensor:
    """:func:`backward_mask_for_weight` with gathers only (no scatter, no in-place updates), as 0/1 values.

    Rows are read in permutation order, ranked within their group, and read back through the inverse
    permutation: every step is a gather or a pointwise op, which inductor fuses into the kernel that
    consumes ``Mb`` (``W * Mb``). Same result as the eager path.
    """
    rows = weight.shape[0]
    dtype = _count_dtype(weight)
    inverse = torch.argsort(permutation)
    kept = forward_mask.reshape(rows, -1)[permutation].to(dtype)  # 0/1
    scores = _backward_scores(weight.detach().reshape(rows, -1)[permutation].abs(), kept, high)
    grouped = scores.view(rows // m, m, -1)
    if m <= 16:
        keep = _rank_keep_fused(grouped, n, 1, high)
    else:
        keep = keep_top_n(grouped, n, dim=1, tie_break="high" if high else "low").to(dtype)
    keep = keep.view(rows, -1) * kept
    return keep[inverse].view(weight.shape)


def nm_mask(weight: torch.Tensor, n: int, m: int, *, tie_break: str = "low") -> torch.Tensor:
    """Forward mask ``Mf``: the ``n`` largest ``|W|`` in every row and run of ``m`` consecutive columns.

    Args:
        weight (`torch.Tensor`): A 2-D ``(O, K)`` weight with finite values and ``K % m == 0``.
        n (`int`): Entries kept per group.
        m (`int`): Group size.
        tie_break (`str`, *optional*, defaults to `"low"`): Order of equal ``|W|``: ``"low"`` keeps the lower
            column, ``"high"`` the higher one, as the paper.

    Returns:
        `torch.Tensor`: A bool ``(O, K)`` mask with exactly ``n`` ``True`` in every group.

    Raises:
        ValueError: If the pattern is invalid, ``weight`` is not 2-D or holds NaN/inf, or ``K % m != 0``.
    """
    check_nm_pattern(n, m)
    _check_matrix(weight)
    _check_finite(weight)
    rows, cols = weight.shape
    if cols % m:
        raise ValueError(f"N:M along columns needs K % M == 0, got K={cols}, M={m}.")
    groups = weight.detach().abs().reshape(rows, cols // m, m)
    return keep_top_n(groups, n, dim=-1, tie_break=tie_break).reshape(rows, cols)


def backward_mask(
    weight: torch.Tensor,
    forward_mask: torch.Tensor,
    permutation: torch.Tensor,
    n: int,
    m: int,
    *,
    tie_break: str = "low",
) -> torch.Tensor:
    """Backward mask ``Mb``: N:M along rows taken in ``permutation`` order, restricted to ``forward_mask``.

    Rows are grouped as ``permutation[0:m], permutation[m:2m], ...``; in each group and each column the
    ``n`` entries of largest ``|W * Mf|`` are kept, then the result is ANDed with ``Mf``. With
    ``tie_break="low"`` (default) entries of ``Mf`` always outrank pruned ones, so ``|Mb|`` per group and
    column is ``min(count(Mf), n)``, and equal scores go to the lower group position; with ``"high"``
    (the paper's code) equal scores go to the higher position, pruned entries included: a kept exact zero
    can lose its place to a pruned entry, which the AND then drops.

    Args:
        weight (`torch.Tensor`): A 2-D ``(O, K)`` weight with finite values and ``O % m == 0``.
        forward_mask (`torch.Tensor`): The forward mask ``Mf``, same shape as ``weight``.
        permutation (`torch.Tensor`): A permutation of ``range(O)`` (int64) that forms the row groups.
        n (`int`): Entries kept per group.
        m (`int`): Group size.
        tie_break (`str`, *optional*, defaults to `"low"`): ``"low"`` or ``"high"`` (see above).

    Returns:
        `torch.Tensor`: A bool ``(O, K)`` mask, a subset of ``forward_mask``.

    Raises:
        ValueError: If the pattern or a shape is invalid, ``weight`` holds NaN/inf, or ``permutation`` is
            not a permutation of the rows.
    """
    check_nm_pattern(n, m)
    _check_matrix(weight)
    rows, cols = weight.shape
    if rows % m:
        raise ValueError(f"N:M along rows needs O % M == 0, got O={rows}, M={m}.")
    if forward_mask.shape != weight.shape:
        raise ValueError(f"forward_mask shape {tuple(forward_mask.shape)} != weight shape {tuple(weight.shape)}.")
    _check_finite(weight)
    _check_permutation(permutation, rows)
    return backward_mask_for_weight(weight, forward_mask, permutation, n, m, tie_break=tie_break)


def retention(forward_mask: torch.Tensor, backward_mask: torch.Tensor) -> float:
    """``|Mb & Mf| / |Mf|``: the share of forward weights that also act in the backward pass.

    An empty ``Mf`` gives 1.0 (nothing the forward pass uses is left without a gradient;
    :func:`~bimask_hf.search.retention_share`, shared with :func:`permutation_retention` and the inspection
    report).

    Args:
        forward_mask (`torch.Tensor`): ``Mf``, bool or 0/1 values.
        backward_mask (`torch.Tensor`): ``Mb``, bool or 0/1 values of the same shape.

    Returns:
        `float`: The retention, in ``[0, 1]``.

    Raises:
        ValueError: If the shapes differ.
    """
    if forward_mask.shape != backward_mask.shape:
        raise ValueError(
            f"backward_mask shape {tuple(backward_mask.shape)} != forward_mask shape {tuple(forward_mask.shape)}."
        )
    mf = forward_mask if forward_mask.dtype == torch.bool else forward_mask != 0
    mb = backward_mask if backward_mask.dtype == torch.bool else backward_mask != 0
    return retention_share(int((mb & mf).sum()), int(mf.sum()))


@functools.lru_cache(maxsize=32)
def _doubly_nm_patterns(n: int, m: int) -> torch.Tensor:
    """All ``m x m`` 0/1 matrices with exactly ``n`` ones in every row and column, as (P, m*m) floats."""
    row_choices = [sum(1 << c for c in cols) for cols in itertools.combinations(range(m), n)]
    found: list[list[int]] = []

    def extend(prefix: list[int], col_counts: list[int]) -> None:
        if len(prefix) == m:
            found.append(prefix)
            return
        rows_left = m - len(prefix)
        for bits in row_choices:
            counts = [col_counts[c] + ((bits >> c) & 1) for c in range(m)]
            # every column must still be able to reach n (and never exceed it)
            if all(n - rows_left + 1 <= k <= n for k in counts):
                extend(prefix + [bits], counts)

    extend([], [0] * m)
    table = torch.tensor([[(bits >> c) & 1 for bits in p for c in range(m)] for p in found], dtype=torch.float32)
    return table


def _transposable_by_swaps(blocks: torch.Tensor, n: int, m: int, max_rounds: int) -> torch.Tensor:
    """Local search for large M: start from a cyclic doubly-N:M pattern, apply improving 2x2 swaps."""
    b = blocks.shape[0]
    i = torch.arange(m, device=blocks.device)
    pattern = ((i.view(1, m) - i.view(m, 1)) % m < n).expand(b, m, m).clone()
    for _ in range(max_rounds):
        p = pattern.float()
        # move (i,j),(k,l) -> (i,l),(k,j): valid when p[i,j]=p[k,l]=1 and p[i,l]=p[k,j]=0
        pij = p.view(b, m, m, 1, 1)
        pkl = p.view(b, 1, 1, m, m)
        pil = p.view(b, m, 1, 1, m)
        pkj = p.permute(0, 2, 1).reshape(b, 1, m, m, 1)
        aij = blocks.view(b, m, m, 1, 1)
        akl = blocks.view(b, 1, 1, m, m)
        ail = blocks.view(b, m, 1, 1, m)
        akj = blocks.permute(0, 2, 1).reshape(b, 1, m, m, 1)
        valid = pij * pkl * (1 - pil) * (1 - pkj)
        gain = torch.where(valid > 0, ail + akj - aij - akl, torch.zeros((), device=blocks.device))
        best_gain, best = gain.reshape(b, -1).max(dim=1)
        improve = best_gain > 1e-12
        if not bool(improve.any()):
            break
        idx = best[improve]
        bi, bj, bk, bl = idx // m**3, (idx // m**2) % m, (idx // m) % m, idx % m
        rows = improve.nonzero().squeeze(1)
        pattern[rows, bi, bj] = False
        pattern[rows, bk, bl] = False
        pattern[rows, bi, bl] = True
        pattern[rows, bk, bj] = True
    return pattern


def transposable_mask(weight: torch.Tensor, n: int, m: int, max_rounds: int = 64) -> torch.Tensor:
    """T-mask: N:M along rows *and* columns inside every ``m x m`` block, maximising the kept ``|W|``.

    Exact (all doubly-N:M block patterns are scored with one matmul) for ``m <= 5``; for larger ``m``
    a vectorised 2x2-swap local search from a cyclic pattern.

    Args:
        weight (`torch.Tensor`): A 2-D ``(O, K)`` finite weight, ``O % m == 0`` and ``K % m == 0``.
        n (`int`): Entries kept per row and per column of a block.
        m (`int`): Block size.
        max_rounds (`int`, *optional*, defaults to 64): Most swap rounds of the local search (``m > 5``).

    Returns:
        `torch.Tensor`: A bool ``(O, K)`` mask.

    Raises:
        ValueError: If the pattern or the shape is invalid or ``weight`` holds NaN/inf.
    """
    check_nm_pattern(n, m)
    _check_matrix(weight)
    _check_finite(weight)
    rows, cols = weight.shape
    if rows % m or cols % m:
        raise ValueError(f"Transposable N:M needs O % M == 0 and K % M == 0, got O={rows}, K={cols}, M={m}.")
    mags = weight.detach().abs().float()
    blocks = mags.reshape(rows // m, m, cols // m, m).permute(0, 2, 1, 3).reshape(-1, m, m)
    if m <= 5:
        patterns = _doubly_nm_patterns(n, m).to(blocks.device)
        best = (blocks.reshape(-1, m * m) @ patterns.T).argmax(dim=1)
        chosen = patterns[best].bool().reshape(-1, m, m)
    else:
        chosen = _transposable_by_swaps(blocks, n, m, max_rounds)
    return chosen.reshape(rows // m, cols // m, m, m).permute(0, 2, 1, 3).reshape(rows, cols)


def unstructured_keep_count(density: float, numel: int) -> int:
    """How many of ``numel`` weights an unstructured mask of ``density`` keeps (rounded, at least one).

    Args:
        density (`float`): Share of weights kept.
        numel (`int`): Number of weights.

    Returns:
        `int`: The count, in ``[1, numel]``.
    """
    return max(1, min(numel, int(math.floor(density * numel + 0.5))))


def unstructured_mask(weight: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` share (rounded, at least one) of entries with the largest ``|W|``.

    Args:
        weight (`torch.Tensor`): A weight of any shape with finite values.
        density (`float`): Share of entries kept, in ``(0, 1]``.

    Returns:
        `torch.Tensor`: A bool mask of ``weight``'s shape.

    Raises:
        ValueError: If ``density`` is outside ``(0, 1]`` or ``weight`` holds NaN/inf.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}.")
    _check_finite(weight)
    flat = weight.detach().abs().flatten()
    keep = unstructured_keep_count(density, flat.numel())
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=weight.device)
    mask[flat.topk(keep, sorted=False).indices] = True
    return mask.reshape(weight.shape)


def weight_to_matrix(weight: torch.Tensor, group_layout: str = "channels_last") -> torch.Tensor:
    """View a Linear ``(O, K)`` or Conv2d ``(O, C/g, kh, kw)`` weight as the ``(O, K)`` matrix masks act on.

    Args:
        weight (`torch.Tensor`): A 2-D or 4-D weight.
        group_layout (`str`, *optional*, defaults to `"channels_last"`): ``channels_last`` orders columns
            ``(kh, kw, c)``, so an N:M group runs along input channels at one kernel position; ``flat`` is
            PyTorch's ``(c, kh, kw)`` flatten.

    Returns:
        `torch.Tensor`: The ``(O, K)`` matrix (``weight`` itself when 2-D).

    Raises:
        ValueError: If ``group_layout`` is unknown or ``weight`` is neither 2-D nor 4-D.
    """
    if group_layout not in ("channels_last", "flat"):
        raise ValueError(f"group_layout must be 'channels_last' or 'flat', got {group_layout!r}.")
    if weight.dim() == 2:
        return weight
    if weight.dim() != 4:
        raise ValueError(f"Expected a 2-D or 4-D weight, got shape {tuple(weight.shape)}.")
    if group_layout == "channels_last":
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    return weight.reshape(weight.shape[0], -1)


def matrix_to_weight(matrix: torch.Tensor, shape: torch.Size | tuple[int, ...], group_layout: str = "channels_last") -> torch.Tensor:
    """Inverse of :func:`weight_to_matrix`: back to the layer's weight ``shape`` (contiguous).

    Args:
        matrix (`torch.Tensor`): An ``(O, K)`` matrix.
        shape (`torch.Size` or `tuple[int, ...]`): The Linear ``(O, K)`` or Conv2d ``(O, C, kh, kw)`` shape.
        group_layout (`str`, *optional*, defaults to `"channels_last"`): The layout ``matrix`` was made with.

    Returns:
        `torch.Tensor`: ``matrix`` in ``shape``.

    Raises:
        ValueError: If ``matrix`` is not ``shape`` viewed as ``(O, K)`` or ``group_layout`` is unknown.
    """
    if len(shape) not in (2, 4) or matrix.dim() != 2 or matrix.shape[0] != shape[0] or matrix.numel() != math.prod(shape):
        raise ValueError(
            f"matrix of shape {tuple(matrix.shape)} is not a Linear (O, K) or Conv2d (O, C, kh, kw) weight of shape "
            f"{tuple(shape)} viewed as (O, K)."
        )
    if len(shape) == 4 and group_layout not in ("channels_last", "flat"):
        raise ValueError(f"group_layout must be 'channels_last' or 'flat', got {group_layout!r}.")
    if len(shape) == 2:
        return matrix.reshape(shape)
    out_ch, in_ch, kh, kw = shape
    if group_layout == "channels_last":
        return matrix.reshape(out_ch, kh, kw, in_ch).permute(0, 3, 1, 2).contiguous()
    return matrix.reshape(shape)
