"""The eager CPU C kernels: built on demand, switched off cleanly, and exactly the tensor-op masks."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bimask_hf import BiMaskConv2d, BiMaskLinear, kernels
from bimask_hf.masks import backward_mask_for_weight, nm_mask_for_weight

from .reference import from_matrix, ref_backward_mask, ref_nm_mask, to_matrix

pytestmark = pytest.mark.skipif(kernels._compiler() is None, reason="no C compiler here")


@pytest.fixture
def fresh_library():
    """Forget the loaded library before and after, so a test's environment decides how it is built."""
    kernels._library.cache_clear()
    yield
    kernels._library.cache_clear()


def test_kernels_build_into_the_cache_dir_and_switch_off(tmp_path, monkeypatch, fresh_library):
    monkeypatch.setenv("BIMASK_HF_CACHE", str(tmp_path))
    assert kernels.available()
    assert len(list(tmp_path.glob("nm_masks-*.so"))) == 1
    w = torch.randn(8, 16)
    assert kernels.applies(w, 4) and not kernels.applies(w.double(), 4) and not kernels.applies(w.T, 4)
    assert not kernels.applies(w, 32)  # groups of more than 16: tensor ops
    assert not kernels.applies(w, 4, spread=kernels.MAX_SPREAD + 1)  # conv groups too far apart
    with kernels.disabled():
        assert not kernels.applies(w, 4)
    assert kernels.applies(w, 4)

    kernels._library.cache_clear()
    monkeypatch.setenv("BIMASK_HF_KERNELS", "0")
    assert not kernels.available() and not kernels.applies(w, 4)
    assert torch.equal(nm_mask_for_weight(w, 2, 4, dtype=torch.uint8).bool(), ref_nm_mask(w, 2, 4))


@pytest.mark.parametrize("compiler", ["failing", "CC=/nonexistent", "none-on-PATH"])
def test_a_missing_or_failing_compiler_warns_once_with_the_fix(tmp_path, monkeypatch, caplog, fresh_library, compiler):
    monkeypatch.setenv("BIMASK_HF_CACHE", str(tmp_path))
    if compiler == "failing":
        monkeypatch.setenv("CC", shutil.which("false"))  # a "compiler" that always fails
    elif compiler == "CC=/nonexistent":
        monkeypatch.setenv("CC", "/nonexistent")
    else:
        monkeypatch.delenv("CC", raising=False)
        monkeypatch.setenv("PATH", str(tmp_path))  # no cc, gcc or clang anywhere
    w = torch.randn(8, 16)
    with caplog.at_level(logging.INFO, logger="bimask_hf.kernels"):
        for _ in range(3):
            assert not kernels.available()
            assert torch.equal(nm_mask_for_weight(w, 2, 4, dtype=torch.uint8).bool(), ref_nm_mask(w, 2, 4))
    (record,) = caplog.records  # once per process, at WARNING, naming the fix
    assert record.levelno == logging.WARNING
    assert "tensor ops" in record.message and "install a C compiler (e.g. gcc) or point CC at one" in record.message
    assert {"failing": "could not build or load", "CC=/nonexistent": "CC=/nonexistent is not an executable",
            "none-on-PATH": "no C compiler found"}[compiler] in record.message
    assert not list(tmp_path.glob("*.so"))  # no half-written library left behind


def test_the_cache_key_covers_the_compiler_version_and_flags(tmp_path, monkeypatch, fresh_library):
    """A compiler upgraded in place (same path, new ``--version``) or other flags build a new library."""
    real_cc = kernels._compiler()
    wrapper = tmp_path / "bin" / "cc"
    wrapper.parent.mkdir()

    def install(version: str) -> None:
        wrapper.write_text(f'#!/bin/sh\n[ "$1" = --version ] && {{ echo "{version}"; exit 0; }}\nexec {real_cc} "$@"\n')
        wrapper.chmod(0o755)

    cache = tmp_path / "cache"
    monkeypatch.setenv("BIMASK_HF_CACHE", str(cache))
    monkeypatch.setenv("CC", str(wrapper))
    built = []
    for version, flags in (("cc 1.0", None), ("cc 1.0", None), ("cc 2.0", None), ("cc 2.0", ("-DANOTHER_FLAG",))):
        install(version)
        if flags:
            monkeypatch.setattr(kernels, "_FLAGS", kernels._FLAGS + flags)
        kernels._library.cache_clear()
        assert kernels.available()
        built.append(sorted(p.name for p in cache.glob("nm_masks-*.so")))
    assert [len(names) for names in built] == [1, 1, 2, 3]  # the same compiler twice reuses its library


def _tensor_op_masks(fn, *args, **kwargs):
    with kernels.disabled():
        return fn(*args, **kwargs)


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (3, 4), (4, 8), (5, 16)])
@pytest.mark.parametrize("shape,layout", [((32, 48), "channels_last"), ((16, 16, 3, 3), "channels_last"),
                                          ((16, 16, 3, 3), "flat"), ((16, 16, 1, 1), "channels_last")])
def test_kernels_give_the_tensor_op_masks_on_edge_values(n, m, shape, layout):
    """Signed zeros, exact ties, infinities and NaNs: the kernels compare as the tensor ops do."""
    gen = torch.Generator().manual_seed(n + 10 * m)
    w = torch.randint(-2, 3, shape, generator=gen).float()
    flat = w.view(-1)
    picks = torch.randperm(flat.numel(), generator=gen)
    flat[picks[:7]] = -0.0
    flat[picks[7:11]] = float("inf")
    flat[picks[11:14]] = float("-inf")
    flat[picks[14:17]] = float("nan")
    rows = shape[0] if shape[0] % m == 0 else None
    perm = torch.randperm(shape[0], generator=gen)
    assert kernels.applies(w, m)
    for dtype in (torch.uint8, torch.bool):
        mf = nm_mask_for_weight(w, n, m, layout, dtype=dtype)
        assert torch.equal(mf, _tensor_op_masks(nm_mask_for_weight, w, n, m, layout, dtype=dtype))
        if rows:
            mb = backward_mask_for_weight(w, mf, perm, n, m, dtype=dtype)
            ref = _tensor_op_masks(backward_mask_for_weight, w, mf, perm, n, m, dtype=dtype)
            finite = torch.isfinite(w)  # the tensor ops give inf * 0 = NaN for a pruned infinity: no rule to share
            assert torch.equal(mb[finite], ref[finite])


def test_conv_groups_spread_wider_than_the_kernel_plane_take_tensor_ops():
    """A 17x17 conv's groups are 289 entries apart, more than the kernels' 256-entry planes hold."""
    w = torch.randn(8, 8, 17, 17, generator=torch.Generator().manual_seed(0))
    assert 17 * 17 > kernels.MAX_SPREAD
    mf = nm_mask_for_weight(w, 2, 4, dtype=torch.uint8)
    ref = from_matrix(ref_nm_mask(to_matrix(w, "channels_last"), 2, 4), w.shape, "channels_last")
    assert torch.equal(mf.bool(), ref)


def test_backward_kernel_rejects_a_permutation_out_of_range():
    w = torch.randn(8, 12)
    mf = nm_mask_for_weight(w, 2, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="permutation"):
        backward_mask_for_weight(w, mf, torch.tensor([0, 1, 2, 3, 4, 5, 6, 8]), 2, 4, dtype=torch.uint8)


@pytest.mark.parametrize("cls,args,xshape", [(BiMaskLinear, (24, 16), (5, 24)), (BiMaskConv2d, (8, 16, 3), (2, 8, 7, 7))])
def test_float32_layers_on_the_kernels_follow_the_formulas(monkeypatch, cls, args, xshape):
    """A float32 training step runs Mf, Mb and the decay term in the kernels, and its output and
    gradients are ``x (W*Mf)``, ``g (W*Mb)`` and ``g^T x + decay (1 - Mf) W`` (docs/method.md)."""
    from .test_layers import _shuffle_permutation, expected_masks

    calls = []
    for name in ("forward_mask", "backward_mask", "add_decay_"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    torch.manual_seed(0)
    decay = 0.5
    layer = cls(*args, mode="bimask", decay=decay)
    _shuffle_permutation(layer)
    x = torch.randn(*xshape, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    assert {"forward_mask", "backward_mask", "add_decay_"} <= set(calls)
    w = layer.weight.detach()
    mf, mb, _ = expected_masks(layer, w, "bimask", 2, 4)
    assert not torch.equal(mf, mb)
    xd = x.detach()
    if cls is BiMaskLinear:
        y_ref, dx_ref, dw_ref = F.linear(xd, w * mf, layer.bias.detach()), g @ (w * mb), g.T @ xd
    else:
        y_ref = F.conv2d(xd, w * mf, layer.bias.detach())
        dx_ref = torch.nn.grad.conv2d_input(xd.shape, w * mb, g)
        dw_ref = torch.nn.grad.conv2d_weight(xd, w.shape, g)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, dx_ref)
    torch.testing.assert_close(layer.weight.grad, dw_ref + decay * (~mf) * w)


# ---- guards from the mutation audit: chunk edges, wide convs, the build cache ------------------

def _count_kernel_calls(monkeypatch, name):
    calls = []
    real = getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *a, **k: calls.append(name) or real(*a, **k))
    return calls


@pytest.mark.parametrize("shape", [(8, 300), (12, 520), (8, 32, 3, 3), (8, 8, 17, 17)],
                         ids=["linear-300", "linear-520", "conv-288", "conv-17x17"])
def test_backward_masks_past_the_256_column_chunk_equal_the_tensor_ops(monkeypatch, shape):
    """The kernel ranks columns 256 at a time: a layer with more columns (and a ragged last chunk),
    and a 17x17 conv (its groups 289 entries apart: no C forward mask), give the tensor ops' Mb."""
    gen = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(shape, generator=gen)
    mf = nm_mask_for_weight(w, 2, 4, dtype=torch.uint8)
    perm = torch.randperm(shape[0], generator=gen)
    calls = _count_kernel_calls(monkeypatch, "backward_mask")
    mb = backward_mask_for_weight(w, mf, perm, 2, 4, dtype=torch.uint8)
    assert calls == ["backward_mask"]
    assert torch.equal(mb, _tensor_op_masks(backward_mask_for_weight, w, mf, perm, 2, 4, dtype=torch.uint8))
    matrix, mf_matrix = w.reshape(shape[0], -1), mf.reshape(shape[0], -1).bool()
    assert torch.equal(mb.reshape(shape[0], -1).bool(), ref_backward_mask(matrix, mf_matrix, perm.tolist(), 2, 4))


def test_a_wide_conv_layer_trains_as_on_the_tensor_ops():
    """A 17x17 BiMaskConv2d: Mf by tensor ops, Mb by the kernel; output and gradients as without kernels."""
    from .test_layers import _shuffle_permutation

    torch.manual_seed(0)
    layer = BiMaskConv2d(8, 8, 17, mode="bimask", decay=0.5)
    _shuffle_permutation(layer)
    x = torch.randn(2, 8, 18, 18)
    grads = []
    for path in (contextlib.nullcontext, kernels.disabled):
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        with path():
            y = layer(xi)
            y.backward(torch.ones_like(y))
        grads.append((y.detach(), xi.grad, layer.weight.grad.clone()))
    for got, want in zip(*grads):
        assert torch.equal(got, want)


def _fake_compiler(tmp_path, body: str) -> str:
    """A "C compiler" that writes a partial library to its -o target, then runs ``body``."""
    script = tmp_path / "fake-cc"
    script.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo fake-cc 1.0; exit 0; }\nwhile [ $# -gt 1 ]; do [ \"$1\" = -o ] && out=$2; shift; done\n"
                      f"printf 'half a library' > \"$out\"\n{body}\n")
    script.chmod(0o755)
    return str(script)


def _libraries(cache):
    return sorted(p.name for p in cache.glob("nm_masks-*.so"))


@pytest.mark.parametrize("body", ["exit 1", "kill -9 $$"], ids=["compiler-fails", "compiler-killed"])
def test_a_failed_or_killed_build_leaves_no_library_and_the_next_build_works(tmp_path, monkeypatch, fresh_library,
                                                                             body):
    cache = tmp_path / "cache"
    monkeypatch.setenv("BIMASK_HF_CACHE", str(cache))
    monkeypatch.setenv("CC", _fake_compiler(tmp_path, body))
    assert not kernels.available()
    assert not cache.exists() or not list(cache.iterdir())  # no library, no temporary file
    kernels._library.cache_clear()
    monkeypatch.delenv("CC")
    assert kernels.available() and len(_libraries(cache)) == 1  # the cache was not poisoned


def test_a_changed_c_source_is_rebuilt(tmp_path, monkeypatch, fresh_library):
    """A cached library of an older source is not reused: the edited source (here keeping N+1 of M)
    builds a new library, and it is what runs."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("BIMASK_HF_CACHE", str(cache))
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    assert kernels.available()
    assert (nm_mask_for_weight(w, 2, 4, dtype=torch.uint8).view(8, 4, 4).sum(-1) == 2).all()
    edited = tmp_path / "nm_masks.c"
    source = kernels._SOURCE.read_text()
    assert "< keep_below;" in source
    edited.write_text(source.replace("< keep_below;", "< keep_below + 1;"))
    monkeypatch.setattr(kernels, "_SOURCE", edited)
    kernels._library.cache_clear()
    assert kernels.available() and len(_libraries(cache)) == 2
    assert (nm_mask_for_weight(w, 2, 4, dtype=torch.uint8).view(8, 4, 4).sum(-1) == 3).all()


# For every cache folder named on the command line, in one fresh process: forget the loaded library, run one
# eager float32 training step of a Bi-Mask layer, print whether the kernels ran and how many warnings said the
# cached library was not loaded. A damaged library that were loaded would kill the process (SIGBUS, SIGILL).
_TRAIN_STEPS = """
import logging, os, sys
import torch
from bimask_hf import BiMaskLinear, kernels
said = []
handler = logging.Handler()
handler.emit = lambda record: said.append(record.getMessage()) or print(said[-1], file=sys.stderr)
logging.getLogger("bimask_hf.kernels").addHandler(handler)
for cache in sys.argv[1:]:
    os.environ["BIMASK_HF_CACHE"] = cache
    kernels._library.cache_clear()
    said.clear()
    for _ in range(2):
        layer = BiMaskLinear(32, 16, mode="bimask", decay=0.1)
        layer(torch.randn(4, 32)).sum().backward()
        torch.optim.SGD(layer.parameters(), lr=0.1).step()
    print(os.path.basename(cache), kernels.available(), sum("are not loaded" in s for s in said), flush=True)
"""


def _truncate(lib: Path) -> None:
    lib.write_bytes(lib.read_bytes()[: lib.stat().st_size // 2])


def _overwrite_the_middle(lib: Path) -> None:
    with open(lib, "r+b") as f:  # in place, as a disk error or an interrupted copy leaves it
        f.seek(lib.stat().st_size // 2)
        f.write(b"\xff" * 64)


def _replace_by_another_library(lib: Path) -> None:
    source = lib.with_name("other.c")
    source.write_text("int other(void) { return 1; }\n")
    subprocess.run([kernels._compiler(), "-shared", "-fPIC", str(source), "-o", str(lib)], check=True)
    source.unlink()


def test_a_damaged_cached_library_warns_once_is_rebuilt_and_trains(tmp_path, monkeypatch, fresh_library):
    built = tmp_path / "built"
    monkeypatch.setenv("BIMASK_HF_CACHE", str(built))
    assert kernels.available()  # built here, with its checksum
    (lib,) = built.glob("nm_masks-*.so")
    checksum = lib.with_suffix(".sha256")
    key = lib.stem.removeprefix("nm_masks-")
    damages = {"truncated": _truncate, "overwritten": _overwrite_the_middle, "replaced": _replace_by_another_library}
    for name, damage in damages.items():
        (tmp_path / name).mkdir()
        for path in (lib, checksum):
            shutil.copyfile(path, tmp_path / name / path.name)
        damage(tmp_path / name / lib.name)
        assert (tmp_path / name / lib.name).read_bytes() != lib.read_bytes()
    proc = subprocess.run([sys.executable, "-c", _TRAIN_STEPS, *(str(tmp_path / name) for name in damages)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-3000:])
    # every run trained on the kernels and warned exactly once
    assert proc.stdout.split() == [word for name in damages for word in (name, "True", "1")], proc.stdout
    assert "its checksum does not match" in proc.stderr and "Rebuilding" in proc.stderr
    for name in damages:  # rebuilt in place: the next run loads it without a word
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == sorted([lib.name, checksum.name])
        assert kernels._damage(tmp_path / name / lib.name, tmp_path / name / checksum.name, key) is None


def _without_uname(monkeypatch) -> None:
    monkeypatch.delattr(os, "uname")  # Windows has none


def _cdll_none_is_a_type_error(monkeypatch) -> None:
    real = ctypes.CDLL

    def cdll(name, *args, **kwargs):
        if name is None:  # Windows: there is no handle on the process's own symbols
            raise TypeError("expected str, bytes or os.PathLike object, not NoneType")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(ctypes, "CDLL", cdll)


def _libc_without_renameat2(monkeypatch) -> None:
    real = ctypes.CDLL
    monkeypatch.setattr(ctypes, "CDLL", lambda name, *a, **k: object() if name is None else real(name, *a, **k))


@pytest.mark.parametrize("platform_without", [_without_uname, _cdll_none_is_a_type_error, _libc_without_renameat2],
                         ids=["os.uname", "ctypes.CDLL(None)", "renameat2"])
def test_a_platform_without_uname_libc_or_renameat2_trains_on_the_kernels_and_saves(
    tmp_path, monkeypatch, fresh_library, platform_without
):
    import bimask_hf as bh

    monkeypatch.setenv("BIMASK_HF_CACHE", str(tmp_path / "cache"))
    platform_without(monkeypatch)
    model = bh.sparsify(bh.create_model("resnet8_cifar", labels=["a", "b"], model_args={"base_width": 8}),
                        bh.BiMaskConfig(n=2, m=4))
    calls = []
    real = kernels.forward_mask
    monkeypatch.setattr(kernels, "forward_mask", lambda *a, **k: calls.append(1) or real(*a, **k))
    model(pixel_values=torch.randn(2, 3, 8, 8), labels=torch.tensor([0, 1])).loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert calls and kernels.available()  # the kernels were built and ran
    folder = tmp_path / "model"
    bh.save_sparse_model(model, folder)
    (folder / "checkpoint-1").mkdir()
    first = (folder / "model.safetensors").read_bytes()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    bh.save_sparse_model(model, folder)  # over the previous model: swapped in, or renamed in two steps
    assert (folder / "checkpoint-1").is_dir() and (folder / "model.safetensors").read_bytes() != first
    loaded, state = bh.load_sparse_model(str(folder)).state_dict(), model.state_dict()
    biases = [name for name in state if name.endswith("bias")]
    assert biases and all(torch.equal(loaded[name], state[name]) for name in biases)  # the new model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "model"]  # no staging folder left


def test_kernels_are_library_ops_seen_by_the_profiler_fake_tensors_and_export():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .test_layers import _shuffle_permutation

    torch.manual_seed(0)
    layer = BiMaskLinear(32, 16, mode="bimask", decay=0.1)
    _shuffle_permutation(layer)  # Mb is not Mf
    x = torch.randn(4, 32, requires_grad=True)  # the input gradient needs Mb

    def step() -> tuple[torch.Tensor, ...]:
        layer.weight.grad = x.grad = None
        y = layer(x)
        y.sum().backward()
        return y.detach(), x.grad.clone(), layer.weight.grad.clone()

    direct = step()
    with torch.profiler.profile() as prof:
        profiled = step()
    names = {event.key for event in prof.key_averages()}
    assert {"bimask_hf::forward_mask", "bimask_hf::backward_mask", "bimask_hf::add_decay_"} <= names
    with kernels.dispatched():
        dispatched = step()
    for other in (profiled, dispatched):  # the same results through the dispatcher
        assert all(torch.equal(a, b) for a, b in zip(direct, other))

    w = layer.weight.detach()
    with FakeTensorMode():
        fake = torch.ops.bimask_hf.backward_mask(torch.empty(16, 32), torch.empty(16, 32, dtype=torch.uint8),
                                                 torch.arange(16), 2, 4, torch.bool)
        assert fake.shape == (16, 32) and fake.dtype == torch.bool

    class Masks(torch.nn.Module):
        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return torch.ops.bimask_hf.forward_mask(weight, 2, 4, 1, torch.uint8)

    exported = torch.export.export(Masks(), (w,))
    assert "bimask_hf.forward_mask" in str(exported.graph)
    assert torch.equal(exported.module()(w), nm_mask_for_weight(w, 2, 4, dtype=torch.uint8))
