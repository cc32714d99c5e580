"""Compressed storage of N:M sparse weights, and 2:4 semi-structured tensors for CUDA inference.

An N:M weight viewed as an ``(O, K)`` matrix (see :func:`bimask_hf.masks.weight_to_matrix`) is stored
as its kept values, ``(O, K*N/M)`` in the weight's dtype, plus the position of every kept value inside
its group of M, bit-packed into ``uint8``. A 2:4 fp16 weight takes ``K*2 + K/8`` bytes per row
instead of ``K*2*2``: 0.5625 of the dense size.

Every group stores exactly N slots, even when it holds fewer nonzeros (exact zeros are legal in an
N:M weight): the slots go to the N entries of largest ``|w|``; ties prefer an entry whose bits are
not all zero (so ``-0.0`` survives when a slot is free), then the lower column. Decompression
scatters the slots into zeros, so the round trip is bit-exact for every weight whose groups hold at
most N entries other than ``+0.0`` (in particular every weight written by
:func:`bimask_hf.save_sparse_model`, which stores pruned entries as ``+0.0``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping

import torch
import torch.nn as nn

from .errors import NMPatternError
from .masks import check_nm_pattern, matrix_to_weight, weight_to_matrix

logger = logging.getLogger(__name__)

__all__ = [
    "NM_WEIGHTS_NAME",
    "compress_nm",
    "decompress_nm",
    "index_bits",
    "is_nm_compressible",
    "load_nm_safetensors",
    "save_nm_safetensors",
    "to_semi_structured",
]

NM_WEIGHTS_NAME = "model.nm.safetensors"
NM_FORMAT = "bimask-nm-compressed"
NM_FORMAT_VERSION = "1"
_VALUES = ".nm_values"
_INDICES = ".nm_indices"


def index_bits(m: int) -> int:
    """Bits stored per in-group index: the smallest of 1, 2, 4, 8 that holds ``ceil(log2(m))``.

    Args:
        m (`int`): Group size.

    Returns:
        `int`: 1, 2, 4 or 8.

    Raises:
        ValueError: If ``m`` is not a positive integer or is over 256.
    """
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"M must be a positive integer, got {m!r}.")
    need = math.ceil(math.log2(m)) if m > 1 else 1
    for bits in (1, 2, 4, 8):
        if bits >= need:
            return bits
    raise ValueError(f"N:M compression stores in-group indices in at most 8 bits, so M <= 256; got M={m}.")


def _pack(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``(rows, L)`` small integers into ``(rows, ceil(L*bits/8))`` uint8, lowest bits first."""
    rows, length = indices.shape
    per_byte = 8 // bits
    padded = -(-length // per_byte) * per_byte
    values = torch.zeros(rows, padded, dtype=torch.int32, device=indices.device)
    values[:, :length] = indices.to(torch.int32)
    shifts = torch.arange(per_byte, dtype=torch.int32, device=indices.device) * bits
    packed = (values.reshape(rows, -1, per_byte) << shifts).sum(-1)
    return packed.to(torch.uint8)


def _unpack(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`_pack`: ``(rows, length)`` int64 indices."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32, device=packed.device) * bits
    values = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(packed.shape[0], -1)[:, :length].to(torch.int64)


def _check_pattern(n: int, m: int) -> None:
    check_nm_pattern(n, m)
    index_bits(m)  # M small enough for the packed in-group indices


def is_nm_compressible(tensor: torch.Tensor, n: int, m: int, group_layout: str = "channels_last") -> bool:
    """Whether :func:`compress_nm` stores ``tensor`` bit-exactly.

    That is a float 2-D/4-D weight with ``K % M == 0`` whose every group of M holds at most N entries other
    than ``+0.0``.

    Args:
        tensor (`torch.Tensor`): The weight.
        n (`int`): Entries stored per group.
        m (`int`): Group size.
        group_layout (`str`, *optional*, defaults to `"channels_last"`): Column order of a conv weight's
            groups (see :func:`bimask_hf.masks.weight_to_matrix`).

    Returns:
        `bool`: True when the round trip is exact.
    """
    if not tensor.is_floating_point() or tensor.dim() not in (2, 4) or tensor.numel() == 0:
        return False
    matrix = weight_to_matrix(tensor.detach(), group_layout)
    if matrix.shape[1] % m:
        return False
    groups = matrix.reshape(matrix.shape[0], -1, m)
    stored = (groups != 0) | groups.to(torch.float32).signbit()
    return bool((stored.sum(-1) <= n).all())


def compress_nm(
    weight: torch.Tensor, n: int, m: int, group_layout: str = "channels_last"
) -> dict[str, torch.Tensor]:
    """Compress an N:M sparse Linear/Conv2d ``weight`` into ``{"values", "indices"}``.

    ``values`` is ``(O, K*N/M)`` in ``weight.dtype``: the N stored entries of every group of M columns,
    in column order. ``indices`` is ``(O, ceil(K*N/M * bits / 8))`` uint8 holding each stored entry's
    position in its group, ``bits = index_bits(m)`` per index.

    Args:
        weight (`torch.Tensor`): A 2-D or 4-D N:M sparse weight.
        n (`int`): Entries stored per group.
        m (`int`): Group size.
        group_layout (`str`, *optional*, defaults to `"channels_last"`): Column order of a conv weight's
            groups (see :func:`bimask_hf.masks.weight_to_matrix`).

    Returns:
        `dict[str, torch.Tensor]`: ``{"values": ..., "indices": ...}``.

    Raises:
        NMPatternError: If a group has more than N nonzeros.
        ValueError: If ``K % M != 0`` or the pattern is invalid.
    """
    _check_pattern(n, m)
    matrix = weight_to_matrix(weight.detach(), group_layout)
    rows, cols = matrix.shape
    if cols % m:
        raise ValueError(f"N:M compression needs K % M == 0, got K={cols}, M={m} (weight {tuple(weight.shape)}).")
    groups = matrix.reshape(rows, cols // m, m)
    nonzero = (groups != 0).sum(-1)  # NaN counts as nonzero
    if bool((nonzero > n).any()):
        r, g = (int(v) for v in (nonzero > n).nonzero()[0])
        raise NMPatternError(
            f"Weight {tuple(weight.shape)} is not {n}:{m} sparse: row {r}, column group {g} has "
            f"{int(nonzero[r, g])} nonzeros; compress_nm stores exactly {n} per group of {m}."
        )
    # Rank inside each group: largest |w| first; ties prefer entries with any bit set (-0.0), then the
    # lower column. Two stable sorts give this lexicographic order on every device.
    magnitude = groups.abs().to(torch.float32)
    has_bits = groups.to(torch.float32).signbit() | (groups != 0)
    order = torch.sort(has_bits.to(torch.uint8), dim=-1, descending=True, stable=True).indices
    by_magnitude = torch.sort(magnitude.gather(-1, order), dim=-1, descending=True, stable=True).indices
    kept = order.gather(-1, by_magnitude)[..., :n].sort(dim=-1).values  # (rows, groups, n), ascending
    values = groups.gather(-1, kept).reshape(rows, -1).contiguous()
    indices = _pack(kept.reshape(rows, -1), index_bits(m))
    return {"values": values, "indices": indices}


def decompress_nm(
    compressed: Mapping[str, torch.Tensor],
    shape: Iterable[int],
    n: int,
    m: int,
    group_layout: str = "channels_last",
) -> torch.Tensor:
    """Rebuild the weight of ``shape`` from :func:`compress_nm`'s ``{"values", "indices"}``.

    Args:
        compressed (`Mapping[str, torch.Tensor]`): ``{"values": ..., "indices": ...}``.
        shape (`Iterable[int]`): The 2-D or 4-D weight shape.
        n (`int`): Entries stored per group.
        m (`int`): Group size.
        group_layout (`str`, *optional*, defaults to `"channels_last"`): Column order of a conv weight's
            groups (see :func:`bimask_hf.masks.weight_to_matrix`).

    Returns:
        `torch.Tensor`: The dense weight, zeros where nothing was stored.

    Raises:
        ValueError: If the shapes do not match or the indices are corrupted.
    """
    _check_pattern(n, m)
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 4):
        raise ValueError(f"decompress_nm rebuilds 2-D or 4-D weights, got shape {shape}.")
    values, packed = compressed["values"], compressed["indices"]
    rows, cols = shape[0], math.prod(shape[1:])
    if cols % m:
        raise ValueError(f"Shape {shape} has K={cols}, not divisible by M={m}.")
    kept_cols = cols // m * n
    bits = index_bits(m)
    if tuple(values.shape) != (rows, kept_cols):
        raise ValueError(
            f"values has shape {tuple(values.shape)}, expected ({rows}, {kept_cols}) for weight {shape} at {n}:{m}."
        )
    expected_bytes = -(-kept_cols * bits // 8)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (rows, expected_bytes):
        raise ValueError(
            f"indices must be uint8 of shape ({rows}, {expected_bytes}), got {packed.dtype} {tuple(packed.shape)}."
        )
    index = _unpack(packed, bits, kept_cols).reshape(rows, cols // m, n)
    if bool((index >= m).any()):
        raise ValueError(f"indices hold positions >= M={m}: the compressed tensor is corrupted.")
    groups = torch.zeros(rows, cols // m, m, dtype=values.dtype, device=values.device)
    groups.scatter_(-1, index.to(values.device), values.reshape(rows, cols // m, n))
    return matrix_to_weight(groups.reshape(rows, cols), shape, group_layout)


def save_nm_safetensors(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    compressed_keys: Iterable[str],
    n: int,
    m: int,
    group_layout: str = "channels_last",
) -> dict[str, int]:
    """Write ``state_dict`` to a safetensors file with the tensors in ``compressed_keys`` N:M-compressed.

    A compressed key ``k`` is stored as ``k.nm_values`` and ``k.nm_indices``; every other tensor is stored
    as is. The header metadata records the format, the pattern, the layout and each compressed
    tensor's shape.

    Args:
        state_dict (`Mapping[str, torch.Tensor]`): The tensors to write.
        path (`str` or `os.PathLike`): The file.
        compressed_keys (`Iterable[str]`): Keys of ``state_dict`` to compress with :func:`compress_nm`.
        n (`int`): Entries stored per group.
        m (`int`): Group size.
        group_layout (`str`, *optional*, defaults to `"channels_last"`): Column order of a conv weight's
            groups (see :func:`bimask_hf.masks.weight_to_matrix`).

    Returns:
        `dict[str, int]`: ``{"dense_bytes", "stored_bytes"}`` of the tensors written.

    Raises:
        KeyError: If a compressed key is not in ``state_dict``.
        NMPatternError: If a compressed tensor is not N:M sparse.
    """
    from safetensors.torch import save_file

    compressed_keys = list(compressed_keys)
    missing = [k for k in compressed_keys if k not in state_dict]
    if missing:
        raise KeyError(f"save_nm_safetensors: keys {missing} are not in the state dict.")
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    dense_bytes = stored_bytes = 0
    for key, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        dense_bytes += tensor.numel() * tensor.element_size()
        if key in compressed_keys:
            parts = compress_nm(tensor, n, m, group_layout)
            tensors[key + _VALUES] = parts["values"]
            tensors[key + _INDICES] = parts["indices"]
            shapes[key] = list(tensor.shape)
        else:
            tensors[key] = tensor.contiguous()
    stored_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    metadata = {
        "format": "pt",
        "bimask_format": NM_FORMAT,
        "bimask_format_version": NM_FORMAT_VERSION,
        "n": str(n),
        "m": str(m),
        "group_layout": group_layout,
        "index_bits": str(index_bits(m)),
        "compressed": json.dumps(shapes, sort_keys=True),
    }
    save_file(tensors, os.fspath(path), metadata=metadata)
    return {"dense_bytes": dense_bytes, "stored_bytes": stored_bytes}


def load_nm_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_nm_safetensors` back into the exact dense state dict.

    Args:
        path (`str` or `os.PathLike`): The file.
        device (`str`, *optional*, defaults to `"cpu"`): Where the tensors are loaded.

    Returns:
        `dict[str, torch.Tensor]`: The state dict, compressed tensors rebuilt dense.

    Raises:
        ValueError: If the file is not in this format, or in another version of it.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    with safe_open(path, framework="pt", device=device) as f:
        metadata = f.metadata() or {}
        if metadata.get("bimask_format") != NM_FORMAT:
            raise ValueError(f"{path} is not an N:M-compressed bimask-hf file (no '{NM_FORMAT}' metadata).")
        if metadata.get("bimask_format_version") != NM_FORMAT_VERSION:
            raise ValueError(
                f"{path} uses compressed format version {metadata.get('bimask_format_version')!r}; this "
                f"bimask-hf reads version {NM_FORMAT_VERSION}. Upgrade bimask-hf."
            )
        n, m, layout = int(metadata["n"]), int(metadata["m"]), metadata["group_layout"]
        shapes: dict[str, list[int]] = json.loads(metadata["compressed"])
        names = set(f.keys())
        state = {}
        for key, shape in shapes.items():
            parts = {"values": f.get_tensor(key + _VALUES), "indices": f.get_tensor(key + _INDICES)}
            state[key] = decompress_nm(parts, shape, n, m, layout)
            names -= {key + _VALUES, key + _INDICES}
        for key in sorted(names):
            state[key] = f.get_tensor(key)
    return state


def _is_two_four(weight: torch.Tensor) -> bool:
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def to_semi_structured(model: nn.Module, layers: Iterable[str] | None = None) -> list[str]:
    """Swap 2:4 ``nn.Linear`` weights for ``torch.sparse.to_sparse_semi_structured`` tensors (CUDA, inference).

    Layers whose shape or dtype the sparse kernels reject are left dense with a warning.

    Args:
        model (`nn.Module`): A merged model on a CUDA device.
        layers (`Iterable[str]`, *optional*): Names of the Linear modules to convert; by default the merged
            sparse layers recorded by :func:`bimask_hf.merge` (``model.bimask_sparse_layers``), else every
            Linear whose weight is 2:4.

    Returns:
        `list[str]`: The converted names.

    Raises:
        RuntimeError: Without CUDA (the semi-structured kernels only exist for NVIDIA GPUs of compute
            capability 8.0+), or for a layer not on CUDA.
        TypeError: If a named layer is not an ``nn.Linear``.
        NMPatternError: If a named layer is not 2:4.
    """
    if not torch.cuda.is_available():
        raise RuntimeError(
            "to_semi_structured needs a CUDA GPU with sparse tensor cores (compute capability >= 8.0): "
            "torch.sparse.to_sparse_semi_structured has no CPU kernels. Keep the merged dense model on CPU."
        )
    from torch.sparse import to_sparse_semi_structured

    explicit = layers is not None
    if layers is None:
        recorded = getattr(model, "bimask_sparse_layers", None)
        layers = recorded or [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    converted = []
    for name in layers:
        module = model.get_submodule(name)
        if type(module) is not nn.Linear:
            if explicit:
                raise TypeError(f"to_semi_structured: layer {name!r} is a {type(module).__name__}, not nn.Linear.")
            continue
        weight = module.weight.detach()
        if not weight.is_cuda:
            raise RuntimeError(f"to_semi_structured: layer {name!r} is on {weight.device}; move the model to CUDA first.")
        if not _is_two_four(weight):
            if explicit:
                raise NMPatternError(f"Layer {name!r} is not 2:4 sparse along its input features.")
            continue
        try:
            sparse = to_sparse_semi_structured(weight)
        except (RuntimeError, ValueError) as error:
            logger.warning("to_semi_structured: layer %r stays dense: %s", name, error)
            continue
        module.weight = nn.Parameter(sparse, requires_grad=False)
        converted.append(name)
    return converted
