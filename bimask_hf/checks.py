"""Settings that must agree: a checkpoint or a saved folder against the configuration a call asks for.

Pure functions over two :class:`~bimask_hf.config.BiMaskConfig`; the trainer (resuming) and
``load_sparse_model`` (keywords) call them before anything is changed.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from .config import BiMaskConfig
from .errors import ConflictingSettingsError, NonFiniteError

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_CONFIG_NAME", "PATTERN_FIELDS", "RESUME_FIELDS", "check_resume", "config_differences", "describe",
    "nonfinite_names", "save_checkpoint_config", "stop_if_diverged",
]

#: A checkpoint's training config: not ``bimask_config.json``, which marks a finished, exact N:M folder
#: (a checkpoint holds dense weights and permutations).
CHECKPOINT_CONFIG_NAME = "bimask_training_config.json"
#: What a folder's weights and its set of sparse layers depend on.
PATTERN_FIELDS = ("n", "m", "density", "group_layout", "target_modules", "exclude_modules", "sparse_stem")
#: What a resumed run must share with its checkpoint: the masks, the permutations and how they are found.
RESUME_FIELDS = (*PATTERN_FIELDS, "mode", "permutation_search", "tie_break")


def config_differences(
    saved: BiMaskConfig, asked: BiMaskConfig, fields: tuple[str, ...] = RESUME_FIELDS
) -> dict[str, tuple[Any, Any]]:
    """The fields on which two configs differ.

    Args:
        saved: The config a checkpoint or folder was made with.
        asked: The config a call asks for.
        fields: The fields to compare (default :data:`RESUME_FIELDS`).

    Returns:
        ``{field: (saved value, asked value)}`` for each of ``fields`` on which the two differ.
    """
    return {name: (getattr(saved, name), getattr(asked, name)) for name in fields
            if getattr(saved, name) != getattr(asked, name)}


def describe(differences: dict[str, tuple[Any, Any]], side: int) -> str:
    """One side of :func:`config_differences` as ``"n=2, m=4"``.

    Args:
        differences: What :func:`config_differences` returned.
        side: 0 for the saved values, 1 for the asked ones.

    Returns:
        The ``name=value`` pairs of that side, comma-separated.
    """
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
    """Record in a checkpoint folder the config it was trained with, for :func:`check_resume`.

    Args:
        folder: The checkpoint folder (created if an FSDP rank has not made it yet).
        config: The config of the run saving it.
    """
    # An FSDP sharded checkpoint may not have created its folder on this rank yet when save_model returns.
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, CHECKPOINT_CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True)
        f.write("\n")


def check_resume(checkpoint: str | os.PathLike, config: BiMaskConfig) -> None:
    """Refuse to resume ``checkpoint`` with a config that contradicts the one it was trained with.

    Args:
        checkpoint: A ``checkpoint-N`` folder; its :data:`CHECKPOINT_CONFIG_NAME` comes from
            :func:`save_checkpoint_config`.
        config: The config of the run that resumes it.

    Raises:
        ConflictingSettingsError: One of :data:`RESUME_FIELDS` differs (N, M, density, mode, group layout,
            permutation search, tie order, sparse-layer selection); the message names both values and the
            flags that resume as trained.
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
            f"Cannot resume from {folder}: it was trained with {describe(differences, 0)}, but this run asks for "
            f"{describe(differences, 1)}. To resume, change this run's setting to the checkpoint's "
            f"({_flags(differences, 0)}); to train with {describe(differences, 1)}, start a new run in another "
            "--output_dir (without --resume_from_checkpoint)."
        )


def nonfinite_names(tensors: dict[str, torch.Tensor], collective: bool = False) -> list[str]:
    """The names of ``tensors`` holding NaN or inf (a ``DTensor``: this rank's shard; meta tensors skipped).

    Args:
        tensors: ``{name: tensor}``.
        collective: Make the ranks of a distributed run agree (one all-reduce): a name is reported
            everywhere if it is non-finite on any rank, so that every rank stops together.

    Returns:
        The names, in the order of ``tensors``.
    """
    names = [name for name, tensor in tensors.items() if not tensor.is_meta]
    if not names:
        return []
    local = [getattr(tensors[name], "to_local", lambda t=tensors[name]: t)() for name in names]
    bad = torch.stack([~torch.isfinite(t.detach()).all() for t in local]).to(torch.uint8)
    if collective and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return [name for name, flag in zip(names, bad.tolist()) if flag]


def stop_if_diverged(model: torch.nn.Module, step: int) -> None:
    """Stop a training run at the optimizer step after which its parameters hold NaN or inf.

    The Trainer's own handling of a non-finite loss (``logging_nan_inf_filter`` in the logs, a skipped
    fp16 step) is left as it is: only an update that wrote NaN/inf into the weights stops the run.

    Args:
        model: The model after an optimizer step (every rank calls this: the check is collective).
        step: The optimizer step just taken, for the message.

    Raises:
        NonFiniteError: Naming the step, the first parameters affected, and what to change.
    """
    bad = nonfinite_names({n: p for n, p in model.named_parameters() if p.requires_grad}, collective=True)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteError(
            f"Training diverged at optimizer step {step}: {shown} hold NaN or inf after the update (the loss or "
            "its gradients were not finite). Lower --learning_rate, clip gradients (--max_grad_norm), or train "
            "in bf16 rather than fp16, then resume from a checkpoint saved before this step."
        )
