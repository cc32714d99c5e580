"""Put Bi-Mask layers into timm and transformers models, report on them, and take them out again.

Target matching follows peft: a string is a ``re.fullmatch`` over the qualified module name, a list
matches exact names or name suffixes (``"conv1"`` matches ``"layer1.0.conv1"``).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .config import BiMaskConfig
from .distributed import search_permutations_shared
from .layers import BiMaskConv2d, BiMaskLayer, BiMaskLinear, conv_padding
from .masks import weight_to_matrix

logger = logging.getLogger(__name__)

__all__ = [
    "sparsify",
    "merge",
    "report",
    "check_nm",
    "refresh_permutations",
    "project_",
    "sparse_layers",
    "NMPatternError",
    "SparsityReport",
    "LayerReport",
]

_HEAD_NAMES = {"classifier", "head", "fc", "head_dist", "cls_classifier", "distillation_classifier", "heads"}
_EXACT_TYPES: tuple[type, ...] = (nn.Linear, nn.Conv2d)
try:  # timm's Linear only adds a torchscript-friendly forward; it computes the same thing.
    from timm.layers import Linear as _TimmLinear

    _EXACT_TYPES = _EXACT_TYPES + (_TimmLinear,)
except ImportError:  # pragma: no cover - timm is a dependency
    pass


class NMPatternError(ValueError):
    """A weight that should follow an N:M pattern does not; names the layer and the first bad group."""


def sparse_layers(model: nn.Module) -> dict[str, BiMaskLayer]:
    """The Bi-Mask layers of ``model`` by qualified name."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, BiMaskLayer)}


def _matches(name: str, pattern: str | list[str]) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == key or name.endswith("." + key) for key in pattern)


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, (nn.Linear, nn.Conv2d)) and not isinstance(mod, BiMaskLayer) and name
    }


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def default_exclusions(model: nn.Module) -> dict[str, str]:
    """Stem and classifier-head layers of ``model`` with the reason each stays dense by default.

    timm models (also nested, as in transformers' ``TimmWrapperForImageClassification``) name them in
    ``pretrained_cfg['first_conv']`` / ``['classifier']``. Otherwise the stem is the first Linear/Conv2d
    in registration order (the patch embedding or first conv of every transformers vision model) and
    the head is every layer under a top-level ``classifier``/``head``/``fc`` module (else the last Linear).
    """
    candidates = _candidates(model)
    excluded: dict[str, str] = {}
    for prefix, mod in model.named_modules():
        cfg = getattr(mod, "pretrained_cfg", None)
        if not isinstance(cfg, Mapping):
            continue
        for key, why in (("first_conv", "stem (first conv / patch embedding)"), ("classifier", "classifier head")):
            names = cfg.get(key) or ()
            for short in [names] if isinstance(names, str) else names:
                full = f"{prefix}.{short}" if prefix else short
                excluded.update({c: why for c in candidates if _under(c, full)})
    if excluded:
        return excluded
    names = list(candidates)
    if names:
        excluded[names[0]] = "stem (first conv / patch embedding)"
        heads = [c for c in names if c.split(".")[0] in _HEAD_NAMES]
        if not heads:
            linears = [c for c in names if isinstance(candidates[c], nn.Linear)]
            heads = linears[-1:]
        excluded.update({c: "classifier head" for c in heads})
    return excluded


def ineligibility(module: nn.Module, config: BiMaskConfig) -> str | None:
    """Why ``module`` must stay dense under ``config``, or None if it can be sparsified."""
    if type(module) not in _EXACT_TYPES:
        return f"custom subclass {type(module).__name__} overrides forward (not patched)"
    weight = module.weight
    if isinstance(module, nn.Conv2d) and conv_padding(module) is None:
        return f"padding={module.padding!r} is asymmetric for this kernel"
    if config.density is not None or config.mode == "dense":
        return None
    rows = weight.shape[0]
    cols = math.prod(weight.shape[1:])
    if cols % config.m:
        return f"K={cols} not divisible by M={config.m}"
    if config.mode == "transposable":
        if rows % config.m:
            return f"transposable mask needs O % M == 0, O={rows}"
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            return "transposable mask needs groups=1"
    return None


def _uni_reason(layer: BiMaskLayer) -> str | None:
    if layer.mode == "bimask" and not layer.bidirectional and layer.density is None:
        rows = layer.weight.shape[0] // layer._row_groups()
        return f"uni-directional: O={rows} per group not divisible by M={layer.m}"
    return None


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _listing(names: Iterable[str], limit: int = 60) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def sparsify(model: nn.Module, config: BiMaskConfig | None = None, **overrides) -> nn.Module:  # type: ignore[no-untyped-def]
    """Replace eligible ``Linear``/``Conv2d`` modules of ``model`` in place by Bi-Mask layers; returns ``model``.

    With no ``target_modules`` every eligible layer but the stem and the classifier head is patched;
    explicit targets override that default; ``exclude_modules`` always applies. Layers whose shapes
    do not allow the pattern stay dense and :func:`report` says why. Patterns that match nothing
    raise ``ValueError`` listing the layer names that exist. A model that already has Bi-Mask layers
    is returned unchanged if ``config`` agrees with the one it was patched with.
    """
    config = config or BiMaskConfig()
    if overrides:
        config = BiMaskConfig.from_dict({**config.to_dict(), **overrides})
    existing = sparse_layers(model)
    if existing:
        previous = getattr(model, "bimask_config", None)
        if previous is not None and previous.to_dict() != config.to_dict():
            raise ValueError(
                "Model is already sparsified with a different BiMaskConfig; call bimask_hf.merge(model) "
                "first to start over from its pruned weights."
            )
        return model
    candidates = _candidates(model)
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or nn.Conv2d modules to sparsify.")
    notes: dict[str, str] = {}
    if config.target_modules is None:
        defaults = default_exclusions(model)
        notes.update(defaults)
        targets = [n for n in candidates if n not in defaults]
    else:
        targets = [n for n in candidates if _matches(n, config.target_modules)]
        if not targets:
            raise ValueError(
                f"target_modules={config.target_modules!r} matches no Linear/Conv2d layer. A string is a full "
                f"regex match, a list matches exact names or name suffixes. Layers: {_listing(candidates)}"
            )
        notes.update({n: "not in target_modules" for n in candidates if n not in targets})
    if config.exclude_modules is not None:
        excluded = [n for n in candidates if _matches(n, config.exclude_modules)]
        if not excluded:
            raise ValueError(
                f"exclude_modules={config.exclude_modules!r} matches no Linear/Conv2d layer. "
                f"Layers: {_listing(candidates)}"
            )
        notes.update({n: "in exclude_modules" for n in excluded})
        targets = [n for n in targets if n not in excluded]
    patched = 0
    for name in targets:
        module = candidates[name]
        reason = ineligibility(module, config)
        if reason is not None:
            notes[name] = reason
            continue
        cls = BiMaskConv2d if isinstance(module, nn.Conv2d) else BiMaskLinear
        new = cls.from_dense(module, config)  # type: ignore[arg-type]
        _set_submodule(model, name, new)
        patched += 1
        uni = _uni_reason(new)
        if uni:
            notes[name] = uni
    if patched == 0:
        logger.warning("sparsify patched no layer of %s: %s", type(model).__name__, notes)
    model.bimask_config = config  # type: ignore[assignment]
    model.bimask_notes = notes  # type: ignore[assignment]
    return model


def merge(model: nn.Module) -> nn.Module:
    """Swap every Bi-Mask layer back to a plain ``nn.Linear``/``nn.Conv2d`` holding ``W * Mf``.

    Pruned weights become exactly zero, so in eval mode the merged model computes what the patched
    one did. Raises if a weight is not finite. Records the merged layer names in
    ``model.bimask_sparse_layers`` (used by :func:`check_nm` and the Hub helpers).
    """
    layers = sparse_layers(model)
    for name, layer in layers.items():
        if not torch.isfinite(layer.weight).all():
            raise ValueError(f"Layer {name!r} has non-finite weights; refusing to merge them.")
    merged = []
    for name, layer in layers.items():
        _set_submodule(model, name, layer.to_dense())  # type: ignore[attr-defined]
        if layer.mode != "dense":
            merged.append(name)
    model.bimask_sparse_layers = sorted(set(getattr(model, "bimask_sparse_layers", [])) | set(merged))  # type: ignore[assignment]
    for attr in ("bimask_notes",):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def project_(model: nn.Module) -> None:
    """Prune every Bi-Mask layer's parameter in place (``post`` mode calls this after each step)."""
    for layer in sparse_layers(model).values():
        layer.project_()


def _layer_seed(seed: int, step: int, index: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + index * 104_729) % (2**63 - 1)


def refresh_permutations(
    model: nn.Module,
    step: int = 0,
    method: str | None = None,
    num_candidates: int | None = None,
    seed: int | None = None,
) -> dict[str, float]:
    """Search new backward-mask permutations for every bi-directional layer.

    The generator of each layer is seeded from ``(seed, step, layer index)``. With several processes
    each rank searches its share of the layers and broadcasts the results
    (:func:`bimask_hf.distributed.search_permutations_shared`), so all ranks end with the permutations
    a single process finds; call it on every rank. Returns ``seconds`` (this rank's search time),
    ``retention_mean`` and ``retention_min`` after the refresh.
    """
    config: BiMaskConfig = getattr(model, "bimask_config", None) or BiMaskConfig()
    method = method or config.permutation_search
    num_candidates = num_candidates or config.num_permutations
    seed = config.seed if seed is None else seed
    layers, generators = [], []
    for index, layer in enumerate(sparse_layers(model).values()):
        if layer.effective_mode != "bimask":
            continue
        generator = torch.Generator(device=layer.weight.device)
        generator.manual_seed(_layer_seed(seed, step, index))
        layers.append(layer)
        generators.append(generator)
    seconds = search_permutations_shared(layers, generators, method, num_candidates)
    retentions = [layer.retention() for layer in layers]
    stats = {"seconds": seconds}
    if retentions:
        stats["retention_mean"] = sum(retentions) / len(retentions)
        stats["retention_min"] = min(retentions)
    return stats


@dataclass
class LayerReport:
    """One row of :class:`SparsityReport`."""

    name: str
    kind: str
    shape: tuple[int, ...]
    mode: str
    pattern: str
    density: float
    retention: float | None
    reason: str | None = None


@dataclass
class SparsityReport:
    """Per-layer table of a patched model; ``str()`` prints it, ``rows`` holds the data."""

    rows: list[LayerReport] = field(default_factory=list)

    @property
    def sparse_rows(self) -> list[LayerReport]:
        return [r for r in self.rows if r.mode != "dense"]

    @property
    def density(self) -> float:
        """Kept share of the weights of all listed layers (dense ones included)."""
        total = sum(math.prod(r.shape) for r in self.rows)
        kept = sum(math.prod(r.shape) * r.density for r in self.rows)
        return kept / total if total else 1.0

    @property
    def retention_mean(self) -> float | None:
        values = [r.retention for r in self.rows if r.retention is not None]
        return sum(values) / len(values) if values else None

    @property
    def retention_min(self) -> float | None:
        values = [r.retention for r in self.rows if r.retention is not None]
        return min(values) if values else None

    def to_dicts(self) -> list[dict]:
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
        n_sparse = len(self.sparse_rows)
        ret = self.retention_mean
        out.append(
            f"{n_sparse} of {len(self.rows)} layers sparse; overall density {self.density:.3f}"
            + (f"; retention mean {ret:.4f}, min {self.retention_min:.4f}" if ret is not None else "")
        )
        return "\n".join(out)


def report(model: nn.Module, config: BiMaskConfig | None = None) -> SparsityReport:
    """The per-layer table: name, kind, shape, mode, N:M, density, retention, and why a layer stayed dense.

    Layers already merged by :func:`merge` are listed with the mode and pattern of ``config`` (default:
    the model's own) and the density read from their zeros.
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
            ret = float((mb & mf).sum()) / max(1, int(mf.sum())) if mod.effective_mode == "bimask" else None
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
    """Verify that weights follow ``n:m`` (at most ``n`` nonzeros in every group of ``m``).

    For a model, the layers checked are its Bi-Mask layers (their forward weights ``W * Mf``) and the
    layers recorded by :func:`merge`, unless ``layers`` names them; for a state dict, the named layers
    (``"<layer>"`` or ``"<layer>.weight"``), by default every 2-D/4-D ``.weight`` whose K allows the pattern.
    A folder (or Hub id) written by :func:`save_sparse_model` is checked as saved: its ``bimask_config.json``
    gives N, M, the group layout and the sparse layers, and its weights (compressed ones too) are read.
    ``saved`` (such a folder, or the loaded ``bimask_config.json`` dict) does the same for a model or state
    dict: N, M, layout and, unless ``layers`` is given, the recorded sparse layers (a TimmWrapper's
    ``timm_model.`` prefix is matched either way). Explicit ``n`` / ``m`` / ``group_layout`` win.
    Returns the checked layer names; raises :class:`NMPatternError` naming the first offending layer.
    """
    if isinstance(model_or_state_dict, (str, os.PathLike)):
        from .hub.load import load_folder_for_check

        model_or_state_dict, saved_meta = load_folder_for_check(model_or_state_dict)
        saved = saved_meta if saved is None else saved
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
