"""Public functions refuse inputs they cannot give a meaning to, on the C-kernel and tensor-op paths alike.

Checks run at the public entry points (and when a state dict is loaded), never in the training step's
per-call mask functions: the step's cost stays what it was.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn

import bimask_hf as bh
from bimask_hf import kernels, masks
from bimask_hf.inspection import layer_retention

PATHS = [pytest.param(contextlib.nullcontext, id="c-kernels"), pytest.param(kernels.disabled, id="tensor-ops")]


def _weights():
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    return w, masks.nm_mask(w, 2, 4)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "perm,match",
    [
        ([0, 0, 1, 2, 3, 4, 5, 6], "row 0 appears 2 times and 1 row"),  # the old uninitialised row
        ([0, 1, 2, 3, 4, 5, 6, 8], "from 0 to 8"),
        ([-1, 1, 2, 3, 4, 5, 6, 7], "from -1 to 7"),
        ([0, 1, 2, 3], r"shape \(8,\)"),
    ],
)
def test_backward_mask_refuses_a_permutation_that_is_not_one(path, perm, match):
    w, mf = _weights()
    with path(), pytest.raises(ValueError, match=f"permutation.*{match}|{match}.*permutation"):
        masks.backward_mask(w, mf, torch.tensor(perm), 2, 4)
    with path(), pytest.raises(ValueError, match="integer row indices"):
        masks.backward_mask(w, mf, torch.arange(8.0), 2, 4)
    with path():  # a real permutation still works, and equals the other path's result
        good = torch.randperm(8, generator=torch.Generator().manual_seed(1))
        assert torch.equal(masks.backward_mask(w, mf, good, 2, 4),
                           _other_path(path, masks.backward_mask, w, mf, good, 2, 4))


def _other_path(path, fn, *args):
    with (contextlib.nullcontext() if path is kernels.disabled else kernels.disabled()):
        return fn(*args)


def test_searches_and_retention_refuse_a_duplicate_permutation():
    _, mf = _weights()
    dup = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6])
    with pytest.raises(ValueError, match="^init must be a permutation"):
        masks.search_permutation(mf, 2, 4, method="matched", init=dup)
    with pytest.raises(ValueError, match="^permutation must be a permutation"):
        masks.permutation_retention(mf, dup, 2, 4)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_where_they_rank_the_mask(path, bad):
    w, mf = _weights()
    w = w.clone()
    w[3, 5] = bad
    with path():
        for call in (lambda: masks.nm_mask(w, 2, 4), lambda: masks.backward_mask(w, mf, torch.arange(8), 2, 4),
                     lambda: masks.transposable_mask(w[:, :8], 2, 4), lambda: masks.unstructured_mask(w, 0.5)):
            with pytest.raises(ValueError, match="weight has 1 non-finite entry"):
                call()


@pytest.mark.parametrize("path", PATHS)
def test_n_above_m_and_shapes_that_do_not_fit_the_layout(path):
    w, mf = _weights()
    with path():
        for call in (lambda: masks.nm_mask(w, 5, 4), lambda: masks.backward_mask(w, mf, torch.arange(8), 5, 4),
                     lambda: masks.transposable_mask(w[:, :8], 5, 4),
                     lambda: masks.search_permutation(mf, 5, 4)):
            with pytest.raises(ValueError, match="n=5, m=4.*1 <= N <= M"):
                call()
        with pytest.raises(ValueError, match="K % M == 0, got K=6"):
            masks.nm_mask(torch.randn(8, 6), 2, 4)
        with pytest.raises(ValueError, match="O % M == 0, got O=6"):
            masks.backward_mask(torch.randn(6, 8), masks.nm_mask(torch.randn(6, 8), 2, 4), torch.arange(6), 2, 4)
        with pytest.raises(ValueError, match=r"forward_mask shape \(4, 16\)"):
            masks.backward_mask(w, mf[:4], torch.arange(8), 2, 4)
        with pytest.raises(ValueError, match="2-D"):
            masks.nm_mask(torch.randn(2, 8, 16), 2, 4)
        with pytest.raises(ValueError, match="group_layout must be"):
            masks.weight_to_matrix(torch.randn(8, 4, 3, 3), "channel_last")
        with pytest.raises(ValueError, match=r"shape \(8, 4, 3, 4\)"):
            masks.matrix_to_weight(torch.randn(8, 36), (8, 4, 3, 4))
        with pytest.raises(ValueError, match=r"backward_mask shape \(4, 16\)"):
            masks.retention(mf, mf[:4])


def test_loading_a_state_dict_with_a_broken_permutation_is_refused():
    model = bh.sparsify(nn.Sequential(nn.Linear(16, 8)), bh.BiMaskConfig(target_modules=["0"]))
    state = model.state_dict()
    key = next(k for k in state if k.endswith("bimask_permutation"))
    state[key] = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6])
    with pytest.raises(ValueError, match=f"{key} must be a permutation"):
        model.load_state_dict(state)
    state[key] = torch.arange(8).flip(0)
    model.load_state_dict(state)  # a real one loads
    assert torch.equal(model[0].bimask_permutation, torch.arange(8).flip(0))


def test_one_retention_for_an_empty_forward_mask():
    """Empty ``Mf``: no forward weight loses its gradient, so all three report 1.0."""
    empty = torch.zeros(8, 16, dtype=torch.bool)
    assert masks.retention(empty, empty) == 1.0
    assert masks.permutation_retention(empty, torch.arange(8), 2, 4) == 1.0
    assert layer_retention(empty, empty) == 1.0
    # and on masks that are not empty, the three agree with the definition |Mb & Mf| / |Mf|
    w, mf = _weights()
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(2))
    mb = masks.backward_mask(w, mf, perm, 2, 4)
    expected = int((mb & mf).sum()) / int(mf.sum())
    assert masks.retention(mf, mb) == layer_retention(mf, mb) == pytest.approx(expected)
    assert masks.permutation_retention(mf, perm, 2, 4) == pytest.approx(expected)
    assert masks.retention(mf.to(torch.uint8), mb.float()) == pytest.approx(expected)  # 0/1 masks too



def test_layers_refuse_settings_they_cannot_run_when_built():
    for kwargs, match in (({"group_layout": "channel_last"}, "group_layout must be one of"),
                          ({"n": 5, "m": 4}, "n=5, m=4"), ({"mode": "bimsk"}, "mode must be one of")):
        with pytest.raises(ValueError, match=match):
            bh.BiMaskConv2d(8, 8, 3, **kwargs)
        with pytest.raises(ValueError, match=match):
            bh.BiMaskLinear(16, 8, **kwargs)
