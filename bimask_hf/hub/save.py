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
from ..distributed import is_sharded
from ..families import is_timm_wrapper, model_family
from ..inspection import SparsityReport, check_nm, report, sparse_layers
from ..modes import mode_spec
from ..patching import merge, register_save_routes
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

__all__ = ["save_sparse_model", "model_family", "push_folder", "sparse_save_pretrained", "sparse_push_to_hub"]

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
    push_to_hub: bool = False,
    repo_id: str | None = None,
    **hub_kwargs: Any,
) -> str:
    """Save a Bi-Mask model as a folder that plain transformers / timm load.

    The caller's model is not touched: a deep copy is merged (:func:`bimask_hf.merge`), so pruned
    weights are exactly ``+0.0`` in the safetensors file and no ``bimask_permutation`` buffer is
    written. transformers models (``TimmWrapperForImageClassification`` included) are written with
    ``save_pretrained``; bare timm models with timm's Hub export (``config.json`` with ``architecture``),
    readable by ``timm.create_model("hf-hub:...")`` and ``AutoModelForImageClassification``.
    ``bimask_config.json`` records the config, the ``sparse_layers``, the ``pattern`` and the library
    version; ``README.md`` is a model card (:func:`create_model_card`).

    Args:
        model: A model patched by :func:`bimask_hf.sparsify` (wrapped by DDP or ``torch.compile`` or not).
        save_directory: The folder; replaced atomically when it exists.
        config: The settings to record (default ``model.bimask_config``).
        compressed: Write the weights to ``model.nm.safetensors`` with N:M layers stored as kept values +
            bit-packed indices (a 2:4 fp16 layer takes 0.56 of its dense size); such a folder is read by
            :func:`load_sparse_model` only.
        card_data: Model-card fields (:func:`create_model_card`'s keyword arguments).
        metrics: Evaluation results for the card, e.g. ``{"top1": 77.4, "top5": 93.7, "dataset":
            "imagenet-1k", "split": "validation"}``.
        safe_serialization: Accepted for Trainer compatibility; weights are always safetensors, never pickled.
        data_config: The preprocessing the model was trained with (``ImageClassificationData.data_config``:
            input size, channels, mean/std, interpolation, crop): timm and TimmWrapper folders record it as
            the ``pretrained_cfg`` of ``config.json``, other transformers models as
            ``preprocessor_config.json``, so ``transformers.pipeline("image-classification", model=folder)``
            and ``bimask-eval`` preprocess images the way training evaluated them. Default: the
            preprocessing of the folder the model was loaded from (:func:`load_sparse_model` records it) or
            a timm model's own ``pretrained_cfg``.
        push_to_hub: Then upload the folder to the Hub repo ``repo_id``, created if needed; the card's
            snippets name the pushed repo.
        repo_id: The repo (default: the folder's name under your namespace).
        **hub_kwargs: ``token``, ``private``, ``revision``, ``commit_message``, ``create_pr``, ``endpoint``
            for ``huggingface_hub`` (``HF_ENDPOINT`` is read at call time).

    Returns:
        The folder's path.

    Raises:
        TypeError: An unknown keyword.
        ValueError: Hub keywords without ``push_to_hub=True``, no config, ``compressed=True`` for an
            unstructured model, or an FSDP2-sharded model (gather it first).
    """
    unknown = sorted(set(hub_kwargs) - set(_HUB_KEYWORDS))
    if unknown:
        raise TypeError(f"save_sparse_model() got unexpected keyword argument(s) {unknown}; Hub keywords: "
                        f"{', '.join(_HUB_KEYWORDS)} (with push_to_hub=True).")
    if (repo_id is not None or hub_kwargs) and not push_to_hub:
        raise ValueError("repo_id and Hub keywords are used with push_to_hub=True only; pass push_to_hub=True.")
    if push_to_hub:
        repo_id = _create_repo(repo_id or os.path.basename(os.path.abspath(os.fspath(save_directory))), **hub_kwargs)
        card_data = {**(card_data or {}), "repo_id": repo_id}

    if not safe_serialization:
        warnings.warn(
            "save_sparse_model always writes safetensors; safe_serialization=False is ignored (no pickles).",
            UserWarning,
            stacklevel=2,
        )
    model = extract_model_from_parallel(model, keep_torch_compile=False)  # DDP, DataParallel, torch.compile
    if any(is_sharded(p) for p in model.parameters()):
        # each rank holds a slice of every weight: merging and writing them would save a fraction of the model
        raise ValueError(
            "save_sparse_model got an FSDP2-sharded model: each rank holds only a slice of its weights. Gather them "
            "first on every rank: full = bimask_hf.distributed.gather_full_model(model, template, keep=is_main) "
            "with template = bimask_hf.distributed.meta_copy(model) made before the model was sharded, then save "
            "`full` on the main process; or train with bimask_hf.BiMaskTrainer, whose save_model does this."
        )
    config = config or getattr(model, "bimask_config", None)
    if config is None:
        raise ValueError("save_sparse_model needs a BiMaskConfig: pass config=... or call bimask_hf.sparsify first.")
    if compressed and config.density is not None:
        raise ValueError(f"compressed=True stores N:M layers; this model is {config.pattern} (save it uncompressed).")
    family = model_family(model)
    if data_config is None:
        data_config = getattr(model, "bimask_data_config", None)
    # Retention needs the live Bi-Mask layers, so the report is taken before merging the copy.
    layer_report: SparsityReport | None = report(model) if sparse_layers(model) else None

    export = copy.deepcopy(model)
    merge(export)
    layers: list[str] = list(getattr(export, "bimask_sparse_layers", []))
    if not layers and mode_spec(config.mode).masked:
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
    if push_to_hub:
        push_folder(folder, repo_id, **hub_kwargs)  # type: ignore[arg-type]
    return folder


_HUB_KEYWORDS = ("token", "private", "revision", "commit_message", "commit_description", "create_pr", "endpoint")


def _hub_api(token: Any = None, endpoint: str | None = None) -> Any:
    from huggingface_hub import HfApi

    endpoint = endpoint or (os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None  # read at call time
    return HfApi(endpoint=endpoint, token=token)


def _create_repo(repo_id: str, *, token: Any = None, private: bool | None = None, endpoint: str | None = None,
                 **_: Any) -> str:
    """Create (or find) the Hub repo; returns its full id ``namespace/name``."""
    return _hub_api(token, endpoint).create_repo(repo_id, private=private, exist_ok=True).repo_id


def push_folder(folder: str, repo_id: str, *, token: Any = None, private: bool | None = None,
                revision: str | None = None, commit_message: str | None = None,
                commit_description: str | None = None, create_pr: bool = False, endpoint: str | None = None) -> Any:
    """Upload a folder written by :func:`save_sparse_model` to ``repo_id`` (created if needed).

    Args:
        folder: The folder.
        repo_id: The Hub repo.
        token: A Hub token (default: the logged-in one).
        private: Create the repo private.
        revision: The branch (created if needed).
        commit_message: The commit message.
        commit_description: The commit description.
        create_pr: Open a pull request instead of committing.
        endpoint: The Hub endpoint (default ``HF_ENDPOINT``).

    Returns:
        ``huggingface_hub``'s ``CommitInfo``.
    """
    api = _hub_api(token, endpoint)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
        commit_message=commit_message or "Upload N:M sparse model (bimask-hf)", commit_description=commit_description,
    )


# ---- transformers' save_pretrained / push_to_hub on a model under Bi-Mask training -------------------
# ``sparsify`` puts these on the instance (see ``bimask_hf.patching``), so the plain calls write what
# save_sparse_model writes; inside ``training_state(model)`` (Trainer checkpoints) the class's own
# save_pretrained keeps the dense weights and permutations a resumed run needs.
_IGNORED_SAVE_KEYWORDS = {"safe_serialization", "max_shard_size", "save_peft_format", "save_original_format"}


def _plain_call(model: nn.Module, name: str) -> Any:
    from ..patching import in_training_state

    if not sparse_layers(model) or in_training_state(model):
        return getattr(type(model), name).__get__(model)
    return None


def sparse_save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *args: Any,
                           is_main_process: bool = True, state_dict: Any = None, push_to_hub: bool = False,
                           **kwargs: Any) -> Any:
    """``model.save_pretrained`` of a transformers model under Bi-Mask training: :func:`save_sparse_model`.

    Writes the merged, exact N:M weights (no ``bimask_permutation`` buffers), ``bimask_config.json``, the
    model card and the preprocessing the model was loaded with. Keywords that only shape transformers'
    files (``max_shard_size``, ``safe_serialization``) are accepted; ``push_to_hub=True`` with ``repo_id``,
    ``token``, ``private``, ``commit_message`` uploads the folder as well.

    Args:
        model: The sparsified transformers model (the method's ``self``).
        save_directory: The folder.
        *args: Refused (``save_sparse_model`` takes none).
        is_main_process: Only the main process writes.
        state_dict: Refused: the folder holds the merged weights.
        push_to_hub: Also upload the folder.
        **kwargs: ``save_pretrained``'s other keywords (Hub ones with ``push_to_hub``).

    Returns:
        The folder's path; None off the main process.
    """
    plain = _plain_call(model, "save_pretrained")
    if plain is not None:
        return plain(save_directory, *args, is_main_process=is_main_process, state_dict=state_dict,
                     push_to_hub=push_to_hub, **kwargs)
    if args or state_dict is not None or kwargs.get("variant") is not None:
        raise ValueError(
            "save_pretrained of a model under Bi-Mask training writes its merged N:M weights with "
            "bimask_hf.save_sparse_model, which takes no positional arguments, state_dict or variant. Call "
            "bimask_hf.save_sparse_model(model, folder) (the publishable folder), or save inside "
            "bimask_hf.patching.training_state(model) for a training checkpoint (dense weights and permutations)."
        )
    if not is_main_process:
        return None
    hub = {k: kwargs.pop(k) for k in list(kwargs) if k in _HUB_KEYWORDS or k == "repo_id"}
    ignored = {k: kwargs.pop(k) for k in list(kwargs) if k in _IGNORED_SAVE_KEYWORDS}
    if kwargs:
        raise TypeError(f"save_pretrained of a Bi-Mask model got unexpected keyword argument(s) {sorted(kwargs)}.")
    if ignored.get("safe_serialization") is False:
        logger.warning("safe_serialization=False is ignored: bimask-hf writes safetensors only.")
    return save_sparse_model(model, save_directory, push_to_hub=push_to_hub, **hub)


def sparse_push_to_hub(model: nn.Module, repo_id: str, *, commit_message: str | None = None,
                       commit_description: str | None = None, private: bool | None = None, token: Any = None,
                       revision: str | None = None, create_pr: bool = False, max_shard_size: Any = None,
                       tags: list[str] | None = None) -> Any:
    """``model.push_to_hub`` of a transformers model under Bi-Mask training: the folder of
    :func:`save_sparse_model` (bimask-hf's model card included, with ``tags`` added) is uploaded.

    Args:
        model: The sparsified transformers model (the method's ``self``).
        repo_id: The Hub repo (under your namespace when it names none).
        commit_message: The commit message.
        commit_description: The commit description.
        private: Create the repo private.
        token: A Hub token.
        revision: The branch.
        create_pr: Open a pull request instead of committing.
        max_shard_size: Accepted for ``push_to_hub``'s signature.
        tags: Tags added to the card.

    Returns:
        ``huggingface_hub``'s ``CommitInfo``.
    """
    import tempfile

    plain = _plain_call(model, "push_to_hub")
    if plain is not None:
        return plain(repo_id, commit_message=commit_message, commit_description=commit_description, private=private,
                     token=token, revision=revision, create_pr=create_pr, tags=tags,
                     **({"max_shard_size": max_shard_size} if max_shard_size is not None else {}))
    full_id = _create_repo(repo_id, token=token, private=private)
    with tempfile.TemporaryDirectory(prefix="bimask-push-") as tmp:
        folder = save_sparse_model(model, os.path.join(tmp, full_id.split("/")[-1]), card_data={"repo_id": full_id})
        if tags:
            from huggingface_hub import ModelCard

            card = ModelCard.load(os.path.join(folder, CARD_NAME))
            card.data.tags = list(card.data.tags or []) + [t for t in tags if t not in (card.data.tags or [])]
            card.save(os.path.join(folder, CARD_NAME))
        return push_folder(folder, full_id, token=token, private=private, revision=revision,
                           commit_message=commit_message, commit_description=commit_description, create_pr=create_pr)


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

    from ..version import __version__

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
    from .preprocessing import pipeline_loads

    first_conv = next((m for m in export.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first_conv.in_channels if first_conv is not None else 3
    if data_config is not None and data_config.get("input_size"):
        channels = int(data_config["input_size"][0])
    card_kwargs.setdefault("in_chans", channels)
    card_kwargs.setdefault("pipeline", pipeline_loads(folder, channels))
    card_kwargs.setdefault("trained_preprocessing", data_config is not None)
    card = create_model_card(layer_report if layer_report is not None else export, config, metrics=metrics, **card_kwargs)
    card.save(os.path.join(folder, CARD_NAME))


register_save_routes(save_pretrained=sparse_save_pretrained, push_to_hub=sparse_push_to_hub)
