"""Crash-safe files: the newest complete checkpoint, writable output folders, clear disk-full errors."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Collection, Iterator

from accelerate.utils.constants import FSDP_MODEL_NAME
from transformers.utils import (
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

from .compression import NM_WEIGHTS_NAME

logger = logging.getLogger(__name__)

__all__ = [
    "StorageError", "check_writable", "last_complete_checkpoint", "make_staging_folder", "recover_interrupted_save",
    "replace_folder_contents", "storage_errors",
]

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# What the Trainer writes as a checkpoint's model: plain, sharded, PEFT adapters, FSDP shards.
_MODEL_FILES = (
    SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME,
    ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME,
)
_MODEL_PREFIXES = (FSDP_MODEL_NAME,)
_SHARD_RE = re.compile(r"^(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)$")


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
    """The newest ``checkpoint-N`` of ``output_dir`` that a run can resume from.

    A checkpoint is complete when its ``trainer_state.json`` (the Trainer writes it last) parses and it
    holds model weights. Newer, incomplete checkpoints (a kill during the save) are skipped with a
    warning that says why; the one chosen is logged.

    Args:
        output_dir (`str` or `os.PathLike`): The run's output folder.

    Returns:
        `str` or `None`: The checkpoint's path, or None when there is none (or no such folder).
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


# How a full disk reads where no OSError carries ENOSPC: torch.save ("unexpected pos"), safetensors'
# SafetensorError ("No space left on device (os error 28)").
_DISK_FULL_TEXT = ("unexpected pos", "No space left on device", "os error 28")


def _describe(error: BaseException, folder: str) -> str | None:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC or any(t in str(error) for t in _DISK_FULL_TEXT):
        return (f"The disk holding {folder!r} is full (writing failed: {error}). Free space there, or point "
                "--output_dir at another disk (and lower --save_total_limit), then resume the run.")
    if isinstance(error, OSError) and error.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR):
        return (f"Cannot write to {folder!r}: {error.strerror or error}. Choose a writable --output_dir "
                "(or fix the folder's permissions).")
    return None


@contextlib.contextmanager
def storage_errors(folder: str | os.PathLike) -> Iterator[None]:
    """Turn disk-full and read-only errors raised inside the block into one :class:`StorageError`.

    Disk-full reads as ``ENOSPC``, torch's "unexpected pos" or safetensors' os error 28; other errors pass
    through unchanged.

    Args:
        folder (`str` or `os.PathLike`): The folder being written, named in the message.

    Yields:
        `None`: Control, for the writes.

    Raises:
        StorageError: For a full disk or a folder that cannot be written.
    """
    from safetensors import SafetensorError

    try:
        yield
    except StorageError:
        raise
    except (OSError, RuntimeError, SafetensorError) as error:
        message = _describe(error, os.fspath(folder))
        if message is None:
            raise
        raise StorageError(getattr(error, "errno", None) or errno.EIO, message) from error


def check_writable(folder: str | os.PathLike) -> None:
    """Create ``folder`` if needed and write a probe file in it.

    Args:
        folder (`str` or `os.PathLike`): The folder.

    Raises:
        StorageError: If that fails for lack of space or permission.
    """
    path = os.fspath(folder)
    with storage_errors(path):
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".bimask-write-check-"):
            pass


_STAGING_MARKER = ".bimask-staging"  # in a staging folder until it has become the model folder
_RENAME_EXCHANGE = 2  # renameat2 flag (Linux): swap two paths atomically


def _staging_prefix(folder: str) -> str:
    return f".{os.path.basename(os.path.abspath(folder))}.saving-"


def _inside(folder: str) -> bool:
    """Stage inside ``folder`` (files then move in one by one) where it cannot be swapped: it is the
    working directory (the process would lose it) or a mount point, or its parent takes no new folder."""
    path = os.path.abspath(folder)
    parent = os.path.dirname(path)
    try:
        if os.path.isdir(path) and os.path.samefile(path, os.getcwd()):
            return True
    except OSError:
        return True
    return path == parent or os.path.ismount(path) or not os.access(parent, os.W_OK | os.X_OK)


def _new_folder(parent: str, prefix: str) -> str:
    while True:  # os.mkdir (unlike mkdtemp's private 0700) gives the umask's usual mode
        path = os.path.join(parent, prefix + secrets.token_hex(4))
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def make_staging_folder(folder: str | os.PathLike) -> str:
    """A new, marked staging folder for :func:`replace_folder_contents`.

    It lies beside ``folder`` (same file system, so the two can be swapped), or inside it where it cannot
    be swapped (see :func:`_inside`). A save interrupted earlier is recovered first.

    Args:
        folder (`str` or `os.PathLike`): The model folder to be replaced.

    Returns:
        `str`: The staging folder's path.
    """
    target = os.fspath(folder)
    recover_interrupted_save(target)
    if _inside(target):
        staging = _new_folder(os.path.abspath(target), ".saving-")
    else:
        staging = _new_folder(os.path.dirname(os.path.abspath(target)), _staging_prefix(target))
        if os.path.isdir(target):  # the swapped-in model folder keeps the old folder's mode
            os.chmod(staging, os.stat(target).st_mode & 0o7777)
    open(os.path.join(staging, _STAGING_MARKER), "w").close()  # noqa: SIM115 - an empty marker file
    return staging


def _exchange(a: str, b: str) -> bool:
    """Swap two folders in one atomic step (``renameat2(RENAME_EXCHANGE)``); ``False`` where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols: a TypeError on Windows
        renameat2 = libc.renameat2
    except (OSError, AttributeError, TypeError):  # no renameat2 (macOS, musl before 1.2.3): two renames
        return False
    if renameat2(-100, os.fsencode(a), -100, os.fsencode(b), _RENAME_EXCHANGE) == 0:  # -100: AT_FDCWD
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"Cannot swap {b!r} into place: {os.strerror(err)}", a)


def _is_weight_file(name: str) -> bool:
    return name in _MODEL_FILES or name == NM_WEIGHTS_NAME or bool(_SHARD_RE.match(name))


def _restore_entries(old: str, folder: str, drop: Collection[str]) -> None:
    """Move what the model folder held besides the model (checkpoints, logs, ...) from ``old`` back into
    ``folder``; names the new model has, and ``drop``, stay behind and are deleted with ``old``."""
    present = set(os.listdir(folder))
    for name in os.listdir(old):
        if name not in present and name not in drop and name != _STAGING_MARKER and not _is_weight_file(name):
            os.replace(os.path.join(old, name), os.path.join(folder, name))
    shutil.rmtree(old, ignore_errors=True)


def _fsync(path: str) -> None:
    """Flush ``path`` (a file or a folder's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: str) -> None:
    """Flush every file under ``folder``, then the folders themselves: renames are atomic, but without
    this a power loss after the swap can leave the new names pointing at empty or partial files."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                _fsync(path)
        _fsync(root)


def replace_folder_contents(staging: str, folder: str, drop: Collection[str] = ()) -> None:
    """Make the complete model in ``staging`` (from :func:`make_staging_folder`) the model folder ``folder``.

    The two folders are swapped in one atomic rename, so a kill at any moment leaves ``folder`` holding
    either the whole previous model or the whole new one, never a mix. Everything else the previous
    folder held (checkpoints, logs) is then moved back into it. Where the file system cannot swap, the old
    folder is renamed away and the new one renamed into place (two steps). A save killed between the steps
    is finished or undone by the next save of the folder (:func:`recover_interrupted_save`). A staging folder
    inside ``folder`` (the working directory, or a parent that takes no new folder) moves in file by file:
    each file is whole, but a kill midway mixes old and new files. Every file is flushed to the disk before
    the swap, and the folders' entries after it, so a power loss cannot leave a swapped-in folder of empty
    files.

    Args:
        staging (`str`): The staging folder holding the new model.
        folder (`str`): The model folder.
        drop (`Collection[str]`, *optional*, defaults to `()`): Names of the previous folder not moved back
            (weight files of another format).
    """
    _fsync_tree(staging)
    try:
        _move_into_place(staging, folder, drop)
    finally:
        _fsync(os.path.dirname(os.path.abspath(folder)))
    if os.path.isdir(folder):
        _fsync(folder)


def _move_into_place(staging: str, folder: str, drop: Collection[str]) -> None:
    if os.path.dirname(os.path.abspath(staging)) == os.path.abspath(folder):  # staged inside: file by file
        for name in os.listdir(staging):
            if name != _STAGING_MARKER:
                target = os.path.join(folder, name)
                if os.path.isdir(target) and not os.path.islink(target):
                    shutil.rmtree(target)
                os.replace(os.path.join(staging, name), target)
        for name in drop:
            if os.path.isfile(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))
        shutil.rmtree(staging, ignore_errors=True)
        return
    # The marker leaves the new folder only once it is in place (until then a kill discards it).
    if not os.path.isdir(folder):
        os.rename(staging, folder)
        os.remove(os.path.join(folder, _STAGING_MARKER))
        return
    if _exchange(staging, folder):
        os.remove(os.path.join(folder, _STAGING_MARKER))  # ``folder`` is the new model now
        _restore_entries(staging, folder, drop)  # ``staging`` holds the previous folder
        return
    old = tempfile.mkdtemp(prefix=_staging_prefix(folder), dir=os.path.dirname(os.path.abspath(folder)))
    os.rename(folder, old)  # onto the empty folder just made; a kill here is undone by the next save
    os.rename(staging, folder)
    os.remove(os.path.join(folder, _STAGING_MARKER))
    _restore_entries(old, folder, drop)


def recover_interrupted_save(folder: str | os.PathLike) -> None:
    """Finish or undo a save of ``folder`` that a kill interrupted (see :func:`replace_folder_contents`).

    A leftover staging folder that still has its marker was never swapped in: deleted. One without the
    marker is the previous model folder swapped out: its other entries (checkpoints) move back into
    ``folder``, or it becomes ``folder`` again if the kill came before the new one was in place.

    Args:
        folder (`str` or `os.PathLike`): The model folder.
    """
    target = os.fspath(folder)
    parent = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(parent):
        return
    prefix = _staging_prefix(target)
    if os.path.isfile(os.path.join(target, _STAGING_MARKER)):
        os.remove(os.path.join(target, _STAGING_MARKER))  # swapped in, killed before the marker was removed
    if os.path.isdir(target):  # staged inside the folder and never moved in
        for name in os.listdir(target):
            if name.startswith(".saving-") and os.path.isfile(os.path.join(target, name, _STAGING_MARKER)):
                shutil.rmtree(os.path.join(target, name), ignore_errors=True)
    for name in sorted(os.listdir(parent)):
        path = os.path.join(parent, name)
        if not name.startswith(prefix) or not os.path.isdir(path):
            continue
        if os.path.isfile(os.path.join(path, _STAGING_MARKER)):
            logger.warning("Removing %s: the unfinished staging folder of an interrupted save of %s.", path, target)
            shutil.rmtree(path, ignore_errors=True)
        elif not os.path.isdir(target):
            logger.warning("Restoring %s from %s: a save was interrupted while swapping folders.", target, path)
            os.rename(path, target)
        else:
            logger.warning("Moving the checkpoints and logs of %s back from %s (an interrupted save).", target, path)
            _restore_entries(path, target, drop=())
