"""Folder-level helpers shared by saving and loading: weight files, their validation, Hub resolution."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from ..compression import NM_WEIGHTS_NAME
from ..config import CONFIG_NAME
from ..errors import CorruptCheckpointError

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
MODEL_CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
# What a load fetches from the Hub: configs, safetensors weights and the card; never pickles.
HUB_PATTERNS = ["*.json", "*.safetensors", CARD_NAME]


def corrupt(path: str, detail: str) -> CorruptCheckpointError:
    """The error for a damaged weight file, telling the user how to recover.

    Args:
        path (`str`): The damaged file.
        detail (`str`): What is wrong with it.

    Returns:
        `CorruptCheckpointError`: The error, to raise.
    """
    return CorruptCheckpointError(
        f"Weight file {path!r} is corrupted or truncated ({detail}). Re-download it "
        "(e.g. load_sparse_model(..., force_download=True) or delete it from the Hub cache) "
        "or re-save the model with bimask_hf.save_sparse_model."
    )


def weight_files(folder: str) -> list[str]:
    """Names of the safetensors weight files in ``folder`` (single file, shards, or N:M-compressed).

    Args:
        folder (`str`): A local model folder.

    Returns:
        `list[str]`: File names relative to ``folder``.

    Raises:
        CorruptCheckpointError: If the shard index is unreadable.
        FileNotFoundError: If listed shards are missing, or there are no safetensors weights (pickle
            checkpoints are never loaded).
    """
    if os.path.isfile(os.path.join(folder, NM_WEIGHTS_NAME)):
        return [NM_WEIGHTS_NAME]
    if os.path.isfile(os.path.join(folder, SAFE_WEIGHTS_NAME)):
        return [SAFE_WEIGHTS_NAME]
    index = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError) as error:
            raise corrupt(index, f"unreadable shard index: {error}") from error
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise FileNotFoundError(
                f"{index} lists weight shards that are missing from {folder!r}: {missing}. Re-download the model."
            )
        return shards
    others = sorted(f for f in os.listdir(folder) if f.endswith((".bin", ".pth", ".pt", ".ckpt")))
    hint = f" It holds pickle checkpoints {others}, which bimask-hf never loads." if others else ""
    raise FileNotFoundError(
        f"No safetensors weights ({SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME} or {NM_WEIGHTS_NAME}) in "
        f"{folder!r}.{hint} Save the model with bimask_hf.save_sparse_model."
    )


def tensor_shapes(folder: str, files: list[str]) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of every tensor in the safetensors ``files`` of ``folder``; validates each file.

    safetensors checks that the header parses and that the data it describes is all present, which
    catches truncated downloads and overwritten headers.

    Args:
        folder (`str`): A local model folder.
        files (`list[str]`): Weight files in it (see :func:`weight_files`).

    Returns:
        `dict[str, tuple[int, ...]]`: Tensor name to shape.

    Raises:
        CorruptCheckpointError: If a file fails safetensors' checks.
    """
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        path = os.path.join(folder, name)
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except (SafetensorError, OSError, ValueError) as error:
            if isinstance(error, FileNotFoundError):
                raise
            raise corrupt(path, str(error)) from error
    return shapes


def read_json(path: str, what: str) -> dict[str, Any]:
    """Parse a JSON file, with an error naming the file if it is damaged.

    Args:
        path (`str`): The file.
        what (`str`): What the file is, for the message (e.g. ``"Bi-Mask config"``).

    Returns:
        `dict[str, Any]`: The parsed JSON.

    Raises:
        CorruptCheckpointError: If the file is not valid JSON.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as error:
        raise CorruptCheckpointError(
            f"{what} {path!r} is not valid JSON ({error}); re-download or re-save the model."
        ) from error


def is_bimask_folder(folder: str | os.PathLike, **hub_kwargs: Any) -> bool:
    """Whether ``folder`` was written by bimask-hf (it holds ``bimask_config.json``).

    A local folder is looked at; any other name that can be a Hub repo id is asked for that one file:
    a missing file or repo, an invalid id or an unreachable Hub answer ``False``, so the caller loads it
    as a plain transformers/timm model and reports that error.

    Args:
        folder (`str` or `os.PathLike`): A local folder or Hub repo id.
        **hub_kwargs: Passed to ``hf_hub_download`` for a repo id.

    Returns:
        `bool`: True for a bimask-hf folder.
    """
    path = os.fspath(folder)
    if os.path.isdir(path) or _looks_like_path(path):
        return os.path.isfile(os.path.join(path, CONFIG_NAME))
    import httpx
    from huggingface_hub import hf_hub_download

    kwargs = dict(hub_kwargs)
    if "endpoint" not in kwargs and os.environ.get("HF_ENDPOINT"):
        kwargs["endpoint"] = os.environ["HF_ENDPOINT"].rstrip("/")  # read at call time, as resolve_folder does
    try:
        hf_hub_download(repo_id=path, filename=CONFIG_NAME, **kwargs)
    # The Hub client raises OSError subclasses (HTTP, missing repo or file, offline), ValueError
    # (invalid id) or httpx's errors (connection).
    except (OSError, ValueError, httpx.HTTPError):
        return False
    return True


def read_bimask_meta(folder: str, source: str) -> dict[str, Any]:
    """The ``bimask_config.json`` of a resolved ``folder``.

    Args:
        folder (`str`): The local folder (a Hub repo already downloaded).
        source (`str`): The folder or repo id as the user gave it, for messages.

    Returns:
        `dict[str, Any]`: The file's contents, metadata keys included.

    Raises:
        FileNotFoundError: If the folder was not saved by bimask-hf.
        CorruptCheckpointError: If the file is unreadable.
    """
    if not is_bimask_folder(folder):
        raise FileNotFoundError(
            f"{source!r} has no {CONFIG_NAME}: it was not saved by bimask_hf.save_sparse_model. Load it with "
            "transformers/timm and call bimask_hf.sparsify(model, BiMaskConfig(...)) to start sparse training."
        )
    return read_json(os.path.join(folder, CONFIG_NAME), "Bi-Mask config")


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else is meant as a local path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def resolve_folder(repo_id_or_dir: str | os.PathLike, **hub_kwargs: Any) -> str:
    """A local folder as is, or a Hub repo id downloaded with ``snapshot_download``.

    Only configs, safetensors files and the card are fetched. The endpoint is read from ``HF_ENDPOINT``
    at call time (``huggingface_hub`` reads it once at import), unless ``endpoint=`` is given.

    Args:
        repo_id_or_dir (`str` or `os.PathLike`): A local folder or Hub repo id.
        **hub_kwargs: Passed to ``snapshot_download`` (``revision``, ``token``, ``endpoint``, ...).

    Returns:
        `str`: The local folder's path.

    Raises:
        NotADirectoryError: For a file.
        FileNotFoundError: For a local path that does not exist.
    """
    name = os.fspath(repo_id_or_dir)
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise NotADirectoryError(f"{name!r} is a file; pass the folder written by bimask_hf.save_sparse_model.")
    if _looks_like_path(name):
        raise FileNotFoundError(f"Folder {name!r} does not exist (and it is not a Hub repo id like 'org/name').")
    from huggingface_hub import snapshot_download

    kwargs = dict(hub_kwargs)
    kwargs.setdefault("allow_patterns", HUB_PATTERNS)
    if "endpoint" not in kwargs and os.environ.get("HF_ENDPOINT"):
        kwargs["endpoint"] = os.environ["HF_ENDPOINT"].rstrip("/")
    logger.info("Downloading %s from %s", name, kwargs.get("endpoint", "the Hugging Face Hub"))
    return snapshot_download(repo_id=name, **kwargs)  # type: ignore[return-value]
