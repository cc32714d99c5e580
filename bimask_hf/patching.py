"""Put Bi-Mask layers into timm and transformers models, and take them out again.

Also the per-step model-wide operations on them (permutation refresh, in-place projection). Reporting
and N:M verification live in :mod:`bimask_hf.inspection`, exceptions in :mod:`bimask_hf.errors`; both
are re-exported here for compatibility.

Target matching follows peft: a string is a ``re.fullmatch`` over the qualified module name, a list
matches exact names or name suffixes (``"conv1"`` matches ``"layer1.0.conv1"``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn

from .config import BiMaskConfig
from .distributed import search_permutations_shared
from .errors import NMPatternError
from .inspection import LayerReport, SparsityReport, check_nm, report, sparse_layers, sparsity_stats
from .layers import PERMUTATION_KEY, BiMaskConv2d, BiMaskLayer, BiMaskLinear, conv_padding
from .modes import MODE_TABLE, mode_spec

logger = logging.getLogger(__name__)

__all__ = [
    "sparsify",
    "merge",
    "merge_and_unload",
    "sparsity_stats",
    "report",
    "check_nm",
    "refresh_permutations",
    "project_",
    "training_state",
    "sparse_layers",
    "NMPatternError",
    "SparsityReport",
    "LayerReport",
]

_HEAD_NAMES = {"classifier", "head", "fc", "head_dist", "cls_classifier", "distillation_classifier", "heads"}


def _exact_types() -> tuple[type, ...]:
    """The module classes whose forward the Bi-Mask layers reproduce exactly.

    timm's Linear only adds a torchscript-friendly forward; it computes the same thing. It is looked up
    only when timm is loaded (a model cannot hold one otherwise), so sparsify never imports timm.
    """
    timm_layers = sys.modules.get("timm.layers")
    linear = getattr(timm_layers, "Linear", None)
    return (nn.Linear, nn.Conv2d) if linear is None else (nn.Linear, nn.Conv2d, linear)


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


def ineligibility(module: nn.Module, config: BiMaskConfig, *, stem: bool = False) -> str | None:
    """Why ``module`` must stay dense under ``config``, or None if it can be sparsified.

    A sparse ``stem`` in the ``flat`` layout may have ``K % M != 0`` when its whole weight splits into
    groups of M: its groups then run over the flattened weight across rows, as the paper's N:M conv
    groups its CIFAR stems (K = 27)."""
    if type(module) not in _exact_types():
        return f"custom subclass {type(module).__name__} overrides forward (not patched)"
    weight = module.weight
    if isinstance(module, nn.Conv2d) and conv_padding(module) is None:
        return f"padding={module.padding!r} is asymmetric for this kernel"
    spec = mode_spec(config.mode)
    if config.density is not None or not spec.masked:
        return None
    rows = weight.shape[0]
    cols = math.prod(weight.shape[1:])
    straddle = stem and config.group_layout == "flat" and not spec.transposable
    if cols % config.m and not (straddle and weight.numel() % config.m == 0):
        return f"K={cols} not divisible by M={config.m}"
    if spec.transposable:
        if rows % config.m:
            return f"transposable mask needs O % M == 0, O={rows}"
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            return "transposable mask needs groups=1"
    return None


def _uni_reason(layer: BiMaskLayer) -> str | None:
    if layer.spec.backward_mask and not layer.bidirectional and layer.density is None:
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


def _refuse_nonfinite(weights: dict[str, torch.Tensor]) -> None:
    from .checks import nonfinite_names
    from .errors import NonFiniteError

    bad = nonfinite_names(weights)
    if bad:
        raise NonFiniteError(
            f"Layer(s) {_listing(bad)} hold NaN or inf weights, so no N:M mask can be chosen for them: load a "
            "checkpoint that is not damaged (or exclude them with exclude_modules)."
        )


def sparsify(model: nn.Module, config: BiMaskConfig | None = None, **overrides) -> nn.Module:  # type: ignore[no-untyped-def]
    """Replace eligible ``Linear``/``Conv2d`` modules of ``model`` in place by Bi-Mask layers; returns ``model``.

    With no ``target_modules`` every eligible layer but the stem and the classifier head is patched;
    explicit targets override that default; ``exclude_modules`` always applies. Layers whose shapes
    do not allow the pattern stay dense and :func:`report` says why. Patterns that match nothing
    raise ``ValueError`` listing the layer names that exist. A model that already has Bi-Mask layers
    is returned unchanged if ``config`` agrees with the one it was patched with.

    Args:
        model: A timm or transformers model (any ``nn.Module`` with ``Linear``/``Conv2d`` layers).
        config: The settings (default ``BiMaskConfig()``: 2:4 Bi-Mask).
        **overrides: ``BiMaskConfig`` fields that replace ``config``'s (``sparsify(model, n=1, m=4)``).

    Returns:
        ``model``, patched in place, with the config attached as ``model.bimask_config``.

    Raises:
        TypeError: An override that is no ``BiMaskConfig`` field.
        ValueError: Nothing to sparsify, targets that match no layer, or a model already sparsified with
            another config.
    """
    config = config or BiMaskConfig()
    if overrides:
        unknown = sorted(set(overrides) - set(config.to_dict()))
        if unknown:
            raise TypeError(
                f"sparsify() got unknown BiMaskConfig field(s) {unknown}; valid: {', '.join(sorted(config.to_dict()))}."
            )
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
    stems: set[str] = set()
    if config.target_modules is None:
        defaults = default_exclusions(model)
        stems = {n for n, why in defaults.items() if why.startswith("stem") and config.stem_is_sparse(candidates[n])}
        defaults = {n: why for n, why in defaults.items() if n not in stems}
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
    _refuse_nonfinite({name: candidates[name].weight for name in targets})
    patched = 0
    for name in targets:
        module = candidates[name]
        reason = ineligibility(module, config, stem=name in stems)
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
    _install_save_hooks(model)
    return model


# ---- the plain libraries' save paths ------------------------------------------------------------
# ``state_dict()`` of a Bi-Mask model is its training state (dense weights and permutations), as torch
# defines it: resuming, EMA and ``load_state_dict`` round trips need exactly that. The publishing calls
# of the plain libraries must instead write what the model computes, exact N:M weights: transformers'
# ``save_pretrained`` / ``push_to_hub`` are routed to ``save_sparse_model`` on the instance, and timm's
# ``save_for_hf`` (which ``push_to_hf_hub`` calls) gets the merged weights from a state-dict hook.
_TRAINING_STATE = "_bimask_training_state"  # on each Bi-Mask layer: > 0 inside training_state()
_SAVE_OVERRIDES = ("save_pretrained", "push_to_hub")
# name -> function(model, ...): the publishing versions of _SAVE_OVERRIDES. The Hub layer registers them
# (``bimask_hf.hub.save``, loaded with transformers by ``bimask_hf.registration``), so that this layer
# never imports the one above it.
_SAVE_ROUTES: dict[str, Callable[..., Any]] = {}


def register_save_routes(**routes: Callable[..., Any]) -> None:
    """Route ``save_pretrained`` / ``push_to_hub`` of sparsified transformers models to these functions.

    Args:
        **routes: ``save_pretrained=`` and ``push_to_hub=`` functions taking the model first.

    Raises:
        ValueError: A name other than ``save_pretrained`` or ``push_to_hub``.
    """
    unknown = set(routes) - set(_SAVE_OVERRIDES)
    if unknown:
        raise ValueError(f"Only {_SAVE_OVERRIDES} can be routed, not {sorted(unknown)}.")
    _SAVE_ROUTES.update(routes)
_TIMM_EXPORTS = {"save_for_hf"}  # timm's Hub export, which timm.models.push_to_hf_hub calls


@contextlib.contextmanager
def training_state(model: nn.Module) -> Iterator[nn.Module]:
    """Inside this context ``model.save_pretrained`` writes the training state, for checkpoints.

    Outside it, ``save_pretrained`` / ``push_to_hub`` of a transformers model under Bi-Mask training write
    what :func:`bimask_hf.save_sparse_model` writes (merged, exact N:M weights, ``bimask_config.json``,
    model card). A training checkpoint must instead keep the dense weights and the permutations so that
    a resumed run continues exactly: ``BiMaskTrainer`` saves its checkpoints inside this context, and
    a custom loop saving with ``save_pretrained`` should too.

    Args:
        model: A model patched by :func:`sparsify`.

    Yields:
        ``model``, whose saves keep the training state until the block exits (nested blocks are counted).
    """
    layers = list(sparse_layers(model).values())
    for layer in layers:
        setattr(layer, _TRAINING_STATE, getattr(layer, _TRAINING_STATE, 0) + 1)
    try:
        yield model
    finally:
        for layer in layers:
            setattr(layer, _TRAINING_STATE, getattr(layer, _TRAINING_STATE) - 1)


def in_training_state(model: nn.Module) -> bool:
    """Whether ``model`` is inside :func:`training_state` (its saves keep dense weights and permutations)."""
    return any(getattr(layer, _TRAINING_STATE, 0) > 0 for layer in sparse_layers(model).values())


def _install_save_hooks(model: nn.Module) -> None:
    import functools

    for layer in sparse_layers(model).values():
        if _timm_export_hook not in layer._state_dict_hooks.values():
            layer.register_state_dict_post_hook(_timm_export_hook)
    if all(callable(getattr(type(model), name, None)) for name in _SAVE_OVERRIDES) and hasattr(model, "config"):
        from .families import model_family

        if model_family(model) == "transformers":
            if set(_SAVE_ROUTES) != set(_SAVE_OVERRIDES):  # transformers is loaded, so the Hub layer is too
                raise RuntimeError("bimask_hf.hub.save did not register its save routes; import bimask_hf first.")
            for name, route in _SAVE_ROUTES.items():
                # functools.partial (not a closure) so that deepcopy and pickling of the model keep working.
                setattr(model, name, functools.partial(route, model))


def _remove_save_overrides(model: nn.Module) -> None:
    for name in _SAVE_OVERRIDES:
        model.__dict__.pop(name, None)


def _called_by_timm_export() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name in _TIMM_EXPORTS and str(frame.f_globals.get("__name__", "")).startswith("timm."):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def _timm_export_hook(layer: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:  # type: ignore[type-arg]
    """In a state dict taken by timm's ``save_for_hf``: the layer's merged weight, no permutation.

    timm's export has no hook of its own, so the call is recognised by its function on the stack; every
    other ``state_dict()`` (checkpoints, ``keep_vars=True`` callers) keeps the training state.
    """
    key = prefix + "weight"
    if (getattr(layer, _TRAINING_STATE, 0) > 0 or isinstance(state_dict.get(key), nn.Parameter)
            or not _called_by_timm_export()):
        return
    weight = layer.sparse_weight().detach()  # type: ignore[operator]
    state_dict[key] = weight.masked_fill(weight == 0, 0.0)  # W * Mf keeps the sign of pruned weights: -0.0
    state_dict.pop(prefix + PERMUTATION_KEY, None)
    warnings.warn(
        "timm's save_for_hf / push_to_hf_hub wrote the merged, exact N:M weights of this Bi-Mask model; "
        "bimask_config.json and the model card (which load_sparse_model and the Hub use) are written by "
        "bimask_hf.save_sparse_model(model, folder, push_to_hub=...).",
        UserWarning,
        stacklevel=2,
    )


def merge(model: nn.Module) -> nn.Module:
    """Swap every Bi-Mask layer back to a plain ``nn.Linear``/``nn.Conv2d`` holding ``W * Mf``; in place.

    Destructive, like peft's ``merge_and_unload`` (also available under that name): the Bi-Mask layers,
    their dense weights and permutations are gone, and the returned model is a plain timm/transformers
    model. Pruned weights become exactly ``+0.0`` (never ``-0.0``), so in eval mode the merged model
    computes what the patched one did and its zeros compare and compress as zeros. Raises if a weight is
    not finite. Records the merged layer names in ``model.bimask_sparse_layers`` (used by
    :func:`check_nm` and the Hub helpers).

    Args:
        model: A model patched by :func:`sparsify`.

    Returns:
        ``model``, with plain layers, in place.

    Raises:
        ValueError: A Bi-Mask layer's weight holds NaN or inf.
    """
    layers = sparse_layers(model)
    for name, layer in layers.items():
        if not torch.isfinite(layer.weight).all():
            raise ValueError(f"Layer {name!r} has non-finite weights; refusing to merge them.")
    merged = []
    for name, layer in layers.items():
        plain = layer.to_dense()  # type: ignore[attr-defined]
        with torch.no_grad():
            plain.weight.masked_fill_(plain.weight == 0, 0.0)  # W * Mf keeps the sign of pruned weights: -0.0
        _set_submodule(model, name, plain)
        if layer.spec.masked:
            merged.append(name)
    model.bimask_sparse_layers = sorted(set(getattr(model, "bimask_sparse_layers", [])) | set(merged))  # type: ignore[assignment]
    if hasattr(model, "bimask_notes"):
        del model.bimask_notes
    _remove_save_overrides(model)  # a merged model is a plain one: its own save_pretrained applies again
    return model


merge_and_unload = merge


def project_(model: nn.Module) -> None:
    """Prune every Bi-Mask layer's parameter in place (``post`` mode calls this after each step).

    Args:
        model: A model patched by :func:`sparsify`.
    """
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
    progress: bool | None = None,
) -> dict[str, float]:
    """Search new backward-mask permutations for every bi-directional layer.

    The generator of each layer is seeded from ``(seed, step, layer index)``. With several processes
    each rank searches its share of the layers and broadcasts the results
    (:func:`bimask_hf.distributed.search_permutations_shared`), so all ranks end with the permutations
    a single process finds; call it on every rank.

    Args:
        model: A model patched by :func:`sparsify` (wrapped by DDP/FSDP2 or not).
        step: The training step; seeds the search (with ``seed`` and the layer's index).
        method: The search (default ``model.bimask_config.permutation_search``).
        num_candidates: Candidates of the ``random`` search (default ``model.bimask_config.num_permutations``).
        seed: The seed (default ``model.bimask_config.seed``).
        progress: A bar over the layers on the main process: ``None`` (default) when stderr is a terminal
            and progress bars are on (``transformers.utils.logging.disable_progress_bar()`` turns them off),
            ``True`` always, ``False`` never.

    Returns:
        ``{"seconds": this rank's search time, "retention_mean": ..., "retention_min": ...}`` after the refresh.
    """
    config: BiMaskConfig = getattr(model, "bimask_config", None) or BiMaskConfig()
    method = method or config.permutation_search
    num_candidates = num_candidates or config.num_permutations
    seed = config.seed if seed is None else seed
    layers, generators = [], []
    for index, layer in enumerate(sparse_layers(model).values()):
        if not MODE_TABLE[layer.effective_mode].backward_mask:
            continue
        generator = torch.Generator(device=layer.weight.device)
        generator.manual_seed(_layer_seed(seed, step, index))
        layers.append(layer)
        generators.append(generator)
    seconds = search_permutations_shared(layers, generators, method, num_candidates, progress=progress)
    stats: dict[str, float] = {"seconds": seconds}
    after = sparsity_stats(report(model).rows)
    if after.retention_mean is not None:
        stats["retention_mean"] = after.retention_mean
        stats["retention_min"] = after.retention_min  # type: ignore[assignment]
    return stats


