"""N:M compression: bit-exact round trips, index packing, file format, size, errors, semi-structured."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from bimask_hf.compression import (
    compress_nm,
    decompress_nm,
    index_bits,
    load_nm_safetensors,
    save_nm_safetensors,
    to_semi_structured,
)
from bimask_hf.errors import NMPatternError
from bimask_hf.inspection import check_nm
from bimask_hf.masks import nm_mask_for_weight as nm_forward_mask

_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT_VIEW[t.dtype])


def _nm_weight(shape, n, m, dtype=torch.float32, layout="channels_last", seed=0) -> torch.Tensor:
    """A random N:M weight whose pruned entries are +0.0, with extra exact zeros among the kept ones."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen).to(dtype)
    w = torch.where(nm_forward_mask(w, n, m, layout), w, torch.zeros_like(w))
    w.view(-1)[::5] = 0.0  # groups with fewer than N nonzeros (and some all-zero groups)
    return w


PATTERNS = [(2, 4), (1, 4), (4, 8), (1, 16), (2, 8), (1, 2), (3, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("shape,layout", [((48, 64), "channels_last"), ((32, 16, 3, 3), "channels_last"), ((32, 16, 3, 3), "flat")])
def test_round_trip_is_bit_exact(dtype, n, m, shape, layout):
    w = _nm_weight(shape, n, m, dtype, layout)
    packed = compress_nm(w, n, m, layout)
    rows, cols = shape[0], w[0].numel()
    assert packed["values"].shape == (rows, cols // m * n) and packed["values"].dtype == dtype
    assert packed["indices"].dtype == torch.uint8
    assert packed["indices"].shape == (rows, -(-cols // m * n * index_bits(m) // 8))
    restored = decompress_nm(packed, w.shape, n, m, layout)
    assert restored.dtype == dtype and restored.shape == w.shape
    assert torch.equal(_bits(restored), _bits(w))


def test_groups_with_ties_and_all_zeros_round_trip():
    # Equal magnitudes, +-x ties, all-zero groups and a group with one nonzero: still exactly N slots.
    w = torch.tensor(
        [
            [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, -2.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0],
            [0.5, 0.0, 0.0, -0.5, 0.0, 0.25, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 7.0, 0.0, 0.0, 0.0],
        ]
    )
    packed = compress_nm(w, 2, 4)
    assert packed["values"].shape == (4, 4)
    assert torch.equal(_bits(decompress_nm(packed, w.shape, 2, 4)), _bits(w))
    # Deterministic slot choice: in an all-zero group the lowest columns are used.
    again = compress_nm(w.clone(), 2, 4)
    assert torch.equal(again["indices"], packed["indices"]) and torch.equal(again["values"], packed["values"])


def test_negative_zero_kept_when_a_slot_is_free():
    w = torch.tensor([[0.0, -0.0, 0.0, 3.0]])
    restored = decompress_nm(compress_nm(w, 2, 4), w.shape, 2, 4)
    assert torch.equal(_bits(restored), _bits(w))  # -0.0 took the second slot instead of a +0.0


@pytest.mark.parametrize("m,bits", [(1, 1), (2, 1), (4, 2), (8, 4), (16, 4), (32, 8), (256, 8)])
def test_index_bits(m, bits):
    assert index_bits(m) == bits


def test_index_bits_rejects_large_m():
    with pytest.raises(ValueError, match="M <= 256"):
        index_bits(512)


def test_two_four_fp16_is_056_of_dense(tmp_path):
    w = _nm_weight((256, 1024), 2, 4, torch.float16)
    packed = compress_nm(w, 2, 4)
    stored = sum(t.numel() * t.element_size() for t in packed.values())
    assert stored / (w.numel() * w.element_size()) == pytest.approx(0.5625)
    dense_file, nm_file = tmp_path / "dense.safetensors", tmp_path / "nm.safetensors"
    save_file({"layer.weight": w}, str(dense_file))
    sizes = save_nm_safetensors({"layer.weight": w}, nm_file, ["layer.weight"], 2, 4)
    assert sizes["stored_bytes"] / sizes["dense_bytes"] == pytest.approx(0.5625)
    assert os.path.getsize(nm_file) / os.path.getsize(dense_file) == pytest.approx(0.5625, abs=0.01)


def test_file_round_trip_with_dense_tensors_and_metadata(tmp_path):
    state = {
        "conv.weight": _nm_weight((16, 8, 3, 3), 2, 4, torch.bfloat16, "flat"),
        "conv.bias": torch.randn(16).to(torch.bfloat16),
        "fc.weight": torch.randn(10, 32),  # dense layer stays as is
        "bn.num_batches_tracked": torch.tensor(3),
    }
    path = tmp_path / "model.nm.safetensors"
    save_nm_safetensors(state, path, ["conv.weight"], 2, 4, "flat")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert {"conv.weight.nm_values", "conv.weight.nm_indices", "fc.weight"} <= set(f.keys())
        assert "conv.weight" not in f.keys()
    assert (meta["n"], meta["m"], meta["group_layout"], meta["index_bits"]) == ("2", "4", "flat", "2")
    loaded = load_nm_safetensors(path)
    assert set(loaded) == set(state)
    for key, tensor in state.items():
        assert loaded[key].dtype == tensor.dtype
        assert torch.equal(loaded[key], tensor), key
    assert torch.equal(_bits(loaded["conv.weight"]), _bits(state["conv.weight"]))
    check_nm(loaded, 2, 4, layers=["conv"], group_layout="flat")


def test_not_nm_raises_nm_pattern_error():
    w = torch.randn(8, 16)
    with pytest.raises(NMPatternError, match="row 0, column group 0 has 4 nonzeros"):
        compress_nm(w, 2, 4)


def test_k_not_divisible_by_m():
    with pytest.raises(ValueError, match="K % M == 0"):
        compress_nm(torch.zeros(4, 6), 2, 4)


def test_invalid_pattern():
    with pytest.raises(ValueError, match="1 <= N <= M"):
        compress_nm(torch.zeros(4, 8), 5, 4)


def test_decompress_validates_shapes():
    packed = compress_nm(_nm_weight((8, 16), 2, 4), 2, 4)
    with pytest.raises(ValueError, match="values has shape"):
        decompress_nm(packed, (8, 32), 2, 4)
    bad = dict(packed, indices=packed["indices"][:, :1])
    with pytest.raises(ValueError, match="indices must be uint8"):
        decompress_nm(bad, (8, 16), 2, 4)


def test_load_rejects_plain_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not an N:M-compressed"):
        load_nm_safetensors(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error; CUDA machines run the GPU test")
def test_semi_structured_needs_cuda():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        to_semi_structured(nn.Sequential(nn.Linear(64, 64)))


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
    reason="torch.sparse.to_sparse_semi_structured needs a CUDA GPU with compute capability >= 8.0",
)
def test_semi_structured_matches_dense_on_cuda():
    from torch.sparse import SparseSemiStructuredTensor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64)).half().cuda().eval()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.mul_(nm_forward_mask(layer.weight, 2, 4))
    x = torch.randn(64, 128, dtype=torch.half, device="cuda")
    with torch.no_grad():
        expected = model(x)
        converted = to_semi_structured(model)
        got = model(x)
    assert converted == ["0", "2"]
    assert isinstance(model[0].weight, SparseSemiStructuredTensor)
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)
