"""``preset="paper"``: the paper's released algorithm (docs/method.md, "The paper preset") against loop
references written from that description (tests/reference.py), on every mask path."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import bimask_hf as bh
from bimask_hf.masks import backward_mask_for_weight, nm_mask_for_weight, permutation_retention

from .reference import ref_paper_backward_mask, ref_paper_forward_mask

# Linear, a 3x3 conv (K = 144) and a CIFAR stem (K = 27: groups of M run across rows)
SHAPES = [(16, 48), (16, 16, 3, 3), (16, 3, 3, 3)]
STEP_DTYPE = {"kernels": torch.uint8, "tensor-ops": torch.bool, "graph": torch.float32}


def _tie_heavy(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Integer weights in -3..3: most groups hold equal |W|, and some kept entries are exact zeros."""
    return torch.randint(-3, 4, shape, generator=torch.Generator().manual_seed(seed)).float()


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
@pytest.mark.parametrize("shape", SHAPES, ids=["linear", "conv", "stem"])
@pytest.mark.parametrize("path", ["kernels", "tensor-ops", "graph"])
def test_paper_tie_order_masks_equal_the_reference(mask_path, n, m, shape, path):
    """Mf and Mb with tie_break="high" in the flat layout are bit-identical to the paper's ranking (stable
    ascending sort, drop the first M - N; Mb ranks |W * Mf|) on the C-kernel, tensor-op and graph paths."""
    w = _tie_heavy(shape, n * 100 + m)
    perm = torch.randperm(shape[0], generator=torch.Generator().manual_seed(m))
    calls = mask_path(path)
    dtype = STEP_DTYPE[path]
    mf = nm_mask_for_weight(w, n, m, "flat", dtype=dtype, tie_break="high")
    mb = backward_mask_for_weight(w, mf, perm, n, m, dtype=dtype, tie_break="high")
    ref_mf = ref_paper_forward_mask(w, n, m)
    ref_mb = ref_paper_backward_mask(w, ref_mf, perm.tolist(), n, m)
    assert torch.equal(mf.bool(), ref_mf)
    assert torch.equal(mb.bool(), ref_mb)
    # the default order differs on these weights: the test would notice a path ignoring tie_break
    assert not torch.equal(nm_mask_for_weight(w, n, m, "flat"), ref_mf)
    if path == "kernels":
        assert {"forward_mask", "backward_mask"} <= set(calls)


def test_public_mask_functions_take_the_tie_order():
    w = torch.ones(4, 8)
    assert bh.nm_mask(w, 2, 4, tie_break="high")[:, [2, 3, 6, 7]].all()
    assert bh.nm_mask(w, 2, 4)[:, [0, 1, 4, 5]].all()
    # a kept exact zero ties with a pruned entry (both score 0 in |W * Mf|): the later row keeps the place
    # (row 0 keeps its zeros in columns 2 and 3, where the pruned rows 1-3 also score 0)
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    mf = bh.nm_mask(w, 2, 4, tie_break="high")
    mb = bh.backward_mask(w, mf, torch.arange(4), 2, 4, tie_break="high")
    assert torch.equal(mb, ref_paper_backward_mask(w, mf, [0, 1, 2, 3], 2, 4))
    assert bh.retention(mf, mb) == 0.5  # the default keeps the zeros: 0.75
    assert bh.retention(mf, bh.backward_mask(w, mf, torch.arange(4), 2, 4)) == 0.75
    for n, m in ((3, 32), (5, 64)):  # beyond the ranked sizes: a stable sort
        v = _tie_heavy((4, 64), m)
        assert torch.equal(bh.nm_mask(v, n, m, tie_break="high"), ref_paper_forward_mask(v, n, m))
    with pytest.raises(ValueError, match="tie_break"):
        bh.nm_mask(w, 2, 4, tie_break="upper")


def test_preset_sets_the_paper_algorithm_and_refuses_conflicts():
    config = bh.BiMaskConfig(preset="paper")
    assert (config.group_layout, config.tie_break, config.permutation_search) == ("flat", "high", "random_fresh")
    assert config.num_permutations == 10 and config.decay_per_sample is True
    assert bh.BiMaskConfig.from_dict(config.to_dict()) == config
    assert bh.BiMaskConfig(preset="paper", num_permutations=100).num_permutations == 100  # its ImageNet flag
    assert bh.BiMaskConfig(preset="paper", group_layout="flat").group_layout == "flat"  # agreeing is fine
    default = bh.BiMaskConfig()
    assert (default.group_layout, default.tie_break, default.permutation_search) == ("channels_last", "low", "matched")
    assert default.num_permutations == 100 and default.decay_per_sample is False and default.sparse_stem is False
    for key, value in (("group_layout", "channels_last"), ("tie_break", "low"), ("permutation_search", "matched"),
                       ("decay_per_sample", False), ("sparse_stem", True)):
        with pytest.raises(ValueError, match=rf"preset='paper' sets {key}=.*but {key}={value!r}"):
            bh.BiMaskConfig(preset="paper", **{key: value})
    with pytest.raises(ValueError, match="preset"):
        bh.BiMaskConfig(preset="papers")


def test_cli_preset_flag_and_conflict():
    from transformers import HfArgumentParser

    from bimask_hf.trainer import BiMaskTrainingArguments

    parser = HfArgumentParser(BiMaskTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", "/tmp/unused", "--preset", "paper", "--greedy_num", "100"])
    assert args.bimask_config.tie_break == "high" and args.bimask_config.num_permutations == 100
    with pytest.raises(ValueError, match="group_layout"):
        parser.parse_args_into_dataclasses(["--output_dir", "/tmp/unused", "--preset", "paper",
                                            "--group_layout", "channels_last"])


def test_random_fresh_does_not_keep_the_current_permutation():
    """The paper's search keeps the best of G fresh candidates, even when the current one was better."""
    mf = torch.zeros(8, 16, dtype=torch.bool)
    mf[:4, :8] = True  # rows 0-3 own columns 0-7, rows 4-7 columns 8-15
    mf[4:, 8:] = True
    best = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])  # every group mixes both halves: retention 1.0 at 2:4
    assert permutation_retention(mf, best, 2, 4) == 1.0
    kept = bh.search_permutation(mf, 2, 4, "random", 3, torch.Generator().manual_seed(0), init=best)
    assert torch.equal(kept, best)
    fresh = bh.search_permutation(mf, 2, 4, "random_fresh", 3, torch.Generator().manual_seed(0), init=best)
    assert sorted(fresh.tolist()) == list(range(8)) and not torch.equal(fresh, best)
    draws = [bh.search_permutation(mf, 2, 4, "random_fresh", 1, torch.Generator().manual_seed(s), init=best)
             for s in range(4)]
    assert min(permutation_retention(mf, p, 2, 4) for p in draws) < 1.0


def _cifar_like(stem_kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 16, stem_kernel, padding=stem_kernel // 2, bias=False), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.Flatten(), nn.LazyLinear(10))


def test_preset_sparsifies_3x3_stems_across_rows_and_keeps_7x7_stems_dense():
    torch.manual_seed(0)
    model = _cifar_like(3)
    model(torch.randn(1, 3, 8, 8))
    bh.sparsify(model, bh.BiMaskConfig(preset="paper"))
    stem = model[0]
    assert isinstance(stem, bh.BiMaskConv2d)  # K = 27: groups of 4 run across rows, as the paper's N:M conv
    mf = stem.forward_mask
    assert torch.equal(mf, ref_paper_forward_mask(stem.weight, 2, 4))
    assert bh.check_nm(model, 2, 4, group_layout="flat")
    default = _cifar_like(3)
    default(torch.randn(1, 3, 8, 8))
    bh.sparsify(default, bh.BiMaskConfig())
    assert not isinstance(default[0], bh.BiMaskConv2d)
    imagenet_like = _cifar_like(7)
    imagenet_like(torch.randn(1, 3, 8, 8))
    bh.sparsify(imagenet_like, bh.BiMaskConfig(preset="paper"))
    assert not isinstance(imagenet_like[0], bh.BiMaskConv2d) and isinstance(imagenet_like[2], bh.BiMaskConv2d)


@pytest.mark.parametrize("path", ["kernels", "tensor-ops"])
def test_paper_linear_gradients_follow_the_formulas(mask_path, path):
    """Under the preset a Linear on (B, T, C) inputs: dL/dx = g (W * Mb), dL/dW = g^T x + B * decay *
    (1 - Mf) * W (the decay once per sample, as the paper's DeiT code), with the paper's masks."""
    mask_path(path)
    config = bh.BiMaskConfig(preset="paper", decay=0.01)
    layer = bh.BiMaskLinear.from_dense(nn.Linear(16, 8, bias=False), config)
    with torch.no_grad():
        layer.weight.copy_(_tie_heavy((8, 16), 3))
    perm = torch.tensor([3, 6, 0, 5, 1, 7, 2, 4])
    getattr(layer, bh.layers.PERMUTATION_KEY).copy_(perm)
    x = torch.randn(5, 3, 16, requires_grad=True)
    g = torch.randn(5, 3, 8)
    layer(x).backward(g)
    w = layer.weight.detach()
    mf = ref_paper_forward_mask(w, 2, 4)
    mb = ref_paper_backward_mask(w, mf, perm.tolist(), 2, 4)
    torch.testing.assert_close(x.grad, g @ (w * mb))
    expected = g.reshape(-1, 8).T @ x.detach().reshape(-1, 16) + 5 * 0.01 * (~mf) * w
    torch.testing.assert_close(layer.weight.grad, expected)


def test_compiled_paper_layer_gives_the_formula_gradients():
    """Under torch.compile (AOT autograd) the preset's tie order reaches the graph's masks: input and weight
    gradients of a tie-heavy Linear equal the formulas with the reference masks."""
    config = bh.BiMaskConfig(preset="paper", decay=0.0)
    layer = bh.BiMaskLinear.from_dense(nn.Linear(16, 8, bias=False), config)
    with torch.no_grad():
        layer.weight.copy_(_tie_heavy((8, 16), 5))
    perm = torch.tensor([5, 2, 7, 0, 4, 1, 6, 3])
    getattr(layer, bh.layers.PERMUTATION_KEY).copy_(perm)
    x = torch.randn(6, 16, requires_grad=True)
    g = torch.randn(6, 8)
    out = torch.compile(layer, backend="aot_eager")(x)
    out.backward(g)
    w = layer.weight.detach()
    mf = ref_paper_forward_mask(w, 2, 4)
    mb = ref_paper_backward_mask(w, mf, perm.tolist(), 2, 4)
    torch.testing.assert_close(out, x.detach() @ (w * mf).T)
    torch.testing.assert_close(x.grad, g @ (w * mb))
