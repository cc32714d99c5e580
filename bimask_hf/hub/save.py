"""`save_sparse_model`: a merged, plain-library-loadable folder with the Bi-Mask config and a model card."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import warnings
from typing import Any

import torch
import torch.nn as nn
from accelerate.utils import extract_model_from_parallel

from ..compression import NM_WEIGHTS_NAME, is_nm_compressible, save_nm_safetensors
from ..config import BiMaskConfig
from ..families import is_timm_wrapper, model_family
from ..inspection import SparsityReport, check_nm, report, sparse_layers
from ..patching import merge
from ..storage import make_staging_folder, replace_folder_contents, storage_errors
from .files import (
    CARD_NAME,
    MODEL_CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    tensor_shapes,
    weight_files,
)

logger = logging.getLogger(__name__)

__all__ = ["save_sparse_model", "model_family"]

FORMAT_DENSE = "safetensors"
FORMAT_COMPRESSED = "nm-compressed"


def _timm_wrapper_config(model: nn.Module, folder: str) -> None:
    """Give a TimmWrapper's ``config.json`` the timm fields that ``timm.create_model`` needs.

    A wrapper built from scratch (not by ``from_pretrained`` of a timm checkpoint) writes no
    ``pretrained_cfg``; timm then parses the whole transformers config as one and fails on keys such
    as ``architectures``. The timm export of the inner model supplies ``pretrained_cfg`` & co.
    """
    import tempfile

    from timm.models import save_for_hf

    path = os.path.join(folder, MODEL_CONFIG_NAME)
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("model_args") is None:
        config.pop("model_args", None)
    if not isinstance(config.get("pretrained_cfg"), dict):
        with tempfile.TemporaryDirectory() as tmp:
            save_for_hf(model.timm_model, tmp, safe_serialization=True)  # timm's public export; its config
            with open(os.path.join(tmp, MODEL_CONFIG_NAME), encoding="utf-8") as f:
                timm_config = json.load(f)
        config["pretrained_cfg"] = timm_config["pretrained_cfg"]
        for key in ("num_features", "global_pool"):
            if key in timm_config:
                config.setdefault(key, timm_config[key])
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def _save_transformers(model: nn.Module, folder: str) -> None:
    """``save_pretrained``; a TimmWrapper is written in timm's own format so timm reads it too.

    transformers strips the ``timm_model.`` prefix on save only for a wrapper that ``from_pretrained``
    loaded (it reverses the recorded load-time renaming); a wrapper built from a config would be
    saved with prefixed keys that timm cannot load. Passing the prefix-free state dict makes both cases
    write the same timm-compatible file, which TimmWrapper loads back (it adds the prefix on load).
    """
    if not is_timm_wrapper(model):
        model.save_pretrained(folder)
        return
    state = {k.removeprefix("timm_model."): v for k, v in model.state_dict().items()}
    model.save_pretrained(folder, state_dict=state)
    _timm_wrapper_config(model, folder)


def _save_timm(model: nn.Module, folder: str) -> None:
    """timm's own Hub export, adjusted so that transformers' TimmWrapper reads it too.

    timm >= 1.0.20 records ``num_classes`` inside ``model_args``; TimmWrapperForImageClassification
    passes ``num_classes=config.num_labels`` *and* ``**model_args`` to ``timm.create_model``, which then
    fails with "got multiple values for keyword argument 'num_classes'". ``num_classes`` stays at the
    config's top level, where both libraries read it.
    """
    from timm.models import save_for_hf

    save_for_hf(model, folder, safe_serialization=True)
    path = os.path.join(folder, MODEL_CONFIG_NAME)
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    model_args = config.get("model_args") or {}
    if model_args.get("num_classes") == config.get("num_classes"):
        model_args.pop("num_classes", None)
        if model_args:
            config["model_args"] = model_args
        else:
            config.pop("model_args", None)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def _compress_folder(folder: str, files: list[str], config: BiMaskConfig) -> dict[str, Any]:
    """Rewrite the weight files as one ``model.nm.safetensors``; returns the compressed keys and sizes.

    The files may name tensors differently from the modules (transformers 5 saves its models in their
    original checkpoint layout, e.g. ViT's ``attention.attention.key`` for the module
    ``attention.k_proj``, and may fuse tensors), so the tensors to compress are found by content:
    every weight that is N:M sparse and stored bit-exactly (see ``is_nm_compressible``), which includes
    every merged sparse layer; the rest stays dense.
    """
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(os.path.join(folder, name)))
    keys = [k for k, v in state.items() if is_nm_compressible(v, config.n, config.m, config.group_layout)]
    sizes = save_nm_safetensors(state, os.path.join(folder, NM_WEIGHTS_NAME), keys, config.n, config.m, config.group_layout)
    for name in files + [SAFE_WEIGHTS_INDEX_NAME]:
        if os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    ratio = round(sizes["stored_bytes"] / max(1, sizes["dense_bytes"]), 4)
    return {"compressed_keys": sorted(keys), **sizes, "ratio": ratio}


def save_sparse_model(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    config: BiMaskConfig | None = None,
    compressed: bool = False,
    card_data: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    safe_serialization: bool = True,
    data_config: dict[str, Any] | None = None,
) -> str:
    """Save a Bi-Mask model as a folder that plain transformers / timm load; returns the folder path.

    The caller's model is not touched: a deep copy is merged (:func:`bimask_hf.merge`), so pruned
    weights are exactly ``+0.0`` in the safetensors file and no ``bimask_permutation`` buffer is
    written. transformers models (``TimmWrapperForImageClassification`` included) are written with
    ``save_pretrained``; bare timm models with timm's Hub export (``config.json`` with ``architecture``),
    readable by ``timm.create_model("hf-hub:...")`` and ``AutoModelForImageClassification``.
    ``bimask_config.json`` records the config, the ``sparse_layers``, the ``pattern`` and the library
    version; ``README.md`` is a model card (:func:`create_model_card`, fed by ``card_data`` — its keyword
    arguments — and ``metrics``, e.g. ``{"top1": 77.4, "top5": 93.7, "dataset": "imagenet-1k",
    "split": "validation"}``).

    With ``compressed=True`` the weights go to ``model.nm.safetensors`` with N:M layers stored as kept
    values + bit-packed indices (a 2:4 fp16 layer takes 0.56 of its dense size); such a folder is read
    by :func:`load_sparse_model` only. Weights are always safetensors; ``safe_serialization=False`` is
    accepted for Trainer compatibility but nothing is ever pickled.

    ``data_config`` is the preprocessing the model was trained with (``ImageClassificationData.data_config``:
    input size, channels, mean/std, interpolation, crop): timm and TimmWrapper folders record it as the
    ``pretrained_cfg`` of ``config.json``, other transformers models as ``preprocessor_config.json``, so
    ``transformers.pipeline("image-classification", model=folder)`` and ``bimask-eval`` preprocess images
    the way training evaluated them. Without it a timm model's own ``pretrained_cfg`` is kept.
    """

    if not safe_serialization:
        warnings.warn(
            "save_sparse_model always writes safetensors; safe_serialization=False is ignored (no pickles).",
            UserWarning,
            stacklevel=2,
        )
    model = extract_model_from_parallel(model, keep_torch_compile=False)  # DDP, DataParallel, torch.compile
    config = config or getattr(model, "bimask_config", None)
    if config is None:
        raise ValueError("save_sparse_model needs a BiMaskConfig: pass config=... or call bimask_hf.sparsify first.")
    if compressed and config.density is not None:
        raise ValueError(f"compressed=True stores N:M layers; this model is {config.pattern} (save it uncompressed).")
    family = model_family(model)
    # Retention needs the live Bi-Mask layers, so the report is taken before merging the copy.
    layer_report: SparsityReport | None = report(model) if sparse_layers(model) else None

    export = copy.deepcopy(model)
    merge(export)
    layers: list[str] = list(getattr(export, "bimask_sparse_layers", []))
    if not layers and config.mode != "dense":
        raise ValueError(
            f"{type(model).__name__} has no Bi-Mask layers (and none merged earlier): call "
            "bimask_hf.sparsify(model, config) and train it before saving."
        )
    with torch.no_grad():
        for name in layers:  # -0.0 and +0.0 are both exact zeros; store one of them
            weight = export.get_submodule(name).weight
            weight.masked_fill_(weight == 0, 0.0)
    if layers and config.density is None:
        check_nm(export, config.n, config.m, layers=layers, group_layout=config.group_layout)

    folder = os.fspath(save_directory)
    # Everything is written to a staging folder beside the target, which is then swapped in atomically:
    # a kill (or a full disk) during the save leaves the previous model loadable.
    with storage_errors(folder):
        os.makedirs(folder, exist_ok=True)
        staging = make_staging_folder(folder)
        try:
            _write_folder(export, model, staging, folder, family=family, config=config, layers=layers,
                          compressed=compressed, card_data=card_data, metrics=metrics, data_config=data_config,
                          layer_report=layer_report)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        # A re-save must not keep the other format's weights: they leave with the previous folder.
        stale = {NM_WEIGHTS_NAME, SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME} - set(os.listdir(staging))
        replace_folder_contents(staging, folder, drop=stale)
    return folder


def _write_folder(export: nn.Module, model: nn.Module, folder: str, target: str, *, family: str,
                  config: BiMaskConfig, layers: list[str], compressed: bool, card_data: dict[str, Any] | None,
                  metrics: dict[str, Any] | None, data_config: dict[str, Any] | None,
                  layer_report: SparsityReport | None) -> None:
    """Write the whole model folder into ``folder`` (the staging folder of ``target``)."""
    from .cards import bimask_architecture, create_model_card, default_library_name

    if family == "transformers":
        _save_transformers(export, folder)
    else:
        _save_timm(export, folder)
    if data_config is not None:
        from .preprocessing import write_preprocessing

        write_preprocessing(export, folder, family, data_config)
    elif family == "transformers" and not is_timm_wrapper(export):
        logger.warning(
            "save_sparse_model: no data_config, so %s records no preprocessing and "
            "pipeline('image-classification') cannot load it; pass data_config=data.data_config.", target,
        )
    files = weight_files(folder)
    tensor_shapes(folder, files)  # what was written reads back
    extra: dict[str, Any] = {}
    if compressed:
        extra["compression"] = _compress_folder(folder, files, config)
        logger.info("Compressed %s: %.3f of the dense size", target, extra["compression"]["ratio"])

    from .. import __version__

    config.save_pretrained(
        folder,
        sparse_layers=layers,
        pattern=config.pattern,
        library_version=__version__,
        model_family=family,
        weights_format=FORMAT_COMPRESSED if compressed else FORMAT_DENSE,
        **extra,
    )
    card_kwargs = dict(card_data or {})
    card_kwargs.setdefault("model_name", os.path.basename(os.path.abspath(target)))
    card_kwargs.setdefault("compressed", compressed)
    # A compressed folder is read by bimask-hf only: the Hub must not offer a timm/transformers snippet.
    card_kwargs.setdefault("library_name", "bimask-hf" if compressed else default_library_name(model))
    # From the merged copy: a patched model's card is built from its report, which knows no architecture.
    card_kwargs.setdefault("custom_architecture", bimask_architecture(export))
    if data_config is not None and data_config.get("input_size"):
        card_kwargs.setdefault("in_chans", int(data_config["input_size"][0]))
    card = create_model_card(layer_report if layer_report is not None else export, config, metrics=metrics, **card_kwargs)
    card.save(os.path.join(folder, CARD_NAME))
