"""Progress bars for long work (the permutation search over a model, ``bimask-eval``), shown as the
Trainer's are: a tqdm bar on the main process only, quiet when progress bars are switched off."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

__all__ = ["progress_bar"]


def _main_process() -> bool:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0") or 0) == 0  # launched, before the process group exists


def progress_bar(
    iterable: Iterable[T], *, total: int | None = None, desc: str, unit: str = "it", enabled: bool | None = None
) -> Iterable[T] | Iterator[T]:
    """``iterable`` with a tqdm bar on stderr, on the main process only.

    Args:
        iterable: what to iterate over (returned unchanged when no bar is shown).
        total: its length, if ``len()`` does not give it.
        desc: the bar's label.
        unit: what one step of ``iterable`` is.
        enabled: ``True`` shows the bar, ``False`` never does; ``None`` (default) shows it when progress
            bars are on (``transformers.utils.logging.disable_progress_bar()`` and
            ``HF_HUB_DISABLE_PROGRESS_BARS=1`` switch them off) and stderr is a terminal, as tqdm's
            ``disable=None`` decides.

    Returns:
        The iterable, wrapped in a bar when one is shown.
    """
    if enabled is False or not _main_process():
        return iterable
    if enabled is None:
        from huggingface_hub.utils import are_progress_bars_disabled

        if are_progress_bars_disabled():
            return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=None if enabled is None else False,
                dynamic_ncols=True)
