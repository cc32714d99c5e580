"""What each training mode does: one table, read by the layers, the patching, the callback and the cards.

``docs/method.md`` defines the modes; code asks this table what a mode does (``mode_spec(mode).decays``)
instead of comparing mode names.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MODES", "MODE_TABLE", "ModeSpec", "SEED_MODE_NAMES", "mode_spec"]


@dataclass(frozen=True)
class ModeSpec:
    """What a training mode does.

    Args:
        masked: The forward pass uses ``W * Mf`` (False only for the dense baseline).
        backward_mask: The input gradient uses the permuted backward mask ``Mb`` (bi-directional masks).
        decays: The weight gradient gets the SR-STE decay term ``decay * (1 - Mf) * W``.
        projects_before: The parameter itself is pruned (``W <- W * Mf``) before every forward pass.
        projects_after: The parameter itself is pruned after every optimizer step.
        transposable: ``Mf`` is N:M along rows and columns of every MxM block (needs O % M == 0, groups=1).
        fallback: The mode run instead where a layer's rows do not form whole groups of M (``Mb`` needs them).
        description: One line for model cards.
    """

    masked: bool
    backward_mask: bool = False
    decays: bool = False
    projects_before: bool = False
    projects_after: bool = False
    transposable: bool = False
    fallback: str | None = None
    description: str = ""


MODE_TABLE: dict[str, ModeSpec] = {
    "dense": ModeSpec(masked=False, description="dense baseline (no mask)"),
    "srste": ModeSpec(
        masked=True, decays=True,
        description="uni-directional N:M mask (SR-STE): the forward mask also acts in the backward pass",
    ),
    "bimask": ModeSpec(
        masked=True, backward_mask=True, decays=True, fallback="srste",
        description="bi-directional masks: N:M forward mask on the weight rows, permuted N:M backward mask on its "
        "columns (input gradient), dense straight-through weight gradient with SR-STE decay",
    ),
    "transposable": ModeSpec(
        masked=True, decays=True, transposable=True,
        description="transposable N:M mask, N:M along rows and columns of every MxM block (T-mask baseline)",
    ),
    "pre": ModeSpec(masked=True, projects_before=True,
                    description="weights projected onto the N:M mask before every forward"),
    "post": ModeSpec(masked=True, projects_after=True,
                     description="weights projected onto the N:M mask after every optimizer step"),
}

MODES: tuple[str, ...] = tuple(MODE_TABLE)

# The seed scripts' `--mask_mode` names.
SEED_MODE_NAMES = {"m1": "dense", "m2": "bimask", "m3": "pre", "m4": "post"}


def mode_spec(mode: str) -> ModeSpec:
    """The :class:`ModeSpec` of ``mode`` (a name of :data:`MODES` or a seed alias ``m1``..``m4``).

    Args:
        mode: The mode name.

    Returns:
        What the mode does.

    Raises:
        ValueError: ``mode`` is not a mode.
    """
    spec = MODE_TABLE.get(SEED_MODE_NAMES.get(mode, mode))
    if spec is None:
        raise ValueError(f"mode must be one of {MODES} (or m1..m4), got {mode!r}.")
    return spec
