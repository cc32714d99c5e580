"""`load_sparse_model`: load a saved sparse model with the plain libraries and re-patch it for training."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import tempfile
from typing import Any

import torch.nn as nn

from .. import inspection
from ..checks import PATTERN_FIELDS, config_differences, describe
from ..compression import NM_WEIGHTS_NAME, load_nm_safetensors
from ..config import BiMaskConfig
from ..errors import ConflictingSettingsError, NMPatternError
from ..masks import unstructured_keep_count
from ..patching import sparsify
from .files import (
    MODEL_CONFIG_NAME,
    SAFE_WEIGHTS_NAME,
    corrupt,
    read_bimask_meta,
    read_json,
    resolve_folder,
    tensor_shapes,
    weight_files,
)

logger = logging.getLogger(__name__)

__all__ = ["check_nm", "load_sparse_model", "load_plain_model"]


def load_plain_model(folder: str, model_class: Any = None) -> nn.Module:
    """Load ``folder`` with transformers or timm alone, chosen from ``config.json``.

    A transformers config (``model_type``, TimmWrapper's ``timm_wrapper`` included) goes to
    ``AutoModelForImageClassification.from_pretrained``; a bare timm config (``architecture`` and no
    ``model_type``) to ``timm.create_model("local-dir:<folder>", pretrained=True)``. Only safetensors
    weights are read.

    Args:
        folder (`str`): A local model folder.
        model_class (`Any`, *optional*): A class with ``from_pretrained`` to load any folder with instead.

    Returns:
        `nn.Module`: The plain (unpatched) model.

    Raises:
        FileNotFoundError: If the folder has no ``config.json``.
        ValueError: If the config is neither transformers' nor timm's and no ``model_class`` is given.
    """
    path = os.path.join(folder, MODEL_CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No {MODEL_CONFIG_NAME} in {folder!r}: it does not hold a transformers or timm model.")
    model_config = read_json(path, "Model config")
    from ..models import cifar as _registered  # noqa: F401  (timm names of bimask-hf's CIFAR models)

    if model_class is not None:
        return model_class.from_pretrained(folder, use_safetensors=True)
    if "model_type" in model_config:
        from transformers import AutoModelForImageClassification

        return AutoModelForImageClassification.from_pretrained(folder, use_safetensors=True)
    if "architecture" in model_config:
        import timm

        return timm.create_model(f"local-dir:{folder}", pretrained=True)
    raise ValueError(
        f"{path} has neither 'model_type' (transformers) nor 'architecture' (timm); pass model_class=... "
        "with a from_pretrained method."
    )


def _resolve_layer_names(model: nn.Module, names: list[str]) -> list[str]:
    """Saved sparse-layer names as module names of ``model``.

    They match exactly when the same library loads the folder; a timm folder loaded through
    TimmWrapper (or the reverse) differs by the ``timm_model.`` prefix, so prefixes are added or dropped.
    """
    modules = {n for n, mod in model.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d))}
    resolved = []
    for name in names:
        if name in modules:
            resolved.append(name)
            continue
        found = [m for m in modules if m.endswith("." + name)]
        if not found:
            parts = name.split(".")
            found = [s for s in (".".join(parts[i:]) for i in range(1, len(parts))) if s in modules][:1]
        if len(found) != 1:
            raise ValueError(
                f"Saved sparse layer {name!r} is not a Linear/Conv2d of the loaded {type(model).__name__} "
                f"({'ambiguous: ' + ', '.join(sorted(found)) if found else 'no such module'})."
            )
        resolved.append(found[0])
    return resolved


def _verify_pattern(model: nn.Module, names: list[str], config: BiMaskConfig, source: str) -> None:
    try:
        if config.density is None:
            inspection.check_nm(model, config.n, config.m, layers=names, group_layout=config.group_layout)
            return
        for name in names:
            weight = model.get_submodule(name).weight
            kept = int((weight != 0).sum())
            allowed = unstructured_keep_count(config.density, weight.numel())
            if kept > allowed:
                raise NMPatternError(
                    f"Layer {name!r} keeps {kept} of {weight.numel()} weights, more than density "
                    f"{config.density}. Re-sparsify it or load with resparsify=True."
                )
    except NMPatternError as error:
        raise NMPatternError(f"{source}: {error}") from error


def _restricted_config(config: BiMaskConfig, names: list[str], model: nn.Module) -> BiMaskConfig:
    """The saved config targeting exactly ``names``.

    A list target also matches name suffixes; when a saved name is a suffix of another layer's name
    the targets become an exact-match regex instead.
    """
    modules = [n for n, _ in model.named_modules()]
    chosen = set(names)
    ambiguous = any(m not in chosen and any(m.endswith("." + n) for n in names) for m in modules)
    targets: str | list[str] = "|".join(f"(?:{re.escape(n)})" for n in names) if ambiguous else list(names)
    return dataclasses.replace(config, target_modules=targets, exclude_modules=None)


def load_sparse_model(
    repo_id_or_dir: str | os.PathLike,
    *,
    resparsify: bool = False,
    model_class: Any = None,
    config: BiMaskConfig | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Load a model saved by :func:`save_sparse_model` from a folder or a Hub repo, ready to fine-tune.

    The model is built by the plain libraries (see :func:`load_plain_model`), every saved sparse layer
    is checked to hold its N:M pattern, and the model is patched with :func:`bimask_hf.sparsify` using the
    saved config restricted to the saved layers. N:M-compressed folders are decompressed bit-exactly.
    Download options are ignored for a local folder, as transformers does; ``HF_ENDPOINT`` is honoured.

    Args:
        repo_id_or_dir (`str` or `os.PathLike`): A local folder or Hub repo id.
        resparsify (`bool`, *optional*, defaults to `False`): Re-prune a layer that does not hold its N:M
            pattern through the forward mask, instead of raising.
        model_class (`Any`, *optional*): A class with ``from_pretrained`` to build the model with.
        config (`BiMaskConfig`, *optional*): How the loaded model is to be fine-tuned: its mode, decay and
            permutation settings replace the saved ones, while N, M, density, group layout and layer
            selection must equal the folder's (they are what its weights are).
        **kwargs: ``BiMaskConfig`` fields (``n=``, ``m=``, ``mode=``, ...; as ``config``, on top of it), and
            the options of ``huggingface_hub.snapshot_download`` (``revision``, ``cache_dir``, ``token``,
            ``force_download``, ``local_files_only``, ``endpoint``, ...).

    Returns:
        `nn.Module`: The patched model (unpatched if the folder records no sparse layers).

    Raises:
        NMPatternError: Naming the first saved layer that is not N:M (without ``resparsify``).
        CorruptCheckpointError: Naming a damaged weight file.
        ConflictingSettingsError: Naming both values when ``config`` asks for another pattern or layers.
        TypeError: For unknown keywords, a ``config`` that is not a ``BiMaskConfig``, or a ``revision``
            (which a folder cannot select) with a local folder.
        FileNotFoundError: If the folder was not saved by bimask-hf.
    """
    source = os.fspath(repo_id_or_dir)
    asked, hub_kwargs = _split_keywords(source, config, kwargs)
    folder = resolve_folder(source, **hub_kwargs)
    meta = read_bimask_meta(folder, source)
    config = BiMaskConfig.from_dict(meta)
    if asked is not None:
        config = _agreed_config(config, asked, source)
    files = weight_files(folder)
    tensor_shapes(folder, files)  # truncated / overwritten files fail here, naming the file

    if files == [NM_WEIGHTS_NAME]:
        model = _load_compressed(folder, model_class)
    else:
        model = load_plain_model(folder, model_class)

    from .preprocessing import read_preprocessing

    # Saving the model again (save_sparse_model, save_pretrained) keeps the folder's preprocessing.
    model.bimask_data_config = read_preprocessing(folder)  # type: ignore[assignment]
    saved: list[str] = list(meta.get("sparse_layers") or [])
    if not saved:
        logger.warning("%s records no sparse layers (mode=%s); returning the model unpatched.", source, config.mode)
        return model
    names = _resolve_layer_names(model, saved)
    if resparsify:
        logger.info("resparsify=True: %d layers are re-pruned to %s by the forward mask.", len(names), config.pattern)
    else:
        _verify_pattern(model, names, config, source)
    sparsify(model, _restricted_config(config, names, model))
    return model


# snapshot_download's options about how to download (a local folder ignores them, as transformers does).
_DOWNLOAD_OPTIONS = frozenset({
    "cache_dir", "token", "force_download", "local_files_only", "endpoint", "etag_timeout", "max_workers",
    "headers", "user_agent", "library_name", "library_version", "tqdm_class",
})
# ... and those that select what is loaded: meaningless for a local folder.
_HUB_SELECTION = frozenset({"revision", "local_dir"})


def _split_keywords(
    source: str, config: BiMaskConfig | None, kwargs: dict[str, Any]
) -> tuple[BiMaskConfig | None, dict[str, Any]]:
    """The config the caller asks for (``config`` with field keywords on top) and the Hub options."""
    fields = set(BiMaskConfig().to_dict())
    overrides = {k: v for k, v in kwargs.items() if k in fields}
    hub_kwargs = {k: v for k, v in kwargs.items() if k not in fields}
    unknown = sorted(set(hub_kwargs) - _DOWNLOAD_OPTIONS - _HUB_SELECTION)
    if unknown:
        raise TypeError(
            f"load_sparse_model() got unexpected keyword(s) {unknown}: it takes resparsify, model_class, config, "
            f"BiMaskConfig fields ({', '.join(sorted(fields))}) and the download options "
            f"{', '.join(sorted(_DOWNLOAD_OPTIONS | _HUB_SELECTION))}."
        )
    local = sorted(set(hub_kwargs) & _HUB_SELECTION)
    if local and os.path.isdir(source):
        raise TypeError(
            f"load_sparse_model() got {', '.join(f'{k}={hub_kwargs[k]!r}' for k in local)}, which selects files of a "
            f"Hub repo, but {source!r} is a local folder: drop it, or pass the Hub repo id."
        )
    if config is not None and not isinstance(config, BiMaskConfig):
        raise TypeError(f"config must be a BiMaskConfig, got {type(config).__name__}.")
    if not overrides:
        return config, hub_kwargs
    return BiMaskConfig.from_dict({**(config or BiMaskConfig()).to_dict(), **overrides}), hub_kwargs


def _agreed_config(saved: BiMaskConfig, asked: BiMaskConfig, source: str) -> BiMaskConfig:
    """``asked``, if its pattern and layer selection are the folder's; :class:`ConflictingSettingsError` if not."""
    differences = config_differences(saved, asked, PATTERN_FIELDS)
    if differences:
        held, wanted = describe(differences, 0), describe(differences, 1)
        raise ConflictingSettingsError(
            f"{source} holds a model saved with {held}, but load_sparse_model was asked for {wanted}. Pass "
            f"{held} (or leave them out) to load it as saved; for {wanted}, load it with transformers/timm "
            "(bimask_hf.hub.load_plain_model) and call bimask_hf.sparsify(model, BiMaskConfig(...))."
        )
    return asked
def check_nm(
    model_or_state_dict: Any,
    n: int | None = None,
    m: int | None = None,
    layers: Any = None,
    group_layout: str | None = None,
    *,
    saved: Any = None,
) -> list[str]:
    """Verify that weights follow ``n:m`` (at most ``n`` nonzeros in every group of ``m``).

    A folder (or Hub id) written by :func:`save_sparse_model` is checked as saved: its ``bimask_config.json``
    gives N, M, the group layout and the sparse layers, and its weights (compressed ones too) are read.
    Explicit ``n`` / ``m`` / ``group_layout`` win over what the folder or ``saved`` records.

    Args:
        model_or_state_dict (`nn.Module`, `Mapping[str, torch.Tensor]`, `str` or `os.PathLike`): A model, a
            state dict, or a saved folder / Hub id.
        n (`int`, *optional*): Most nonzeros per group (default: the saved N).
        m (`int`, *optional*): Group size (default: the saved M).
        layers (`Iterable[str]`, *optional*): The layers to check. By default, for a model its Bi-Mask layers
            (their forward weights ``W * Mf``) and the layers recorded by :func:`merge`; for a state dict
            (names ``"<layer>"`` or ``"<layer>.weight"``) every 2-D/4-D ``.weight`` whose K allows the
            pattern; with ``saved``, the recorded sparse layers (a TimmWrapper's ``timm_model.`` prefix is
            matched either way).
        group_layout (`str`, *optional*): ``"channels_last"`` (default) or ``"flat"``, or the saved one.
        saved (`str`, `os.PathLike` or `Mapping`, *optional*): A folder saved by bimask-hf, or its loaded
            ``bimask_config.json`` dict, whose N, M, layout and sparse layers apply to a model or state dict.

    Returns:
        `list[str]`: The checked layer names.

    Raises:
        NMPatternError: Naming the first offending layer.
        ValueError: If N and M are not known, or no sparse layers are found or recorded.
    """
    if isinstance(model_or_state_dict, (str, os.PathLike)):
        model_or_state_dict, saved_meta = load_folder_for_check(model_or_state_dict)
        saved = saved_meta if saved is None else saved
    return inspection.check_nm(model_or_state_dict, n, m, layers, group_layout, saved=saved)


def load_folder_for_check(repo_id_or_dir: str | os.PathLike, **hub_kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """The plain (unpatched) model of a saved folder and its ``bimask_config.json``, whose
    ``sparse_layers`` are renamed to the loaded model's modules; used by ``check_nm(folder)``."""
    source = os.fspath(repo_id_or_dir)
    folder = resolve_folder(source, **hub_kwargs)
    meta = read_bimask_meta(folder, source)
    files = weight_files(folder)
    tensor_shapes(folder, files)
    model = _load_compressed(folder, None) if files == [NM_WEIGHTS_NAME] else load_plain_model(folder)
    meta["sparse_layers"] = _resolve_layer_names(model, list(meta.get("sparse_layers") or []))
    return model, meta


def _load_compressed(folder: str, model_class: Any) -> nn.Module:
    """Decompress ``model.nm.safetensors`` into a temporary plain folder and load that."""
    from safetensors.torch import save_file

    path = os.path.join(folder, NM_WEIGHTS_NAME)
    try:
        state = load_nm_safetensors(path)
    except (KeyError, ValueError) as error:
        raise corrupt(path, f"cannot decompress: {error}") from error
    with tempfile.TemporaryDirectory(prefix="bimask-nm-") as tmp:
        for name in os.listdir(folder):
            if name.endswith(".json"):
                shutil.copy(os.path.join(folder, name), os.path.join(tmp, name))
        save_file(state, os.path.join(tmp, SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
        model = load_plain_model(tmp, model_class)
    _forget_temporary_path(model, folder)
    return model


def _forget_temporary_path(model: nn.Module, folder: str) -> None:
    # Point the loaded model's recorded source at the real folder, not the deleted temporary one.
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "_name_or_path"):
        config._name_or_path = folder
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and "file" in cfg:
        cfg["file"] = folder
