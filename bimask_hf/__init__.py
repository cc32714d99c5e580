"""bimask-hf: N:M sparse training with Bi-directional Masks (Bi-Mask, ICML 2023) for timm and transformers.

Patch a model with :func:`sparsify`, train it (``BiMaskTrainer`` or any loop that calls
:func:`refresh_permutations`), then :func:`merge` it to plain layers with exact zeros.
"""

__version__ = "0.1.0"

from .config import BiMaskConfig
from .layers import BiMaskConv2d, BiMaskLayer, BiMaskLinear
from .masks import (
    backward_mask,
    nm_mask,
    retention,
    search_permutation,
    transposable_mask,
    unstructured_mask,
)
from .patching import (
    NMPatternError,
    SparsityReport,
    check_nm,
    merge,
    project_,
    refresh_permutations,
    report,
    sparse_layers,
    sparsify,
)

__all__ = [
    "__version__",
    "BiMaskConfig",
    "BiMaskConv2d",
    "BiMaskLayer",
    "BiMaskLinear",
    "NMPatternError",
    "SparsityReport",
    "backward_mask",
    "check_nm",
    "merge",
    "nm_mask",
    "project_",
    "refresh_permutations",
    "report",
    "retention",
    "search_permutation",
    "sparse_layers",
    "sparsify",
    "transposable_mask",
    "unstructured_mask",
]
