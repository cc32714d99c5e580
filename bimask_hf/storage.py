"""Crash-safe files: the newest complete checkpoint, writable output folders, clear disk-full errors."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator

from accelerate.utils.constants import FSDP_MODEL_NAME
from transformers.utils import (
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

logger = logging.getLogger(__name__)

__all__ = ["StorageError", "check_writable", "last_complete_checkpoint", "storage_errors"]

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# What the Trainer writes as a checkpoint's model: plain, sharded, PEFT adapters, FSDP shards.
_MODEL_FILES = (
    SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME,
    ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME,
)
_MODEL_PREFIXES = (FSDP_MODEL_NAME,)


class StorageError(OSError):
    """Writing a checkpoint or model folder failed for lack of space or permission (the message says which)."""


def _incomplete_reason(path: str) -> str | None:
    """Why a checkpoint folder cannot be resumed from (``None`` if it can)."""
    state = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state):
        return "it has no trainer_state.json (the save was interrupted)"
    try:
        with open(state, encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError) as err:
        return f"its trainer_state.json is unreadable ({err})"
    names = os.listdir(path)
    if not any(n in _MODEL_FILES or n.startswith(_MODEL_PREFIXES) for n in names):
        return f"it has no model weights (none of {', '.join(_MODEL_FILES[:3])}, ...)"
    return None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` of ``output_dir`` that a run can resume from, else ``None``.

    A checkpoint is complete when its ``trainer_state.json`` (the Trainer writes it last) parses and it
    holds model weights. Newer, incomplete checkpoints (a kill during the save) are skipped with a
    warning that says why; the one chosen is logged.
    """
    folder = os.fspath(output_dir)
    if not os.path.isdir(folder):
        return None
    found = sorted(
        ((int(m.group(1)), name) for name in os.listdir(folder) if (m := _CHECKPOINT_RE.match(name))
         and os.path.isdir(os.path.join(folder, name))),
        reverse=True,
    )
    for _, name in found:
        path = os.path.join(folder, name)
        reason = _incomplete_reason(path)
        if reason is None:
            logger.warning("Resuming from %s, the newest complete checkpoint.", path)
            return path
        logger.warning("Skipping %s: %s.", path, reason)
    return None


def _describe(error: BaseException, folder: str) -> str | None:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC or "unexpected pos" in str(error):
        return (f"The disk holding {folder!r} is full (writing failed: {error}). Free space there, or point "
                "--output_dir at another disk (and lower --save_total_limit), then resume the run.")
    if isinstance(error, OSError) and error.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR):
        return (f"Cannot write to {folder!r}: {error.strerror or error}. Choose a writable --output_dir "
                "(or fix the folder's permissions).")
    return None


@contextlib.contextmanager
def storage_errors(folder: str | os.PathLike) -> Iterator[None]:
    """Turn disk-full (``ENOSPC``, torch's "unexpected pos") and read-only errors into one :class:`StorageError`."""
    try:
        yield
    except StorageError:
        raise
    except (OSError, RuntimeError) as error:
        message = _describe(error, os.fspath(folder))
        if message is None:
            raise
        raise StorageError(getattr(error, "errno", None) or errno.EIO, message) from error


def check_writable(folder: str | os.PathLike) -> None:
    """Create ``folder`` if needed and write a probe file in it; :class:`StorageError` if that fails."""
    path = os.fspath(folder)
    with storage_errors(path):
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".bimask-write-check-"):
            pass


def replace_folder_contents(staging: str, folder: str) -> None:
    """Move every file of ``staging`` into ``folder`` with ``os.replace`` (each file atomically), then
    delete ``staging``. A kill leaves each file of ``folder`` either old or new, never half-written."""
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(staging):
        target = os.path.join(folder, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    shutil.rmtree(staging, ignore_errors=True)
