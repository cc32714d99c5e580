"""The exception classes of bimask-hf, in one leaf module (it imports nothing from the package)."""

from __future__ import annotations

__all__ = ["NMPatternError", "CorruptCheckpointError", "DataError", "ConflictingSettingsError", "NonFiniteError"]


class NMPatternError(ValueError):
    """A weight that should follow an N:M pattern does not; names the layer and the first bad group."""


class CorruptCheckpointError(OSError):
    """A weight file of a saved sparse model is truncated or corrupted; names the file."""


class DataError(ValueError):
    """A dataset cannot be loaded as asked; the message names the problem and how to fix it.

    Raised while building the datasets, before any training starts.
    """


class ConflictingSettingsError(ValueError):
    """Two settings that must agree do not (a checkpoint and the run resuming it, a saved folder and the
    keywords of its load); the message names both values and which one to change."""


class NonFiniteError(ValueError):
    """Weights hold NaN or inf: refused by ``sparsify``, or a training run stopped at the step they appeared."""
