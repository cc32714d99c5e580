"""One-pass C kernels for the eager CPU training step: ``Mf``, ``Mb`` and the decay term.

ATen has no N:M ranking op, so the tensor-op versions in :mod:`bimask_hf.masks` pass over a layer's
weight about twenty times (one comparison or count update per pair of group positions). These kernels
do it in one pass, on one thread (ResNet-32's mask work per step, 2 threads: see
``docs/benchmarks.md``). They are plain C with no PyTorch headers: built once with the system's C
compiler (well under a second) into ``$BIMASK_HF_CACHE`` (default ``~/.cache/bimask_hf``), loaded with
``ctypes``, and used for contiguous float32 CPU tensors outside ``torch.compile``. Without a compiler, or
with ``BIMASK_HF_KERNELS=0``, the tensor-op versions run instead; both give identical masks.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = ["available", "applies", "disabled", "forward_mask", "backward_mask", "add_decay_"]

_SOURCE = Path(__file__).with_name("csrc") / "nm_masks.c"
_MAX_M = 16
MAX_SPREAD = 256  # conv groups whose members lie more than this many entries apart (kh*kw) take tensor ops
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
_switched_off = False  # set inside :func:`disabled`


def _cache_dir() -> Path:
    root = os.environ.get("BIMASK_HF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bimask_hf")
    return Path(root)


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def _build(path: Path, cc: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # -ffp-contract=off: no fused multiply-adds, so the decay term rounds exactly as the tensor ops do
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        subprocess.run(
            [cc, "-O3", "-std=c99", "-fPIC", "-shared", "-ffp-contract=off", str(_SOURCE), "-o", tmp],
            check=True, capture_output=True, text=True, timeout=120,
        )
        os.replace(tmp, path)  # atomic: processes building at once each leave a whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("BIMASK_HF_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    cc = _compiler()
    if cc is None:
        logger.info("bimask-hf: no C compiler found; eager CPU masks use tensor ops (same masks, slower).")
        return None
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + cc.encode() + sys.platform.encode() + os.uname().machine.encode()).hexdigest()[:16]
    path = _cache_dir() / f"nm_masks-{key}.so"
    try:
        if not path.exists():
            _build(path, cc)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", "") or err
        logger.warning("bimask-hf: could not build the C mask kernels (%s); using tensor ops (same masks, slower).",
                       detail)
        return None
    lib.bm_forward_mask.argtypes = [_ptr, _ptr, _i64, _i64, _i64, _i64]
    lib.bm_backward_mask.argtypes = [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64]
    lib.bm_add_decay.argtypes = [_ptr, _ptr, _ptr, _i64, ctypes.c_float]
    lib.bm_add_decay.restype = None
    return lib


def available() -> bool:
    """Whether the C kernels are built and enabled (``BIMASK_HF_KERNELS=0`` turns them off)."""
    return _library() is not None


def _plain(t: torch.Tensor) -> bool:
    # parameters too, but no other tensor subclass (an FSDP2 shard's DTensor has no flat local storage)
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu" and t.is_contiguous()


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Inside: masks and the decay term by tensor ops, as without the kernels (for side-by-side timing)."""
    global _switched_off
    saved, _switched_off = _switched_off, True
    try:
        yield
    finally:
        _switched_off = saved


def applies(weight: torch.Tensor, m: int, spread: int = 1) -> bool:
    """Whether the kernels can take ``weight``: a plain contiguous float32 CPU tensor outside
    ``torch.compile`` and :func:`disabled`, groups of at most 16 entries ``spread`` apart (at most
    :data:`MAX_SPREAD`: a conv's ``kh*kw``)."""
    return (
        not _switched_off
        and m <= _MAX_M
        and spread <= MAX_SPREAD
        and weight.dtype == torch.float32
        and _plain(weight)
        and not torch.compiler.is_compiling()
        and available()
    )


def forward_mask(weight: torch.Tensor, n: int, m: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """``Mf`` of ``weight`` (checked by :func:`applies` with ``spread=d``) viewed as ``(blocks, m, d)``, in
    ``dtype`` (``torch.uint8`` or ``torch.bool``)."""
    weight = weight.detach()
    out = torch.empty(weight.shape, dtype=dtype)
    if _library().bm_forward_mask(weight.data_ptr(), out.data_ptr(), weight.numel() // (m * d), m, d, n):
        raise ValueError(f"bimask-hf C kernel: groups of {m} entries {d} apart are not supported")
    return out


def backward_mask(
    weight: torch.Tensor, forward_mask: torch.Tensor, permutation: torch.Tensor, n: int, m: int, dtype: torch.dtype
) -> torch.Tensor:
    """``Mb`` of ``weight`` (checked by :func:`applies`) given ``Mf`` (bool or 0/1 uint8) and the row
    ``permutation``, in ``dtype`` (``torch.uint8`` or ``torch.bool``)."""
    weight = weight.detach()
    rows = weight.shape[0]
    bytes_mask = forward_mask.dtype in (torch.uint8, torch.bool) and _plain(forward_mask)
    fm = forward_mask if bytes_mask else (forward_mask != 0).contiguous()
    perm = permutation.to(torch.int64).contiguous()
    out = torch.empty(weight.shape, dtype=dtype)
    err = _library().bm_backward_mask(weight.data_ptr(), fm.data_ptr(), perm.data_ptr(), out.data_ptr(), rows,
                                      weight.numel() // rows, m, n)
    if err:
        raise ValueError(f"bimask-hf C kernel: bad backward-mask arguments (rows={rows}, M={m}, permutation of "
                         f"{perm.numel()} entries, min {int(perm.min())}, max {int(perm.max())})")
    return out


def add_decay_(grad: torch.Tensor, weight: torch.Tensor, forward_mask: torch.Tensor, decay: float) -> bool:
    """``grad += decay * (1 - Mf) * W`` in place; False (nothing done) when the tensors do not suit the
    kernel (then the caller uses tensor ops)."""
    if not (
        grad.dtype == torch.float32 and _plain(grad) and grad.shape == weight.shape and applies(weight, 1)
        and forward_mask.dtype in (torch.uint8, torch.bool) and _plain(forward_mask)
    ):
        return False
    _library().bm_add_decay(grad.data_ptr(), weight.detach().data_ptr(), forward_mask.data_ptr(), grad.numel(),
                            decay)
    return True
