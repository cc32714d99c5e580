"""One-pass C kernels for the eager CPU training step: ``Mf``, ``Mb`` and the decay term.

ATen has no N:M ranking op, so the tensor-op versions in :mod:`bimask_hf.masks` pass over a layer's
weight about twenty times (one comparison or count update per pair of group positions). These kernels
do it in one pass, on one thread (ResNet-32's mask work per step, 2 threads: see
``docs/benchmarks.md``). They are plain C with no PyTorch headers: built once with the system's C
compiler (well under a second) into ``$BIMASK_HF_CACHE`` (default ``~/.cache/bimask_hf``), loaded with
``ctypes``, and used for contiguous float32 CPU tensors outside ``torch.compile``. Without a compiler, or
with ``BIMASK_HF_KERNELS=0``, the tensor-op versions run instead; both give identical masks. A cached library
is loaded only if its bytes match the checksum written when it was built (a damaged file would kill the
process when mapped); otherwise it is rebuilt. The kernels are also the ``torch.library`` ops
``bimask_hf::forward_mask``, ``::backward_mask`` and ``::add_decay_`` (see :func:`dispatched`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = ["available", "applies", "disabled", "dispatched", "forward_mask", "backward_mask", "add_decay_"]

_SOURCE = Path(__file__).with_name("csrc") / "nm_masks.c"
_MAX_M = 16
MAX_SPREAD = 256  # conv groups whose members lie more than this many entries apart (kh*kw) take tensor ops
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
_switched_off = False  # set inside :func:`disabled`
_via_dispatcher = False  # set inside :func:`dispatched`


def _cache_dir() -> Path:
    root = os.environ.get("BIMASK_HF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bimask_hf")
    return Path(root)


_FLAGS = ("-O3", "-std=c99", "-fPIC", "-shared", "-ffp-contract=off")
_FIX = ("install a C compiler (e.g. gcc) or point CC at one; BIMASK_HF_KERNELS=0 uses tensor ops without this "
        "warning")


def _compiler() -> str | None:
    """The C compiler: ``$CC`` when set (None if it is not an executable), else ``cc``, ``gcc`` or ``clang``."""
    chosen = os.environ.get("CC")
    for name in (chosen,) if chosen else ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _compiler_identity(cc: str) -> str:
    """``cc --version``: the cache key changes with the compiler, not only with its path."""
    return subprocess.run([cc, "--version"], check=True, capture_output=True, text=True, timeout=60).stdout


def _checksum(data: bytes, key: str) -> str:
    # the key is hashed in too: a whole library built for another source, compiler or flags does not match
    return hashlib.sha256(key.encode() + data).hexdigest()


def _build(path: Path, checksum_path: Path, cc: str, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # -ffp-contract=off: no fused multiply-adds, so the decay term rounds exactly as the tensor ops do
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *_FLAGS, str(_SOURCE), "-o", tmp], check=True, capture_output=True, text=True, timeout=120)
        checksum = _checksum(Path(tmp).read_bytes(), key)
        os.replace(tmp, path)  # atomic: processes building at once each leave a whole file
        _write_atomically(checksum_path, checksum)  # after the library: a kill in between means a rebuild
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _damage(path: Path, checksum_path: Path, key: str) -> str | None:
    """Why the cached library at ``path`` must not be loaded (None: it is the one this key built).

    A library is mapped into the process: a truncated or partly overwritten file kills it with SIGBUS or
    SIGILL at the first call, so its bytes are checked against the checksum written when it was built.
    """
    if not path.exists():
        return None
    try:
        expected = checksum_path.read_text().strip()
    except OSError:
        return "it has no checksum file"
    if _checksum(path.read_bytes(), key) != expected:
        return "its checksum does not match (truncated, overwritten or replaced)"
    return None


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("BIMASK_HF_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    cc = _compiler()
    if cc is None:
        named = f"CC={os.environ['CC']} is not an executable" if os.environ.get("CC") else "no C compiler found"
        logger.warning("bimask-hf: %s; eager CPU masks use tensor ops (same masks, slower mask work: "
                       "docs/benchmarks.md, section 5). To fix: %s.", named, _FIX)
        return None
    try:
        identity = _compiler_identity(cc)
        key = hashlib.sha256(b"\0".join(
            [_SOURCE.read_bytes(), cc.encode(), identity.encode(), " ".join(_FLAGS).encode(), sys.platform.encode(),
             platform.machine().encode()]
        )).hexdigest()[:16]
        path = _cache_dir() / f"nm_masks-{key}.so"
        checksum_path = path.with_suffix(".sha256")
        damage = _damage(path, checksum_path, key)
        if damage:
            logger.warning("bimask-hf: the cached C mask kernels %s are not loaded: %s. Rebuilding them.", path, damage)
        if damage or not path.exists():
            _build(path, checksum_path, cc, key)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as err:
        detail = (getattr(err, "stderr", "") or str(err)).strip()
        logger.warning("bimask-hf: could not build or load the C mask kernels with %s (%s); eager CPU masks use "
                       "tensor ops (same masks, slower mask work: docs/benchmarks.md, section 5). To fix: %s.",
                       cc, detail, _FIX)
        return None
    lib.bm_forward_mask.argtypes = [_ptr, _ptr, _i64, _i64, _i64, _i64, _i64]
    lib.bm_backward_mask.argtypes = [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64]
    lib.bm_add_decay.argtypes = [_ptr, _ptr, _ptr, _i64, ctypes.c_float]
    lib.bm_add_decay.restype = None
    return lib


def available() -> bool:
    """Whether the C kernels are built and enabled (``BIMASK_HF_KERNELS=0`` turns them off).

    The first call builds (or loads the cached) library.

    Returns:
        `bool`: True when the library is loaded.
    """
    return _library() is not None


def _plain(t: torch.Tensor) -> bool:
    # parameters too, but no other tensor subclass (an FSDP2 shard's DTensor has no flat local storage)
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu" and t.is_contiguous()


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Compute masks and the decay term by tensor ops inside the block, as without the kernels.

    For side-by-side timing; the masks are the same.

    Yields:
        `None`: Control, with the kernels switched off until the block exits.
    """
    global _switched_off
    saved, _switched_off = _switched_off, True
    try:
        yield
    finally:
        _switched_off = saved


def applies(weight: torch.Tensor, m: int, spread: int = 1) -> bool:
    """Whether the kernels can take ``weight``.

    That is a plain contiguous float32 CPU tensor outside ``torch.compile`` and :func:`disabled`, in groups
    of at most 16 entries ``spread`` apart (at most :data:`MAX_SPREAD`: a conv's ``kh*kw``), with the
    library available.

    Args:
        weight (`torch.Tensor`): The layer's weight.
        m (`int`): Group size.
        spread (`int`, *optional*, defaults to 1): Distance between the members of a group, in entries.

    Returns:
        `bool`: True when :func:`forward_mask`, :func:`backward_mask` and :func:`add_decay_` may be called.
    """
    return (
        not _switched_off
        and m <= _MAX_M
        and spread <= MAX_SPREAD
        and weight.dtype == torch.float32
        and _plain(weight)
        and not torch.compiler.is_compiling()
        and available()
    )


def _profiled() -> bool:
    return _via_dispatcher or torch.autograd._profiler_enabled()


@contextlib.contextmanager
def dispatched() -> Iterator[None]:
    """Run the kernels as ``torch.library`` ops inside the block, as while a ``torch.profiler`` records.

    The ops are ``bimask_hf::forward_mask``, ``::backward_mask`` and ``::add_decay_`` (for side-by-side
    timing). Outside a profiler the layers call the kernels through ``ctypes`` directly: the dispatcher adds
    a few microseconds per call (figures in ``docs/benchmarks.md``). The ops have fake implementations, so
    FakeTensor tracing and ``torch.export`` of code that calls them see the right shapes and dtypes.

    Yields:
        `None`: Control, with calls going through the dispatcher until the block exits.
    """
    global _via_dispatcher
    saved, _via_dispatcher = _via_dispatcher, True
    try:
        yield
    finally:
        _via_dispatcher = saved


def forward_mask(
    weight: torch.Tensor, n: int, m: int, d: int, dtype: torch.dtype, *, high: bool = False
) -> torch.Tensor:
    """``Mf`` of ``weight`` viewed as ``(blocks, m, d)``, in one pass.

    Args:
        weight (`torch.Tensor`): The weight, checked by :func:`applies` with ``spread=d``.
        n (`int`): Entries kept per group.
        m (`int`): Group size.
        d (`int`): Distance between group members (1 for adjacent entries, ``kh*kw`` for a conv).
        dtype (`torch.dtype`): ``torch.uint8`` or ``torch.bool``.
        high (`bool`, *optional*, defaults to `False`): Ties go to the higher index (the paper's order).

    Returns:
        `torch.Tensor`: The forward mask in ``weight``'s shape, of ``dtype``.
    """
    weight = weight.detach()
    if _profiled():
        return torch.ops.bimask_hf.forward_mask(weight, n, m, d, dtype, high)
    return _forward_mask(weight, n, m, d, dtype, high)


def backward_mask(
    weight: torch.Tensor,
    forward_mask: torch.Tensor,
    permutation: torch.Tensor,
    n: int,
    m: int,
    dtype: torch.dtype,
    *,
    high: bool = False,
) -> torch.Tensor:
    """``Mb`` of ``weight`` given ``Mf`` and the row ``permutation``, in one pass.

    Args:
        weight (`torch.Tensor`): The weight, checked by :func:`applies`.
        forward_mask (`torch.Tensor`): ``Mf``, bool or 0/1 uint8.
        permutation (`torch.Tensor`): The row permutation that forms the groups of ``m`` rows.
        n (`int`): Entries kept per group.
        m (`int`): Group size.
        dtype (`torch.dtype`): ``torch.uint8`` or ``torch.bool``.
        high (`bool`, *optional*, defaults to `False`): The paper's ranking (ties to the higher group member,
            pruned entries scored 0).

    Returns:
        `torch.Tensor`: The backward mask in ``weight``'s shape, of ``dtype``.

    Raises:
        ValueError: If ``permutation`` does not fit the rows.
    """
    weight = weight.detach()
    if _profiled():
        return torch.ops.bimask_hf.backward_mask(weight, forward_mask, permutation, n, m, dtype, high)
    return _backward_mask(weight, forward_mask, permutation, n, m, dtype, high)


def add_decay_(grad: torch.Tensor, weight: torch.Tensor, forward_mask: torch.Tensor, decay: float) -> bool:
    """``grad += decay * (1 - Mf) * W`` in place, when the tensors suit the kernel.

    Args:
        grad (`torch.Tensor`): The weight gradient (float32, plain, contiguous, ``weight``'s shape).
        weight (`torch.Tensor`): The weight ``W``.
        forward_mask (`torch.Tensor`): ``Mf``, bool or uint8.
        decay (`float`): The SR-STE decay.

    Returns:
        `bool`: True when done; False (nothing done) when the tensors do not suit the kernel, and the caller
        uses tensor ops.
    """
    if not (
        grad.dtype == torch.float32 and _plain(grad) and grad.shape == weight.shape and applies(weight, 1)
        and forward_mask.dtype in (torch.uint8, torch.bool) and _plain(forward_mask)
    ):
        return False
    if _profiled():
        torch.ops.bimask_hf.add_decay_(grad, weight.detach(), forward_mask, decay)
    else:
        _add_decay(grad, weight.detach(), forward_mask, decay)
    return True


def _checked(weight: torch.Tensor) -> ctypes.CDLL:
    """The library, for a float32 CPU ``weight`` (the ops may be called directly, not only by the layers)."""
    lib = _library()
    if lib is None or weight.dtype != torch.float32 or weight.device.type != "cpu":
        raise RuntimeError("bimask_hf C kernels: need the built kernels (bimask_hf.kernels.available()) and a "
                           f"float32 CPU weight, got {weight.dtype} on {weight.device}.")
    return lib


def _forward_mask(
    weight: torch.Tensor, n: int, m: int, d: int, dtype: torch.dtype, high: bool = False
) -> torch.Tensor:
    lib, weight = _checked(weight), weight.contiguous()
    out = torch.empty(weight.shape, dtype=dtype)
    if lib.bm_forward_mask(weight.data_ptr(), out.data_ptr(), weight.numel() // (m * d), m, d, n, int(high)):
        raise ValueError(f"bimask-hf C kernel: groups of {m} entries {d} apart are not supported")
    return out


def _backward_mask(
    weight: torch.Tensor, forward_mask: torch.Tensor, permutation: torch.Tensor, n: int, m: int, dtype: torch.dtype,
    high: bool = False,
) -> torch.Tensor:
    lib, weight = _checked(weight), weight.contiguous()
    rows = weight.shape[0]
    bytes_mask = forward_mask.dtype in (torch.uint8, torch.bool) and _plain(forward_mask)
    fm = forward_mask if bytes_mask else (forward_mask != 0).contiguous()
    perm = permutation.to(torch.int64).contiguous()
    out = torch.empty(weight.shape, dtype=dtype)
    err = lib.bm_backward_mask(weight.data_ptr(), fm.data_ptr(), perm.data_ptr(), out.data_ptr(), rows,
                               weight.numel() // rows, m, n, int(high))
    if err:
        raise ValueError(f"bimask-hf C kernel: bad backward-mask arguments (rows={rows}, M={m}, permutation of "
                         f"{perm.numel()} entries, min {int(perm.min())}, max {int(perm.max())})")
    return out


def _add_decay(grad: torch.Tensor, weight: torch.Tensor, forward_mask: torch.Tensor, decay: float) -> None:
    _checked(weight).bm_add_decay(grad.data_ptr(), weight.data_ptr(), forward_mask.data_ptr(), grad.numel(), decay)


# The ops call the same functions; the layers call those functions directly unless a profiler records.
_forward_mask_op = torch.library.custom_op("bimask_hf::forward_mask", _forward_mask, mutates_args=())
_backward_mask_op = torch.library.custom_op("bimask_hf::backward_mask", _backward_mask, mutates_args=())
_add_decay_op = torch.library.custom_op("bimask_hf::add_decay_", _add_decay, mutates_args=("grad",))


@_forward_mask_op.register_fake
def _(weight: torch.Tensor, n: int, m: int, d: int, dtype: torch.dtype, high: bool = False) -> torch.Tensor:
    return torch.empty_like(weight, dtype=dtype, memory_format=torch.contiguous_format)


@_backward_mask_op.register_fake
def _(
    weight: torch.Tensor, forward_mask: torch.Tensor, permutation: torch.Tensor, n: int, m: int, dtype: torch.dtype,
    high: bool = False,
) -> torch.Tensor:
    return torch.empty_like(weight, dtype=dtype, memory_format=torch.contiguous_format)


@_add_decay_op.register_fake
def _(grad: torch.Tensor, weight: torch.Tensor, forward_mask: torch.Tensor, decay: float) -> None:
    return None
