"""The one exception type of :mod:`bimask_hf.data` (defined with the others in :mod:`bimask_hf.errors`)."""

from __future__ import annotations

from ..errors import DataError

__all__ = ["DataError"]
