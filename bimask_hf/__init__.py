"""bimask-hf: N:M sparse training with Bi-directional Masks (Bi-Mask, ICML 2023) for timm and transformers.

Patch a model with :func:`sparsify`, train it (``BiMaskTrainer``, any ``transformers.Trainer`` with a
``BiMaskCallback``, or any loop that calls :func:`refresh_permutations`; see ``docs/training.md``), then
:func:`merge` it to plain layers with exact zeros (:func:`save_sparse_model` does, into a Hub-ready folder).
``import bimask_hf`` loads the core only; the entry points that need transformers, timm, accelerate or
datasets load them on first use.

Naming rules. Functions that change a model's *modules* (:func:`sparsify`, :func:`merge`) work in
place and return the model, as peft's ``inject_adapter_in_model`` does; :func:`merge` is destructive
(also exported as ``merge_and_unload``, peft's name for that). A trailing underscore marks only the
tensor-level in-place operation :func:`project_` (``W <- W * Mf``), as in ``torch.Tensor.mul_``.
The method itself is described in ``docs/method.md``.
"""

from .config import BiMaskConfig
from .errors import NMPatternError
from .inspection import SparsityReport, SparsityStats, report, sparse_layers, sparsity_stats
from .layers import BiMaskConv2d, BiMaskLayer, BiMaskLinear
from .masks import (
    backward_mask,
    nm_mask,
    retention,
    search_permutation,
    transposable_mask,
    unstructured_mask,
)
from .patching import merge, merge_and_unload, project_, refresh_permutations, sparsify
from .registration import register_when_imported
from .version import __version__

register_when_imported()  # resnet32_cifar & co. with timm, the 1-channel image processor with transformers

# The entry points that need transformers, timm, accelerate or datasets load on first use.
_LAZY = {
    "BiMaskTrainer": "trainer",
    "BiMaskTrainingArguments": "trainer",
    "BiMaskCallback": "callback",
    "ImageClassificationTrainer": "image_classification",
    "check_nm": "hub",  # reads a saved folder or Hub id too
    "create_model": "modeling",
    "load_image_classification_data": "data",
    "save_sparse_model": "hub",
    "load_sparse_model": "hub",
    "create_model_card": "hub",
    "get_peft_model": "lora",
}


def __getattr__(name: str):  # noqa: ANN202
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'bimask_hf' has no attribute {name!r}")


__all__ = [
    *_LAZY,
    "__version__",
    "BiMaskConfig",
    "BiMaskConv2d",
    "BiMaskLayer",
    "BiMaskLinear",
    "NMPatternError",
    "SparsityReport",
    "SparsityStats",
    "backward_mask",
    "merge",
    "merge_and_unload",
    "nm_mask",
    "project_",
    "refresh_permutations",
    "report",
    "retention",
    "search_permutation",
    "sparse_layers",
    "sparsify",
    "sparsity_stats",
    "transposable_mask",
    "unstructured_mask",
]
