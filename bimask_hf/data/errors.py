"""The one exception type of :mod:`bimask_hf.data`."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A dataset cannot be loaded as asked; the message names the problem and how to fix it.

    Raised while building the datasets, before any training starts.
    """
