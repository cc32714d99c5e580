"""Tests of the backward-mask permutation search (:mod:`bimask_hf.search`)."""

from __future__ import annotations

import pytest
import torch

from bimask_hf import search
from bimask_hf.search import METHODS, permutation_retention, search_permutation

PATTERNS = [(2, 4), (1, 4), (4, 8), (2, 8), (1, 16)]


def _forward_mask(rows: int, cols: int, n: int, m: int, seed: int = 0) -> torch.Tensor:
    """N:M top-|W| mask along columns of a seeded randn matrix (independent of bimask_hf.masks)."""
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    idx = weight.abs().reshape(rows, cols // m, m).topk(n, dim=-1).indices
    return torch.zeros(rows, cols // m, m, dtype=torch.bool).scatter_(-1, idx, True).reshape(rows, cols)


def _brute_force_retention(
    mask: torch.Tensor, weight: torch.Tensor, perm: list[int], n: int, m: int
) -> float:
    """Retention from the definition: per row group and column, keep the n largest |W*Mf|, AND Mf."""
    rows, cols = mask.shape
    kept = 0
    for start in range(0, rows, m):
        group = perm[start : start + m]
        for c in range(cols):
            scores = [(float(abs(weight[r, c])) if mask[r, c] else -1.0, -i) for i, r in enumerate(group)]
            ranked = sorted(range(m), key=lambda i: scores[i], reverse=True)[:n]
            kept += sum(1 for i in ranked if mask[group[i], c])
    return kept / int(mask.sum())


def _is_permutation(perm: torch.Tensor, rows: int) -> bool:
    return (
        perm.dtype == torch.long
        and perm.shape == (rows,)
        and torch.equal(perm.sort().values, torch.arange(rows))
    )


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8)])
def test_closed_form_matches_brute_force(n: int, m: int) -> None:
    rows, cols = 16, 32
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(3))
    idx = weight.abs().reshape(rows, cols // m, m).topk(n, dim=-1).indices
    mask = torch.zeros(rows, cols // m, m, dtype=torch.bool).scatter_(-1, idx, True).reshape(rows, cols)
    for seed in range(3):
        perm = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
        expected = _brute_force_retention(mask, weight, perm.tolist(), n, m)
        assert permutation_retention(mask, perm, n, m) == pytest.approx(expected, abs=1e-12)


def test_closed_form_matches_backward_mask() -> None:
    masks = pytest.importorskip("bimask_hf.masks")
    if not hasattr(masks, "backward_mask"):
        pytest.skip("bimask_hf.masks.backward_mask not available")
    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    mask = masks.nm_mask(weight, 2, 4)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(2))
    backward = masks.backward_mask(weight, mask, perm, 2, 4)
    assert permutation_retention(mask, perm, 2, 4) == pytest.approx(int(backward.sum()) / int(mask.sum()))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n,m", PATTERNS)
def test_methods_return_permutations_never_worse(method: str, n: int, m: int) -> None:
    rows = 64 if m < 16 else 128
    mask = _forward_mask(rows, 4 * m * 8, n, m)
    identity = permutation_retention(mask, torch.arange(rows), n, m)
    perm = search_permutation(
        mask, n, m, method, num_candidates=20, generator=torch.Generator().manual_seed(0)
    )
    assert _is_permutation(perm, rows)
    if method != "random_fresh":  # the paper's search: fresh candidates only (tests/test_paper.py)
        assert permutation_retention(mask, perm, n, m) >= identity


@pytest.mark.parametrize("method", ["random", "swap", "matched"])
def test_never_below_init(method: str) -> None:
    mask = _forward_mask(64, 576, 2, 4)
    init = search_permutation(mask, 2, 4, "matched", max_rounds=3)
    start = permutation_retention(mask, init, 2, 4)
    perm = search_permutation(
        mask, 2, 4, method, num_candidates=30, generator=torch.Generator().manual_seed(5), init=init
    )
    assert _is_permutation(perm, 64)
    assert permutation_retention(mask, perm, 2, 4) >= start


def test_random_with_one_candidate_is_init() -> None:
    mask = _forward_mask(32, 64, 2, 4)
    init = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(search_permutation(mask, 2, 4, "random", num_candidates=1, init=init), init)


@pytest.mark.parametrize("method", ["swap", "matched"])
def test_local_search_beats_random_by_margin(method: str) -> None:
    mask = _forward_mask(64, 576, 2, 4)
    identity = permutation_retention(mask, torch.arange(64), 2, 4)
    rand = search_permutation(mask, 2, 4, "random", 100, torch.Generator().manual_seed(0))
    local = search_permutation(mask, 2, 4, method, generator=torch.Generator().manual_seed(0))
    rand_gain = permutation_retention(mask, rand, 2, 4) - identity
    local_gain = permutation_retention(mask, local, 2, 4) - identity
    assert local_gain >= 2.0 * max(rand_gain, 0.003)
    assert local_gain > 0.012


def test_identity_method() -> None:
    mask = _forward_mask(16, 32, 2, 4)
    assert torch.equal(search_permutation(mask, 2, 4, "identity"), torch.arange(16))


@pytest.mark.parametrize("method", ["random", "swap", "matched"])
def test_deterministic_given_generator(method: str) -> None:
    mask = _forward_mask(64, 256, 2, 4)

    def run(seed: int) -> torch.Tensor:
        return search_permutation(mask, 2, 4, method, 50, torch.Generator().manual_seed(seed))

    assert torch.equal(run(7), run(7))
    if method == "random":  # the generator drives it
        assert not torch.equal(run(7), run(8))
    if method == "matched":  # documented to use no randomness: the generator must not matter
        assert torch.equal(run(7), run(8))


def test_all_ones_and_empty_masks() -> None:
    full = torch.ones(16, 32, dtype=torch.bool)
    empty = torch.zeros(16, 32, dtype=torch.bool)
    for method in METHODS:
        for mask in (full, empty):
            perm = search_permutation(mask, 2, 4, method, num_candidates=5)
            assert _is_permutation(perm, 16)
    assert permutation_retention(empty, torch.arange(16), 2, 4) == 1.0
    assert permutation_retention(full, torch.arange(16), 2, 4) == pytest.approx(0.5)


def test_errors() -> None:
    mask = _forward_mask(16, 32, 2, 4)
    with pytest.raises(ValueError, match="O % M"):
        search_permutation(mask[:14], 2, 4, "swap")
    with pytest.raises(ValueError, match="O % M"):
        permutation_retention(mask[:14], torch.arange(14), 2, 4)
    with pytest.raises(ValueError, match="identity, random, random_fresh, swap, matched"):
        search_permutation(mask, 2, 4, "swpa")
    with pytest.raises(ValueError, match="N:M"):
        search_permutation(mask, 5, 4)
    with pytest.raises(ValueError, match="shape"):
        search_permutation(mask, 2, 4, "swap", init=torch.arange(8))
    with pytest.raises(ValueError, match="num_candidates"):
        search_permutation(mask, 2, 4, "random", num_candidates=0)
    with pytest.raises(ValueError, match="permutation"):
        permutation_retention(mask, torch.arange(8), 2, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_device(method: str) -> None:
    mask = _forward_mask(64, 576, 2, 4).cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    perm = search_permutation(mask, 2, 4, method, 20, gen)
    assert perm.device.type == "cuda"
    assert _is_permutation(perm.cpu(), 64)
    cpu_mask = mask.cpu()
    cpu = search_permutation(cpu_mask, 2, 4, method, 20, torch.Generator().manual_seed(0))
    if method in ("identity", "matched"):  # no randomness: the same permutation on both devices
        assert torch.equal(perm.cpu(), cpu)
    else:  # CUDA and CPU generators differ: same quality, never below the identity
        identity = permutation_retention(cpu_mask, torch.arange(64), 2, 4)
        assert method == "random_fresh" or permutation_retention(cpu_mask, perm.cpu(), 2, 4) >= identity
        assert permutation_retention(cpu_mask, perm.cpu(), 2, 4) == pytest.approx(
            permutation_retention(cpu_mask, cpu, 2, 4), abs=0.01
        )


def _profiled_peak_bytes(fn) -> tuple[int, int]:
    """Peak of live CPU allocations while ``fn`` runs, and its largest single allocation, from the torch
    profiler's memory events (tracemalloc does not see torch's CPU allocator)."""
    with torch.profiler.profile(profile_memory=True) as prof:
        fn()
    steps = []
    for event in prof.events():
        if event.name == "[memory]":  # frees (negative) recorded on their own
            steps.append((event.time_range.start, event.cpu_memory_usage))
        elif event.self_cpu_memory_usage > 0:  # allocations, by the op that made them
            steps.append((event.time_range.start, event.self_cpu_memory_usage))
    live = peak = largest = 0
    for _, size in sorted(steps, key=lambda step: step[0]):
        live += size
        peak = max(peak, live)
        largest = max(largest, size)
    return peak, largest


@pytest.mark.parametrize(
    "rows,cols,m,bound",
    [(16384, 32, 4, None), (16384, 32, 4, 8 * 2**20), (4096, 2048, 4, None), (2048, 8192, 4, 8 * 2**20),
     (1024, 4096, 8, 8 * 2**20)],
    ids=["tall", "tall-tight", "wide", "wider-tight", "4:8-tight"],
)
def test_matched_scratch_bounded(monkeypatch, rows: int, cols: int, m: int, bound: int | None) -> None:
    if bound is not None:  # a tighter bound: more, smaller chunks (and smaller blocks on wide layers)
        monkeypatch.setattr(search, "GAIN_CHUNK_BYTES", bound)
    mask = _forward_mask(rows, cols, 2, m)
    peak, largest = _profiled_peak_bytes(lambda: search_permutation(mask, 2, m, "matched", max_rounds=1))
    inputs = 2 * rows * cols + 64 * rows  # the permuted bool and int8 copies of the mask, permutation, indices
    assert peak <= search.GAIN_CHUNK_BYTES + inputs, f"peak scratch {peak / 2**20:.1f} MiB"
    if rows * rows > search.GAIN_CHUNK_BYTES:  # no O x O int8 matrix where one alone would pass the bound
        assert largest < rows * rows


@pytest.mark.parametrize("rows", [1024, 4096, 16384])
@pytest.mark.parametrize("m", [2, 4, 8, 16])
@pytest.mark.parametrize("cols", [16, 4608])
def test_matched_block_and_chunk_sizes_fit_the_bound(rows: int, m: int, cols: int) -> None:
    groups = rows // m
    block_groups = search._block_groups(groups, cols, m)
    chunk = search._block_chunk(block_groups * m, cols, m)
    assert 2 <= block_groups <= max(2, min(groups, search._BLOCK_ROWS // m))
    assert chunk >= 1
    assert chunk * search._block_scratch_bytes(block_groups * m, cols, m) <= search.GAIN_CHUNK_BYTES
    assert block_groups * m < rows or rows * rows * 16 <= search.GAIN_CHUNK_BYTES


@pytest.mark.parametrize("groups,block_groups", [(18, 4), (64, 8), (16, 16), (7, 3)])
def test_block_layouts_partition_the_groups(groups: int, block_groups: int) -> None:
    seen = []
    for round_index in range(6):
        layout = search._block_layout(groups, block_groups, round_index, torch.device("cpu"))
        assert layout.shape[1] <= block_groups
        real = layout[layout >= 0]
        assert torch.equal(real.sort().values, torch.arange(groups))  # every group in exactly one block
        assert int((layout < 0).sum()) < layout.shape[0]  # padding: less than one per block
        seen.append(layout)
    if groups > block_groups:  # groups meet new partners: the layouts differ between rounds
        assert any(not torch.equal(seen[0], other) for other in seen[1:3])
        assert not torch.equal(seen[1], seen[2])


@pytest.mark.parametrize("rows,n,m", [(72, 2, 4), (64, 4, 8), (96, 1, 4)])
def test_matched_chunking_does_not_change_the_result(monkeypatch, rows: int, n: int, m: int) -> None:
    monkeypatch.setattr(search, "_BLOCK_ROWS", 4 * m)  # blocks of 4 groups (and padding) on a small mask
    mask = _forward_mask(rows, 96, n, m)
    start = torch.arange(rows)
    whole = search._matched_search(mask, start, n, m, rounds=20, chunk_blocks=10_000)
    one_by_one = search._matched_search(mask, start, n, m, rounds=20, chunk_blocks=1)
    pairs = search._matched_search(mask, start, n, m, rounds=20, chunk_blocks=2)
    assert torch.equal(whole, one_by_one) and torch.equal(whole, pairs)
    assert _is_permutation(whole, rows)
    assert permutation_retention(mask, whole, n, m) > permutation_retention(mask, start, n, m)


def test_matched_on_a_tall_layer_keeps_the_all_pairs_quality(monkeypatch) -> None:
    rows, cols = 1024, 256  # 256 groups: four candidate blocks per round
    mask = _forward_mask(rows, cols, 2, 4)
    identity = permutation_retention(mask, torch.arange(rows), 2, 4)
    rand = search_permutation(mask, 2, 4, "random", 100, torch.Generator().manual_seed(0))
    blocked = search_permutation(mask, 2, 4, "matched")
    monkeypatch.setattr(search, "_BLOCK_ROWS", rows)  # one block: every swap between all groups scored
    all_pairs = search_permutation(mask, 2, 4, "matched")
    rand_gain, blocked_gain, all_pairs_gain = (
        permutation_retention(mask, p, 2, 4) - identity for p in (rand, blocked, all_pairs)
    )
    assert blocked_gain >= 5.0 * max(rand_gain, 0.002)
    assert blocked_gain >= 0.95 * all_pairs_gain > 0


@pytest.mark.parametrize("n,m,groups,block_groups", [(2, 4, 7, 3), (1, 4, 6, 6), (3, 8, 5, 2), (5, 16, 3, 3)])
def test_block_swap_gains_match_brute_force(n: int, m: int, groups: int, block_groups: int) -> None:
    rows, cols = groups * m, 3 * m
    mask = _forward_mask(rows, cols, n, m, seed=4)
    total = int(mask.sum())
    layout = search._block_layout(groups, block_groups, 1, torch.device("cpu"))
    valid = layout >= 0
    index = (layout.clamp(min=0).unsqueeze(2) * m + torch.arange(m)).reshape(layout.shape[0], -1)
    block_rows = mask.to(torch.int8)[index] * valid.repeat_interleave(m, dim=1).unsqueeze(2)
    best_gain, best = search._block_swap_gains(block_rows, valid, n, m)
    base = permutation_retention(mask, torch.arange(rows), n, m)
    for b, members in enumerate(layout.tolist()):
        for i, g in enumerate(members):
            for j, h in enumerate(members):
                if g < 0 or h < 0 or g == h:
                    assert best_gain[b, i, j] == -1
                    continue
                gains = []
                for a_row in range(m):
                    for b_row in range(m):
                        perm = torch.arange(rows)
                        perm[[g * m + a_row, h * m + b_row]] = perm[[h * m + b_row, g * m + a_row]]
                        gains.append(round((permutation_retention(mask, perm, n, m) - base) * total))
                assert best_gain[b, i, j] == max(gains)
                assert gains[int(best[b, i, j])] == max(gains)




def test_matched_blocked_layers_stop_at_their_own_tolerance(monkeypatch) -> None:
    tall = _forward_mask(512, 64, 2, 4)  # two blocks
    small = _forward_mask(64, 576, 2, 4)  # one block
    before = {
        "tall": search_permutation(tall, 2, 4, "matched"),
        "small": search_permutation(small, 2, 4, "matched"),
    }
    monkeypatch.setattr(search, "BLOCKED_TOLERANCE", 1.0)  # no round gains |Mf|: stop after the first
    assert torch.equal(search_permutation(tall, 2, 4, "matched"), search_permutation(tall, 2, 4, "matched", max_rounds=1))
    assert not torch.equal(before["tall"], search_permutation(tall, 2, 4, "matched", max_rounds=1))
    assert torch.equal(search_permutation(small, 2, 4, "matched"), before["small"])  # one block: DEFAULT_TOLERANCE


def test_block_swap_gains_do_not_overflow_at_large_m_and_k() -> None:
    # M=64 encodes the swap index in 12 bits; a full row moving into an empty group gains K = 2^19 + 64,
    # so the encoded score K * 2^12 passes 2^31
    n, m, cols = 32, 64, 2**19 + 64
    rows = torch.zeros(1, 2 * m, cols, dtype=torch.int8)
    rows[0, :m] = 1  # group 0 full (it keeps n per column either way), group 1 empty
    gain, best = search._block_swap_gains(rows, torch.ones(1, 2, dtype=torch.bool), n, m)
    assert gain[0].tolist() == [[-1, cols], [cols, -1]]  # every swap moves one 1 into every column of group 1
    assert best[0, 0, 1] == 0 and best[0, 1, 0] == 0  # ties: the first swap


@pytest.mark.parametrize(
    "rows,cols,n,m,rounds",
    [(32, 48, 2, 4, None), (128, 32, 2, 4, 4), (32, 32, 3, 8, None), (32, 32, 2, 16, None)],
    ids=["one-block-splits", "blocks", "3:8-int8-scaling", "2:16-int32-scaling"],
)
def test_int8_and_float_matmul_paths_give_identical_permutations(monkeypatch, rows, cols, n, m, rounds) -> None:
    # (torch._int_mm costs milliseconds per call even on tiny operands where the CPU lacks VNNI: few rounds)
    monkeypatch.setattr(search, "_BLOCK_ROWS", 32)  # several candidate blocks on the 128-row mask
    calls = []
    int_mm = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda *a, **k: calls.append(1) or int_mm(*a, **k))
    mask = _forward_mask(rows, cols, n, m, seed=rows + cols)
    found = {}
    for path in ("int8", "float"):
        calls.clear()
        with search.matmul_path(path):
            found[path] = search_permutation(mask, n, m, "matched", max_rounds=rounds)
        assert bool(calls) == (path == "int8")  # the forced path is the one that ran
    assert torch.equal(found["int8"], found["float"])
    assert permutation_retention(mask, found["float"], n, m) > permutation_retention(mask, torch.arange(rows), n, m)


@pytest.mark.parametrize(
    "rows,cols,n,m,kept,checksum",
    [
        (64, 576, 2, 4, 15423, 62817),  # one block, re-splits
        (1536, 384, 2, 4, 251117, 1004107420),  # six blocks
        (256, 96, 1, 4, 4935, 4669586),
        (128, 64, 4, 8, 3763, 558830),
    ],
)
def test_default_search_permutations_are_pinned(rows, cols, n, m, kept, checksum) -> None:
    """The default search's permutations on fixed masks: docs/benchmarks.md's retention figures are theirs,
    so a change that is meant to be faster only must leave them as they are (else redo the figures)."""
    mask = _forward_mask(rows, cols, n, m)
    perm = search_permutation(mask, n, m, "matched")
    assert round(permutation_retention(mask, perm, n, m) * int(mask.sum())) == kept
    assert int((perm * torch.arange(rows)).sum()) == checksum


@pytest.mark.parametrize("faster", [True, False])
def test_default_matmul_path_is_the_measured_faster_one(monkeypatch, faster: bool) -> None:
    threads = torch.get_num_threads()
    assert isinstance(search._int8_matmul_faster.__wrapped__(), bool)  # the real timing (on one thread)
    assert torch.get_num_threads() == threads  # ... gives the caller its thread count back
    monkeypatch.setattr(search, "_int8_matmul_faster", lambda: faster)
    calls = []
    int_mm = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda *a, **k: calls.append(1) or int_mm(*a, **k))
    search_permutation(_forward_mask(64, 32, 2, 4), 2, 4, "matched", max_rounds=1)
    assert bool(calls) == faster


def test_float_matmul_counts_stay_exact_past_float32_integers() -> None:
    # 4096 products of up to 127 * 127 sum past 2^24, where float32 stops holding every integer
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 128, (8, 4096), generator=gen, dtype=torch.int8)
    b = torch.randint(0, 128, (4096, 8), generator=gen, dtype=torch.int8)
    exact = a.long() @ b.long()
    assert int(exact.max()) > 2**24
    bound = 4096 * 127 * 127
    with search.matmul_path("float"):
        assert search._exact_operands(a, 2**24).dtype == torch.float32
        product = search._mm_exact(search._exact_operands(a, bound), search._exact_operands(b, bound))
        assert torch.equal(product.long(), exact)
    with search.matmul_path("int8"):
        assert search._exact_operands(a, bound).dtype == torch.int8
    with pytest.raises(ValueError, match="int8"):
        search.matmul_path("int4").__enter__()


@pytest.mark.parametrize("rows", [1, 2, 7, 64])
def test_gram_of_zero_one_rows_is_exact_on_both_paths(rows) -> None:
    """The re-split scores' joint histograms: ``a @ a.T``, the float path building it from three quadrants."""
    gen = torch.Generator().manual_seed(rows)
    a = (torch.rand(rows, 300, generator=gen) < 0.4).to(torch.int8)
    exact = a.long() @ a.long().T
    for path in ("int8", "float"):
        with search.matmul_path(path):
            assert torch.equal(search._gram01(a).long(), exact), path
