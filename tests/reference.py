"""Explicit, loop-based reference implementations of the definitions in docs/method.md (slow, obviously correct)."""

from __future__ import annotations

import itertools

import torch


def ref_nm_mask(matrix: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows, cols = matrix.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for r in range(rows):
        for g in range(cols // m):
            cols_g = list(range(g * m, g * m + m))
            best = sorted(cols_g, key=lambda c: -abs(float(matrix[r, c])))[:n]
            for c in best:
                mask[r, c] = True
    return mask


def ref_backward_mask(matrix: torch.Tensor, mf: torch.Tensor, perm: list[int], n: int, m: int) -> torch.Tensor:
    rows, cols = matrix.shape
    mb = torch.zeros(rows, cols, dtype=torch.bool)
    for start in range(0, rows, m):
        group = perm[start : start + m]
        for c in range(cols):
            candidates = [r for r in group if mf[r, c]]
            best = sorted(candidates, key=lambda r: -abs(float(matrix[r, c])))[:n]
            for r in best:
                mb[r, c] = True
    return mb


def ref_transposable_mask(matrix: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows, cols = matrix.shape
    patterns = [
        p
        for p in itertools.product([0, 1], repeat=m * m)
        if all(sum(p[i * m : i * m + m]) == n for i in range(m)) and all(sum(p[j::m]) == n for j in range(m))
    ]
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for bi in range(0, rows, m):
        for bj in range(0, cols, m):
            block = matrix[bi : bi + m, bj : bj + m].abs()
            scores = [sum(float(block[k // m, k % m]) for k in range(m * m) if p[k]) for p in patterns]
            best = patterns[max(range(len(patterns)), key=lambda i: scores[i])]
            for k in range(m * m):
                mask[bi + k // m, bj + k % m] = bool(best[k])
    return mask


def ref_unstructured_mask(weight: torch.Tensor, density: float) -> torch.Tensor:
    flat = weight.abs().flatten().tolist()
    keep = round(density * len(flat))
    order = sorted(range(len(flat)), key=lambda i: -flat[i])[:keep]
    mask = torch.zeros(len(flat), dtype=torch.bool)
    mask[order] = True
    return mask.reshape(weight.shape)


def to_matrix(weight: torch.Tensor, layout: str) -> torch.Tensor:
    if weight.dim() == 2:
        return weight
    if layout == "channels_last":
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    return weight.reshape(weight.shape[0], -1)


def from_matrix(matrix: torch.Tensor, shape, layout: str) -> torch.Tensor:
    if len(shape) == 2:
        return matrix
    o, c, kh, kw = shape
    if layout == "channels_last":
        return matrix.reshape(o, kh, kw, c).permute(0, 3, 1, 2)
    return matrix.reshape(shape)


# ---- the paper's released algorithm, as docs/method.md ("The paper preset") describes it -------------
def _drop_smallest_stable(scores: list[float], n: int) -> list[bool]:
    """Order a group's positions by score, ascending, equal scores keeping their order (a stable sort),
    and drop the first ``M - N``: the kept ones are the N largest, equal scores going to the later position."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    keep = [True] * len(scores)
    for i in order[: len(scores) - n]:
        keep[i] = False
    return keep


def ref_paper_forward_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``Mf`` of the paper: the weight flattened in PyTorch's order (``(O, C, kh, kw)`` row-major, so a
    group may run across rows when ``K % M != 0``), cut into runs of M consecutive entries."""
    flat = weight.detach().abs().flatten().tolist()
    mask = []
    for start in range(0, len(flat), m):
        mask += _drop_smallest_stable(flat[start : start + m], n)
    return torch.tensor(mask, dtype=torch.bool).reshape(weight.shape)


def ref_paper_backward_mask(weight: torch.Tensor, mf: torch.Tensor, perm: list[int], n: int, m: int) -> torch.Tensor:
    """``Mb`` of the paper: scores ``|W * Mf|`` (pruned entries score 0), rows taken in ``perm`` order in
    groups of M, in every group and column the same stable drop of the M - N smallest, then AND ``Mf``."""
    rows = weight.shape[0]
    w = weight.detach().reshape(rows, -1)
    f = mf.reshape(rows, -1)
    mb = torch.zeros(w.shape, dtype=torch.bool)
    for start in range(0, rows, m):
        group = perm[start : start + m]
        for c in range(w.shape[1]):
            scores = [abs(float(w[r, c])) * float(f[r, c]) for r in group]
            for r, keep in zip(group, _drop_smallest_stable(scores, n)):
                mb[r, c] = keep and bool(f[r, c])
    return mb.reshape(weight.shape)
