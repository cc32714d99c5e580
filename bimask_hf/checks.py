"""Settings that must agree: a checkpoint or a saved folder against the configuration a call asks for.

Pure functions over two :class:`~bimask_hf.config.BiMaskConfig`; the trainer (resuming) and
``load_sparse_model`` (keywords) call them before anything is changed.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from .config import BiMaskConfig
from .errors import ConflictingSettingsError

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_CONFIG_NAME", "PATTERN_FIELDS", "RESUME_FIELDS", "check_resume", "config_differences",
    "save_checkpoint_config",
]

#: A checkpoint's training config: not ``bimask_config.json``, which marks a finished, exact N:M folder
#: (a checkpoint holds dense weights and permutations).
CHECKPOINT_CONFIG_NAME = "bimask_training_config.json"
#: What a folder's weights and its set of sparse layers depend on.
PATTERN_FIELDS = ("n", "m", "density", "group_layout", "target_modules", "exclude_modules")
#: What a resumed run must share with its checkpoint: the masks, the permutations and how they are found.
RESUME_FIELDS = (*PATTERN_FIELDS, "mode", "permutation_search")


def config_differences(
    saved: BiMaskConfig, asked: BiMaskConfig, fields: tuple[str, ...] = RESUME_FIELDS
) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved value, asked value)}`` for each of ``fields`` on which the two configs differ."""
    return {name: (getattr(saved, name), getattr(asked, name)) for name in fields
            if getattr(saved, name) != getattr(asked, name)}


def _values(differences: dict[str, tuple[Any, Any]], side: int) -> str:
    return ", ".join(f"{name}={pair[side]!r}" for name, pair in differences.items())


def _flags(differences: dict[str, tuple[Any, Any]], side: int) -> str:
    """The command-line spelling of one side (a list as comma-separated names; None as the flag dropped)."""
    parts = []
    for name, pair in differences.items():
        value = pair[side]
        if value is None:
            parts.append(f"no --{name}")
        else:
            parts.append(f"--{name} {','.join(value) if isinstance(value, list) else value}")
    return " ".join(parts)


def save_checkpoint_config(folder: str | os.PathLike, config: BiMaskConfig) -> None:
    """Record in a checkpoint folder the config it was trained with, for :func:`check_resume`."""
    with open(os.path.join(folder, CHECKPOINT_CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True)
        f.write("\n")


def check_resume(checkpoint: str | os.PathLike, config: BiMaskConfig) -> None:
    """Refuse to resume ``checkpoint`` with a config that contradicts the one it was trained with.

    Args:
        checkpoint: a ``checkpoint-N`` folder; its :data:`CHECKPOINT_CONFIG_NAME` comes from
            :func:`save_checkpoint_config`.
        config: the config of the run that resumes it.

    Raises:
        ConflictingSettingsError: N, M, density, mode, group layout, permutation search or the sparse-layer
            selection differ; the message names both values and the flags that resume as trained.
    """
    folder = os.fspath(checkpoint)
    path = os.path.join(folder, CHECKPOINT_CONFIG_NAME)
    if not os.path.isfile(path):
        logger.warning("%s has no %s (saved by an older bimask-hf): its N:M settings cannot be checked against "
                       "this run's.", folder, CHECKPOINT_CONFIG_NAME)
        return
    with open(path, encoding="utf-8") as f:
        saved = BiMaskConfig.from_dict(json.load(f))
    differences = config_differences(saved, config)
    if differences:
        raise ConflictingSettingsError(
            f"Cannot resume from {folder}: it was trained with {_values(differences, 0)}, but this run asks for "
            f"{_values(differences, 1)}. To resume, change this run's setting to the checkpoint's "
            f"({_flags(differences, 0)}); to train with {_values(differences, 1)}, start a new run in another "
            "--output_dir (without --resume_from_checkpoint)."
        )
