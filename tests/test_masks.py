"""Mask properties against the definitions in docs/method.md and the loop-based references."""

from __future__ import annotations

import pytest
import torch

import bimask_hf as bh
from bimask_hf.masks import matrix_to_weight, weight_to_matrix

from .reference import ref_backward_mask, ref_nm_mask, ref_transposable_mask, ref_unstructured_mask

PATTERNS = [(2, 4), (1, 4), (2, 8), (4, 8), (1, 16)]


@pytest.mark.parametrize("n,m", PATTERNS)
def test_nm_mask_keeps_exactly_n_largest_per_group(n, m):
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(n * m))
    mask = bh.nm_mask(w, n, m)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert (mask.reshape(32, -1, m).sum(-1) == n).all()
    assert torch.equal(mask, ref_nm_mask(w, n, m))


@pytest.mark.parametrize("n,m", PATTERNS)
def test_backward_mask_properties(n, m):
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(4 * m, 48 if m < 16 else 64, generator=gen)
    mf = bh.nm_mask(w, n, m)
    perm = torch.randperm(w.shape[0], generator=gen)
    mb = bh.backward_mask(w, mf, perm, n, m)
    assert not (mb & ~mf).any(), "Mb must be inside Mf"
    counts = mb[perm].reshape(-1, m, w.shape[1]).sum(1)  # N:M along the permuted rows
    assert (counts <= n).all()
    mf_counts = mf[perm].reshape(-1, m, w.shape[1]).sum(1)
    assert torch.equal(counts, mf_counts.clamp(max=n))
    assert torch.equal(mb, ref_backward_mask(w, mf, perm.tolist(), n, m))
    assert bh.retention(mf, mb) == pytest.approx(int(mb.sum()) / int(mf.sum()))
    assert bh.retention(mf, mb) <= 1.0


def test_identity_permutation_differs_from_shuffled():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=gen)
    mf = bh.nm_mask(w, 2, 4)
    a = bh.backward_mask(w, mf, torch.arange(16), 2, 4)
    b = bh.backward_mask(w, mf, torch.randperm(16, generator=gen), 2, 4)
    assert not torch.equal(a, b)


def test_masks_deterministic_and_ties_go_to_lower_index():
    w = torch.ones(4, 8)
    mask = bh.nm_mask(w, 2, 4)
    assert mask[:, [0, 1, 4, 5]].all() and not mask[:, [2, 3, 6, 7]].any()
    mf = bh.nm_mask(w, 2, 4)
    mb = bh.backward_mask(w, mf, torch.arange(4), 2, 4)
    assert mb[[0, 1]][:, mf[0]].all() and not mb[[2, 3]].any()


def test_search_is_deterministic_given_generator():
    w = torch.randn(64, 576, generator=torch.Generator().manual_seed(0))
    mf = bh.nm_mask(w, 2, 4)
    for method in ("random", "swap"):
        a = bh.search_permutation(mf, 2, 4, method=method, generator=torch.Generator().manual_seed(5))
        b = bh.search_permutation(mf, 2, 4, method=method, generator=torch.Generator().manual_seed(5))
        assert torch.equal(a, b)
        assert torch.equal(a.sort().values, torch.arange(64))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4)])
def test_transposable_mask_is_optimal_doubly_nm(n, m):
    w = torch.randn(8, 12, generator=torch.Generator().manual_seed(n))
    mt = bh.transposable_mask(w, n, m)
    assert (mt.reshape(8, -1, m).sum(-1) == n).all()
    assert (mt.T.reshape(12, -1, m).sum(-1) == n).all()
    assert torch.equal(mt, ref_transposable_mask(w, n, m))


def test_transposable_large_m_uses_local_search_and_stays_valid():
    w = torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
    mt = bh.transposable_mask(w, 4, 8)
    assert (mt.reshape(16, -1, 8).sum(-1) == 4).all() and (mt.T.reshape(16, -1, 8).sum(-1) == 4).all()
    cyclic = ((torch.arange(8).view(1, 8) - torch.arange(8).view(8, 1)) % 8 < 4).repeat(2, 2)
    assert (w.abs() * mt).sum() > (w.abs() * cyclic).sum()  # improved on the start pattern


@pytest.mark.parametrize("density", [0.5, 0.1, 1.0])
def test_unstructured_mask(density):
    w = torch.randn(10, 20, generator=torch.Generator().manual_seed(0))
    mask = bh.unstructured_mask(w, density)
    assert int(mask.sum()) == round(density * 200)
    assert torch.equal(mask, ref_unstructured_mask(w, density))


def test_conv_layouts_round_trip_and_group_along_channels():
    w = torch.randn(8, 4, 3, 3)
    for layout in ("channels_last", "flat"):
        assert torch.equal(matrix_to_weight(weight_to_matrix(w, layout), w.shape, layout), w)
    cl = weight_to_matrix(w, "channels_last")
    assert torch.equal(cl[0, :4], w[0, :, 0, 0])  # first group of 4 = all input channels at (0, 0)
    assert torch.equal(weight_to_matrix(w, "flat")[0, :4], w[0, 0].flatten()[:4])


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: bh.nm_mask(torch.randn(4, 6), 2, 4), "K % M == 0"),
        (lambda: bh.nm_mask(torch.randn(4, 8), 3, 2), "Invalid N:M"),
        (lambda: bh.nm_mask(torch.randn(4, 8, 1), 2, 4), "2-D"),
        (lambda: bh.backward_mask(torch.randn(6, 8), torch.ones(6, 8, dtype=torch.bool), torch.arange(6), 2, 4), "O % M"),
        (lambda: bh.transposable_mask(torch.randn(6, 8), 2, 4), "O % M == 0 and K % M == 0"),
        (lambda: bh.unstructured_mask(torch.randn(6, 8), 0.0), "density"),
    ],
)
def test_bad_input_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_nm_mask_beyond_m_16_keeps_the_n_largest():
    from .reference import ref_nm_mask

    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    for n, m in ((3, 32), (1, 32), (5, 64)):
        mask = bh.nm_mask(w, n, m)
        assert torch.equal(mask, ref_nm_mask(w, n, m)), (n, m)
        kept = w.abs()[mask].reshape(8, -1, n).amin(-1)
        dropped = w.abs().masked_fill(mask, -1).reshape(8, -1, m).amax(-1)
        assert (kept.reshape(8, -1) >= dropped).all()


def test_step_mask_dtype_per_path(monkeypatch):
    """Eager CPU steps carry uint8 masks, compiled CPU graphs the weight's float dtype, GPUs bool."""
    from bimask_hf.masks import step_mask_dtype

    w = torch.randn(8, 8)
    assert step_mask_dtype(w) == torch.uint8 and step_mask_dtype(w.half()) == torch.uint8
    assert step_mask_dtype(w.to("meta")) == torch.bool  # not CPU: CUDA/Triton kernels handle bool masks well
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert step_mask_dtype(w) == torch.float32 and step_mask_dtype(w.double()) == torch.float64
    assert step_mask_dtype(w.to("meta")) == torch.bool


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8), (3, 16)])
@pytest.mark.parametrize("shape,layout", [((16, 48), "channels_last"), ((16, 16, 3, 3), "channels_last"),
                                          ((16, 16, 3, 3), "flat"), ((16, 32, 1, 1), "channels_last")])
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.float32])
@pytest.mark.parametrize("path", ["kernels", "tensor-ops", "graph"])
def test_step_masks_match_the_references(mask_path, n, m, shape, layout, dtype, path):
    """The training step's masks (eager: the one-pass C kernels, or without them float counts over
    contiguous slices and gathers with index_select; under torch.compile: a gather-and-compare path with
    no in-place slices or scatter) keep exactly the reference's entries on integer weights full of ties,
    in the dtype asked for, from a forward mask of any dtype."""
    from bimask_hf.masks import backward_mask_for_weight, nm_mask_for_weight

    gen = torch.Generator().manual_seed(n * 100 + m)
    w = torch.randint(-3, 4, shape, generator=gen).float()
    perm = torch.randperm(shape[0], generator=gen)
    calls = mask_path(path)
    mf = nm_mask_for_weight(w, n, m, layout, dtype=dtype)
    mb = backward_mask_for_weight(w, mf, perm, n, m, dtype=dtype)
    assert mf.dtype == mb.dtype == dtype and mf.shape == mb.shape == w.shape
    if dtype != torch.bool:
        assert set(mf.unique().tolist()) <= {0, 1} and set(mb.unique().tolist()) <= {0, 1}
    matrix = weight_to_matrix(w, layout)
    ref_mf = ref_nm_mask(matrix, n, m)
    ref_mb = ref_backward_mask(matrix, ref_mf, perm.tolist(), n, m)
    assert torch.equal(weight_to_matrix(mf, layout).bool(), ref_mf)
    assert torch.equal(weight_to_matrix(mb, layout).bool(), ref_mb)
    for other in (torch.bool, torch.uint8, torch.float32):  # Mb does not depend on the dtype Mf comes in
        assert torch.equal(backward_mask_for_weight(w, mf.to(other), perm, n, m), mb.bool())
    if path == "kernels" and dtype != torch.float32:  # the kernels write 0/1 bytes; float masks are for graphs
        assert {"forward_mask", "backward_mask"} <= set(calls)
