"""Gradients of every mode against the explicit formulas of docs/method.md, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bimask_hf import BiMaskConv2d, BiMaskLinear
from bimask_hf.layers import PERMUTATION_KEY

from .reference import (
    from_matrix,
    ref_backward_mask,
    ref_nm_mask,
    ref_transposable_mask,
    ref_unstructured_mask,
    to_matrix,
)

DECAY = 0.05  # large, so a missing or wrong decay term shows up clearly


def expected_masks(layer, weight: torch.Tensor, mode: str, n: int, m: int, density=None, layout="channels_last"):
    """(Mf, Mb, decay factor) by the mode table of docs/method.md, from loop-based reference masks."""
    if mode == "dense":
        ones = torch.ones_like(weight, dtype=torch.bool)
        return ones, ones, 0.0
    matrix = to_matrix(weight, layout)
    if density is not None:
        mf = ref_unstructured_mask(weight, density)
        return mf, mf, DECAY if mode in ("srste", "bimask", "transposable") else 0.0
    if mode == "transposable":
        mt = from_matrix(ref_transposable_mask(matrix, n, m), weight.shape, layout)
        return mt, mt, DECAY
    mf_m = ref_nm_mask(matrix, n, m)
    mf = from_matrix(mf_m, weight.shape, layout)
    if mode == "bimask":
        perm = getattr(layer, PERMUTATION_KEY).tolist()
        mb = from_matrix(ref_backward_mask(matrix, mf_m, perm, n, m), weight.shape, layout)
        return mf, mb, DECAY
    return mf, mf, DECAY if mode == "srste" else 0.0


MODES = ["dense", "srste", "bimask", "transposable", "pre", "post"]


def _shuffle_permutation(layer, groups: int = 1) -> None:
    rows = layer.weight.shape[0] // groups
    gen = torch.Generator().manual_seed(3)
    perm = torch.cat([torch.randperm(rows, generator=gen) + g * rows for g in range(groups)])
    getattr(layer, PERMUTATION_KEY).copy_(perm)


@pytest.fixture(params=["eager", "bool-masks", "serial-masks", "graph-masks"])
def step_path(request, monkeypatch):
    """Run the layers on every code path the training step takes: ``eager`` (uint8 masks on CPU),
    ``bool-masks`` (as on GPUs), ``serial-masks`` (mask work switched to one thread, as with sleeping
    OpenMP threads) and ``graph-masks`` (inside a torch.compile graph: masks computed by pure functions
    and carried as 0/1 floats), eagerly so the formulas can be checked exactly."""
    import bimask_hf.functional as functional
    import bimask_hf.layers as layers

    if request.param == "bool-masks":
        for module in (functional, layers):
            monkeypatch.setattr(module, "step_mask_dtype", lambda weight: torch.bool)
    if request.param == "serial-masks":
        monkeypatch.setattr(functional, "_threads_sleep", lambda: True)
        monkeypatch.setattr(functional, "SERIAL_MASK_NUMEL", 1 << 30)
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        yield request.param
        assert torch.get_num_threads() == 2  # restored after every piece of mask work
        torch.set_num_threads(threads)
        return
    if request.param == "graph-masks":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    yield request.param


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pattern", [(2, 4), (1, 4)])
def test_linear_gradients_match_formulas(mode, pattern, step_path):
    n, m = pattern
    torch.manual_seed(0)
    layer = BiMaskLinear(16, 8, n=n, m=m, mode=mode, decay=DECAY).double()
    _shuffle_permutation(layer)
    w0 = layer.weight.detach().clone()
    b0 = layer.bias.detach().clone()
    x = torch.randn(5, 3, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 3, 8, dtype=torch.float64)
    mf, mb, decay = expected_masks(layer, w0, mode, n, m)

    y = layer(x)
    y.backward(g)

    w_fwd = w0 * mf
    torch.testing.assert_close(y, x.detach() @ w_fwd.T + b0)
    torch.testing.assert_close(x.grad, g @ (w0 * mb))
    g2, x2 = g.reshape(-1, 8), x.detach().reshape(-1, 16)
    torch.testing.assert_close(layer.weight.grad, g2.T @ x2 + decay * (~mf) * w0)
    torch.testing.assert_close(layer.bias.grad, g2.sum(0))
    assert torch.equal(layer.forward_mask, mf)
    assert torch.equal(layer.backward_mask, mb)
    if mode == "pre":  # projected in place before the forward
        torch.testing.assert_close(layer.weight.detach(), w_fwd)
    else:
        torch.testing.assert_close(layer.weight.detach(), w0)
    if mode == "post":
        layer.project_()
        torch.testing.assert_close(layer.weight.detach(), w_fwd)


@pytest.mark.parametrize("mode", ["srste", "bimask", "pre", "post"])
def test_linear_unstructured_density(mode):
    torch.manual_seed(1)
    layer = BiMaskLinear(12, 8, mode=mode, density=0.5, decay=DECAY).double()
    w0 = layer.weight.detach().clone()
    x = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, 8, dtype=torch.float64)
    mf, mb, decay = expected_masks(layer, w0, mode, 2, 4, density=0.5)
    layer(x).backward(g)
    assert int(mf.sum()) == 48
    torch.testing.assert_close(x.grad, g @ (w0 * mf))  # unstructured: backward mask = forward mask
    torch.testing.assert_close(layer.weight.grad, g.T @ x.detach() + decay * (~mf) * w0)


CONV_CASES = [
    dict(stride=2, padding=1, dilation=2, groups=2),
    dict(stride=1, padding=2, dilation=1, groups=1),
    dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CONV_CASES, ids=["s2p1d2g2", "s1p2", "asym"])
@pytest.mark.parametrize("layout", ["channels_last", "flat"])
def test_conv_gradients_match_formulas(mode, case, layout, step_path):
    n, m = 2, 4
    torch.manual_seed(0)
    layer = BiMaskConv2d(8, 8, 3, **case, n=n, m=m, mode=mode, decay=DECAY, group_layout=layout).double()
    _shuffle_permutation(layer, case["groups"])
    w0 = layer.weight.detach().clone()
    b0 = layer.bias.detach().clone()
    x = torch.randn(2, 8, 9, 10, dtype=torch.float64, requires_grad=True)
    mf, mb, decay = expected_masks(layer, w0, mode, n, m, layout=layout)
    conv = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"], groups=case["groups"])

    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)

    # References built from plain autograd of F.conv2d with explicitly masked weights.
    torch.testing.assert_close(y, F.conv2d(x.detach(), w0 * mf, b0, **conv))
    xr = x.detach().clone().requires_grad_(True)
    F.conv2d(xr, w0 * mb, None, **conv).backward(g)
    torch.testing.assert_close(x.grad, xr.grad)
    wr = w0.clone().requires_grad_(True)
    F.conv2d(x.detach(), wr, None, **conv).backward(g)
    torch.testing.assert_close(layer.weight.grad, wr.grad + decay * (~mf) * w0)
    torch.testing.assert_close(layer.bias.grad, g.sum((0, 2, 3)))
    assert torch.equal(layer.forward_mask, mf) and torch.equal(layer.backward_mask, mb)


def test_conv_padding_modes_and_no_bias():
    torch.manual_seed(0)
    layer = BiMaskConv2d(8, 8, 3, padding=1, padding_mode="reflect", bias=False, mode="srste").double()
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    mf, _, _ = expected_masks(layer, layer.weight.detach(), "srste", 2, 4)
    ref = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), layer.weight.detach() * mf)
    torch.testing.assert_close(layer(x), ref)


def test_bimask_is_unidirectional_when_rows_not_divisible():
    layer = BiMaskLinear(8, 6, mode="bimask")
    assert not layer.bidirectional and layer.effective_mode == "srste"
    layer(torch.randn(2, 8))
    assert torch.equal(layer.forward_mask, layer.backward_mask)


def test_masks_follow_weight_updates_and_permutation_changes():
    torch.manual_seed(0)
    layer = BiMaskLinear(16, 8)
    layer(torch.randn(2, 16))
    mf_before = layer.forward_mask
    with torch.no_grad():
        layer.weight.mul_(torch.randn_like(layer.weight))  # in-place, like an optimizer step
    layer(torch.randn(2, 16))
    assert not torch.equal(mf_before, layer.forward_mask)
    expected = ref_nm_mask(layer.weight.detach(), 2, 4)
    assert torch.equal(layer.forward_mask, expected)
    getattr(layer, PERMUTATION_KEY).copy_(torch.tensor([4, 5, 6, 7, 0, 1, 2, 3]).flip(0))
    layer(torch.randn(2, 16))
    ref_mb = ref_backward_mask(layer.weight.detach(), expected, [3, 2, 1, 0, 7, 6, 5, 4], 2, 4)
    assert torch.equal(layer.backward_mask, ref_mb)


@pytest.mark.parametrize("cls,args", [(BiMaskLinear, (16, 8)), (BiMaskConv2d, (8, 8, 3))])
def test_autocast_bf16_cpu(cls, args):
    """Under bf16 autocast: bf16 output, float32 gradients, and the formulas of docs/method.md."""
    torch.manual_seed(0)
    decay = 2.0  # large enough that a missing decay term is far outside the bf16 tolerance
    layer = cls(*args, mode="bimask", decay=decay)
    _shuffle_permutation(layer)  # Mb differs from Mf
    shape = (4, 16) if cls is BiMaskLinear else (2, 8, 6, 6)
    x = torch.randn(*shape, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    g = torch.randn_like(y, dtype=torch.float32)
    y.float().backward(g)
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    w = layer.weight.detach()
    mf, mb, _ = expected_masks(layer, w, "bimask", 2, 4)
    xb, wf, wb = x.detach().bfloat16().float(), (w * mf).bfloat16().float(), (w * mb).bfloat16().float()
    gb = g.bfloat16().float()
    if cls is BiMaskLinear:
        y_ref = xb @ wf.T + layer.bias.detach()
        dx_ref = gb @ wb
        dw_ref = gb.T @ xb
    else:
        y_ref = F.conv2d(xb, wf, layer.bias.detach())
        dx_ref = torch.nn.grad.conv2d_input(xb.shape, wb, gb)
        dw_ref = torch.nn.grad.conv2d_weight(xb, w.shape, gb)
    dw_ref = dw_ref + decay * (~mf) * w
    tol = dict(atol=0.05, rtol=0.02)
    torch.testing.assert_close(y.float(), y_ref, **tol)
    torch.testing.assert_close(x.grad, dx_ref, **tol)
    torch.testing.assert_close(layer.weight.grad, dw_ref, **tol)
    assert layer.bias.grad is not None
    torch.testing.assert_close(layer.bias.grad, g.sum(dim=(0, 2, 3) if g.dim() == 4 else 0), **tol)


def test_state_dict_loads_plain_checkpoint():
    plain = torch.nn.Linear(16, 8)
    layer = BiMaskLinear(16, 8)
    missing, unexpected = layer.load_state_dict(plain.state_dict(), strict=True)
    assert not missing and not unexpected
    assert torch.equal(layer.weight, plain.weight)
    assert PERMUTATION_KEY in layer.state_dict()


@pytest.mark.parametrize("layout", ["channels_last", "flat"])
def test_masks_are_contiguous_weight_shaped_tensors(layout):
    for layer in (BiMaskLinear(16, 8, group_layout=layout), BiMaskConv2d(8, 8, 3, group_layout=layout)):
        mf, mb = layer.compute_masks()
        assert mf.shape == mb.shape == layer.weight.shape
        assert mf.is_contiguous() and mb.is_contiguous()
        assert mf.view(-1).dtype == torch.bool


@pytest.mark.parametrize("cls,args,shape", [(BiMaskLinear, (16, 8), (4, 16)), (BiMaskConv2d, (8, 8, 3), (2, 8, 5, 5))])
def test_masks_follow_fused_optimizer_steps(cls, args, shape):
    """A fused optimizer updates the weights without bumping their version: masks must still follow."""
    torch.manual_seed(0)
    layer = cls(*args, mode="bimask")
    opt = torch.optim.AdamW(layer.parameters(), lr=0.5, fused=True)
    x = torch.randn(*shape)
    for _ in range(3):
        layer(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
    w = layer.weight.detach()
    mf = from_matrix(ref_nm_mask(to_matrix(w, "channels_last"), 2, 4), w.shape, "channels_last")
    assert torch.equal(layer.forward_mask, mf)
    ref = F.linear(x, w * mf, layer.bias) if cls is BiMaskLinear else F.conv2d(x, w * mf, layer.bias)
    torch.testing.assert_close(layer(x), ref)


def test_mask_work_runs_small_layers_on_one_thread_when_threads_sleep(monkeypatch):
    """With sleeping OpenMP threads (OMP_WAIT_POLICY=passive) waking them costs more than the mask
    kernels of a small layer: those run on one thread, and the thread count is restored afterwards,
    also when the work raises. Large layers, compiled graphs and spinning threads keep every thread."""
    import bimask_hf.functional as functional

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        small, large = torch.empty(8, 8), torch.empty(functional.SERIAL_MASK_NUMEL)
        monkeypatch.setattr(functional, "_threads_sleep", lambda: True)
        assert functional.mask_work(torch.get_num_threads, small) == 1
        assert torch.get_num_threads() == 2
        assert functional.mask_work(torch.get_num_threads, large) == 2
        assert functional.mask_work(torch.get_num_threads, small.to("meta")) == 2  # not CPU work

        def fail():
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            functional.mask_work(fail, small)
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert functional.mask_work(torch.get_num_threads, small) == 2
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
        monkeypatch.setattr(functional, "_threads_sleep", lambda: False)
        assert functional.mask_work(torch.get_num_threads, small) == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("policy,sleeps", [("PASSIVE", True), ("passive", True), ("ACTIVE", False), (None, False)])
def test_threads_sleep_reads_the_openmp_wait_policy(monkeypatch, policy, sleeps):
    import bimask_hf.functional as functional

    if policy is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    functional._threads_sleep.cache_clear()
    try:
        assert functional._threads_sleep() is sleeps
    finally:
        functional._threads_sleep.cache_clear()


def test_permutation_search_of_a_small_layer_runs_on_one_thread_when_threads_sleep(monkeypatch):
    """The refresh's search goes through the same one-thread rule as the mask work, and still stores
    the permutation it found (grouped convs: one search per conv group, offset to its rows)."""
    import bimask_hf.functional as functional
    import bimask_hf.layers as layers_mod

    seen = []
    real = layers_mod.search_permutation

    def recording(mf, n, m, **kwargs):
        seen.append(torch.get_num_threads())
        return real(mf, n, m, **kwargs).flip(0)  # a permutation the identity is not

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(functional, "_threads_sleep", lambda: True)
        monkeypatch.setattr(layers_mod, "search_permutation", recording)
        conv = BiMaskConv2d(16, 16, 3, padding=1, groups=2, n=2, m=4, mode="bimask")
        conv.refresh_permutation("identity")
        assert seen == [1, 1] and torch.get_num_threads() == 2
        assert conv.bimask_permutation.tolist() == list(range(7, -1, -1)) + list(range(15, 7, -1))
        monkeypatch.setattr(functional, "_threads_sleep", lambda: False)
        conv.refresh_permutation("identity")
        assert seen[2:] == [2, 2]
    finally:
        torch.set_num_threads(threads)
