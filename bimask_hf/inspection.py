"""Look at a sparsified (or merged, or saved) model: the per-layer report, its statistics, N:M verification.

Every sparsity statistic of the library comes from :func:`sparsity_stats`, so the trainer's logs, the
printed table and the model card agree. Two densities are kept apart:

* ``sparse_density`` -- the kept share of the weights of the *sparse* layers only (0.5 at 2:4);
* ``model_density`` -- the kept share of all ``Linear``/``Conv2d`` weights, the dense stem and head included.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .config import BiMaskConfig
from .errors import NMPatternError
from .layers import BiMaskLayer
from .masks import retention, weight_to_matrix
from .modes import MODE_TABLE

__all__ = [
    "LayerReport",
    "SparsityReport",
    "SparsityStats",
    "check_nm",
    "layer_retention",
    "report",
    "sparse_layers",
    "sparsity_stats",
]


def sparse_layers(model: nn.Module) -> dict[str, BiMaskLayer]:
    """The Bi-Mask layers of ``model`` by qualified name.

    Args:
        model (`nn.Module`): The model.

    Returns:
        `dict[str, BiMaskLayer]`: Qualified name to layer, in module order.
    """
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, BiMaskLayer)}


def layer_retention(mf: torch.Tensor, mb: torch.Tensor) -> float:
    """``|Mb & Mf| / |Mf|``: the share of forward weights that also act in the backward pass.

    Args:
        mf (`torch.Tensor`): The forward mask.
        mb (`torch.Tensor`): The backward mask, same shape.

    Returns:
        `float`: The retention, 1.0 for an empty ``Mf`` (:func:`bimask_hf.masks.retention`).
    """
    return retention(mf, mb)


@dataclass
class LayerReport:
    """One row of :class:`SparsityReport`.

    Args:
        name (`str`): Qualified module name.
        kind (`str`): ``"Linear"`` or ``"Conv2d"``.
        shape (`tuple[int, ...]`): Weight shape.
        mode (`str`): The mode the layer runs (``"dense"`` for a layer left dense, or the config's mode for
            a merged one).
        pattern (`str`): ``"2:4"``, ``"50% unstructured"``, or ``"-"``.
        density (`float`): Kept share of the layer's weights.
        retention (`float`, *optional*): Backward-mask retention, None where the mode has no backward mask.
        reason (`str`, *optional*): Why a layer stayed dense.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    mode: str
    pattern: str
    density: float
    retention: float | None
    reason: str | None = None


@dataclass(frozen=True)
class SparsityStats:
    """Aggregate sparsity of a model (see the module docstring for the two densities).

    Args:
        sparse_density (`float`): Kept share of the weights of the sparse layers only.
        model_density (`float`): Kept share of all listed ``Linear``/``Conv2d`` weights.
        retention_mean (`float`, *optional*): Mean retention over the layers that have one, else None.
        retention_min (`float`, *optional*): Lowest retention over those layers, else None.
        num_sparse_layers (`int`): Layers not dense.
        num_layers (`int`): Layers listed.
    """

    sparse_density: float
    model_density: float
    retention_mean: float | None
    retention_min: float | None
    num_sparse_layers: int
    num_layers: int

    def to_logs(self, prefix: str = "sparsity/") -> dict[str, float]:
        """The statistics as tracker metrics (``sparsity/sparse_density`` ...), leaving out unset ones.

        Args:
            prefix (`str`, *optional*, defaults to `"sparsity/"`): Starts every metric name.

        Returns:
            `dict[str, float]`: Metric name to value.
        """
        logs = {
            f"{prefix}sparse_density": self.sparse_density,
            f"{prefix}model_density": self.model_density,
        }
        if self.retention_mean is not None:
            logs[f"{prefix}retention_mean"] = self.retention_mean
            logs[f"{prefix}retention_min"] = self.retention_min  # type: ignore[assignment]
        return logs


def sparsity_stats(rows: Iterable[LayerReport]) -> SparsityStats:
    """The one place sparsity statistics are computed, from the rows of :func:`report`.

    Args:
        rows (`Iterable[LayerReport]`): The table's rows.

    Returns:
        `SparsityStats`: The aggregate (densities 1.0 over no weights).
    """
    rows = list(rows)
    sparse = [r for r in rows if r.mode != "dense"]

    def kept_share(selected: list[LayerReport]) -> float:
        total = sum(math.prod(r.shape) for r in selected)
        return sum(math.prod(r.shape) * r.density for r in selected) / total if total else 1.0

    retentions = [r.retention for r in rows if r.retention is not None]
    return SparsityStats(
        sparse_density=kept_share(sparse),
        model_density=kept_share(rows),
        retention_mean=sum(retentions) / len(retentions) if retentions else None,
        retention_min=min(retentions) if retentions else None,
        num_sparse_layers=len(sparse),
        num_layers=len(rows),
    )


@dataclass
class SparsityReport:
    """Per-layer table of a patched model; ``str()`` prints it, ``rows`` holds the data.

    Args:
        rows (`list[LayerReport]`, *optional*): The rows, one per ``Linear``/``Conv2d``.
    """

    rows: list[LayerReport] = field(default_factory=list)

    @property
    def sparse_rows(self) -> list[LayerReport]:
        """The rows of the layers that are not dense."""
        return [r for r in self.rows if r.mode != "dense"]

    @property
    def stats(self) -> SparsityStats:
        """The table's :class:`SparsityStats`."""
        return sparsity_stats(self.rows)

    @property
    def density(self) -> float:
        """Kept share of the weights of all listed layers, dense ones included (``stats.model_density``)."""
        return self.stats.model_density

    @property
    def retention_mean(self) -> float | None:
        """Mean backward-mask retention (``stats.retention_mean``), None without any."""
        return self.stats.retention_mean

    @property
    def retention_min(self) -> float | None:
        """Lowest backward-mask retention (``stats.retention_min``), None without any."""
        return self.stats.retention_min

    def to_dicts(self) -> list[dict]:
        """The rows as plain dicts (shapes as lists), for JSON.

        Returns:
            `list[dict]`: One dict per row, keyed by the :class:`LayerReport` fields.
        """
        return [dict(r.__dict__, shape=list(r.shape)) for r in self.rows]

    def __str__(self) -> str:
        header = ("layer", "kind", "shape", "mode", "N:M", "density", "retention", "note")
        lines = [
            (
                r.name, r.kind, "x".join(map(str, r.shape)), r.mode, r.pattern, f"{r.density:.3f}",
                "-" if r.retention is None else f"{r.retention:.4f}", r.reason or "",
            )
            for r in self.rows
        ]
        widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        out += [fmt.format(*line).rstrip() for line in lines]
        stats = self.stats
        out.append(
            f"{stats.num_sparse_layers} of {stats.num_layers} layers sparse; density {stats.sparse_density:.3f} "
            f"over sparse layers, {stats.model_density:.3f} over the model"
            + (f"; retention mean {stats.retention_mean:.4f}, min {stats.retention_min:.4f}"
               if stats.retention_mean is not None else "")
        )
        return "\n".join(out)


def report(model: nn.Module, config: BiMaskConfig | None = None) -> SparsityReport:
    """The per-layer table: name, kind, shape, mode, N:M, density, retention, and why a layer stayed dense.

    Layers already merged by :func:`merge` are listed with the mode and pattern of ``config`` and the
    density read from their zeros.

    Args:
        model (`nn.Module`): A patched, or merged, model.
        config (`BiMaskConfig`, *optional*): Mode and pattern of merged layers (default: the model's own).

    Returns:
        `SparsityReport`: One row per ``Linear``/``Conv2d``.
    """
    notes: dict[str, str] = getattr(model, "bimask_notes", {})
    merged = set(getattr(model, "bimask_sparse_layers", []))
    config = config or getattr(model, "bimask_config", None)
    rows = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)) or not name:
            continue
        kind = "Conv2d" if isinstance(mod, nn.Conv2d) else "Linear"
        shape = tuple(mod.weight.shape)
        if isinstance(mod, BiMaskLayer):
            mf, mb = mod.masks()
            density = float(mf.sum()) / mf.numel()
            ret = layer_retention(mf, mb) if MODE_TABLE[mod.effective_mode].backward_mask else None
            rows.append(LayerReport(name, kind, shape, mod.effective_mode, mod.pattern, density, ret, notes.get(name)))
        elif name in merged:
            density = float((mod.weight != 0).sum()) / mod.weight.numel()
            mode, pattern = (config.mode, config.pattern) if config is not None else ("merged", "-")
            rows.append(LayerReport(name, kind, shape, mode, pattern, density, None))
        else:
            rows.append(LayerReport(name, kind, shape, "dense", "-", 1.0, None, notes.get(name, "not patched")))
    return SparsityReport(rows)


def _saved_meta(saved: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(saved, Mapping):
        return dict(saved)
    return BiMaskConfig.load_json(saved)


def _state_dict_layer(state_dict: Mapping[str, torch.Tensor], name: str) -> str:
    """A saved module name as a state-dict layer name (TimmWrapper modules carry a ``timm_model.`` prefix)."""
    for candidate in (name, name.removeprefix("timm_model."), f"timm_model.{name}"):
        if f"{candidate}.weight" in state_dict or candidate in state_dict:
            return candidate
    return name


def _first_violation(weight: torch.Tensor, n: int, m: int, group_layout: str) -> str | None:
    matrix = weight_to_matrix(weight.detach(), group_layout)
    rows, cols = matrix.shape
    if cols % m and group_layout == "flat" and weight.dim() == 4 and matrix.numel() % m == 0:
        rows, cols = 1, matrix.numel()  # a sparse stem's groups run across rows (masks._grouped)
        matrix = matrix.reshape(rows, cols)
    if cols % m:
        return f"K={cols} is not divisible by M={m}"
    counts = (matrix != 0).reshape(rows, cols // m, m).sum(-1)
    bad = (counts > n).nonzero()
    if len(bad) == 0:
        return None
    r, g = (int(v) for v in bad[0])
    return (
        f"row {r}, column group {g} (columns {g * m}..{g * m + m - 1}) has {int(counts[r, g])} nonzeros, "
        f"at most {n} allowed; {len(bad)} of {counts.numel()} groups violate {n}:{m}"
    )


def check_nm(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike,
    n: int | None = None,
    m: int | None = None,
    layers: Iterable[str] | None = None,
    group_layout: str | None = None,
    *,
    saved: str | os.PathLike | Mapping[str, Any] | None = None,
) -> list[str]:
    """Verify that a model's or state dict's weights follow ``n:m``; the core of :func:`bimask_hf.check_nm`.

    Takes what :func:`bimask_hf.check_nm` takes except a path: that one (in ``hub.load``) reads a saved
    folder or Hub id first and documents every argument in full.

    Args:
        model_or_state_dict (`nn.Module` or `Mapping[str, torch.Tensor]`): As in :func:`bimask_hf.check_nm`,
            but no path.
        n (`int`, *optional*): As in :func:`bimask_hf.check_nm`.
        m (`int`, *optional*): As in :func:`bimask_hf.check_nm`.
        layers (`Iterable[str]`, *optional*): As in :func:`bimask_hf.check_nm`.
        group_layout (`str`, *optional*): As in :func:`bimask_hf.check_nm`.
        saved (`str`, `os.PathLike` or `Mapping`, *optional*): As in :func:`bimask_hf.check_nm`.

    Returns:
        `list[str]`: The checked layer names.

    Raises:
        NMPatternError: Naming the first offending layer.
        TypeError: For a path.
        ValueError: If N and M are not known, or no sparse layers are found or recorded.
        KeyError: If a named layer is not in the state dict.
    """
    if isinstance(model_or_state_dict, (str, os.PathLike)):
        raise TypeError(
            f"bimask_hf.inspection.check_nm checks a model or a state dict, got the path {model_or_state_dict!r}: "
            "use bimask_hf.check_nm, which loads a saved folder or Hub id first."
        )
    if saved is not None:
        meta = _saved_meta(saved)
        if meta.get("density") is not None and n is None:
            raise ValueError(f"The saved model is unstructured (density {meta['density']}), not N:M; nothing to check.")
        n = meta["n"] if n is None else n
        m = meta["m"] if m is None else m
        group_layout = group_layout or meta.get("group_layout")
        if layers is None:
            layers = list(meta.get("sparse_layers") or [])
            if not layers:
                raise ValueError("check_nm: the saved bimask_config.json records no sparse layers.")
            if not isinstance(model_or_state_dict, nn.Module):
                layers = [_state_dict_layer(model_or_state_dict, name) for name in layers]
    if n is None or m is None:
        raise ValueError("check_nm needs n and m, or a folder saved by bimask-hf (or saved=...) that records them.")
    group_layout = group_layout or "channels_last"
    if isinstance(model_or_state_dict, nn.Module):
        model = model_or_state_dict
        bimask = sparse_layers(model)
        names = list(layers) if layers is not None else list(bimask) + list(getattr(model, "bimask_sparse_layers", []))
        if not names:
            raise ValueError("check_nm found no sparse layers in the model; pass layers=[...] to name them.")
        tensors = {}
        for name in names:
            mod = model.get_submodule(name)
            tensors[name] = mod.sparse_weight() if isinstance(mod, BiMaskLayer) else mod.weight
    else:
        sd = model_or_state_dict
        if layers is not None:
            tensors = {}
            for name in layers:
                key = name if name in sd else f"{name}.weight"
                if key not in sd:
                    raise KeyError(f"check_nm: layer {name!r} not in the state dict (no key {key!r}).")
                tensors[name.removesuffix(".weight")] = sd[key]
        else:
            tensors = {
                k.removesuffix(".weight"): v
                for k, v in sd.items()
                if k.endswith(".weight") and v.dim() in (2, 4) and math.prod(v.shape[1:]) % m == 0
            }
    for name, weight in tensors.items():
        problem = _first_violation(weight, n, m, group_layout)
        if problem:
            raise NMPatternError(
                f"Layer {name!r} (weight {'x'.join(map(str, weight.shape))}) is not {n}:{m} sparse: {problem}. "
                "Re-sparsify it (bimask_hf.sparsify + merge) or load with resparsify=True."
            )
    return list(tensors)
