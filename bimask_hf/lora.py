"""LoRA fine-tuning of N:M sparse models that stays exactly N:M (sparsity-preserving LoRA).

A merged low-rank update ``W + s·B@A`` is dense, so plain LoRA on a sparse checkpoint loses the pattern
when it is merged. Here every sparse target layer computes with ``(W + s·B@A) ⊙ Mf`` where ``Mf`` is the
layer's forward mask, fixed at the start of fine-tuning (the stored zero pattern of a saved model, or the
current ``Mf`` of a model under Bi-Mask training). peft's own ``merge_and_unload()`` then writes
``W + (s·B@A) ⊙ Mf``, which is exactly N:M and computes exactly what was trained.

Extension point: peft's custom module mapping (``LoraConfig._register_custom_module``). The sparse layers
are turned into :class:`NMSparseLinear` (an ``nn.Linear`` subclass holding the fixed mask as a
non-persistent buffer, so state dicts keep their plain keys), and the mapping sends exactly those layers to
:class:`MaskedLoraLinear`, a subclass of peft's ``lora.Linear`` that masks the update in ``forward``,
``get_delta_weight`` (so peft's merge/unmerge keep the pattern) and nothing else. Non-sparse targets fall
through to peft's default dispatch and get plain LoRA. A LoRA variant would not do: variants are picked by
config flags (``use_dora``, ...) that peft owns, while the custom mapping is the documented hook for new
layer types.

peft does not save the custom mapping with the adapter, so load saved adapters with
:func:`load_peft_model` (``PeftModel.from_pretrained`` with the mapping registered), not with plain
``PeftModel.from_pretrained``, which would give the sparse layers plain (dense-merging) LoRA.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = ["NMSparseLinear", "get_peft_model", "is_peft_model", "load_peft_model",
           "prepare_sparse_base"]

MASK_BUFFER = "nm_mask"


def _peft():  # noqa: ANN202 - imported lazily: peft is an optional dependency
    try:
        import peft
    except ImportError as error:  # pragma: no cover - peft is in the dev extra
        raise ImportError("LoRA fine-tuning needs peft: pip install 'bimask-hf[peft]' (or pip install peft).") from error
    return peft


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a peft ``PeftModel`` (without importing peft when it is not installed)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


class NMSparseLinear(nn.Linear):
    """``nn.Linear`` whose weight keeps a fixed sparsity mask (``nm_mask``, not saved in state dicts).

    It computes exactly what ``nn.Linear`` computes; the mask only tells :class:`MaskedLoraLinear` which
    entries an adapter may change.
    """

    nm_mask: torch.Tensor

    @classmethod
    def from_linear(cls, module: nn.Linear, mask: torch.Tensor) -> NMSparseLinear:
        """Wrap ``module`` (sharing its parameters) with the fixed boolean ``mask`` of its weight's shape."""
        if mask.shape != module.weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight {tuple(module.weight.shape)}.")
        with torch.device("meta"):
            new = cls(module.in_features, module.out_features, bias=module.bias is not None)
        new.weight, new.bias = module.weight, module.bias
        new.register_buffer(MASK_BUFFER, mask.to(device=module.weight.device, dtype=torch.bool), persistent=False)
        new.train(module.training)
        return new


def _masked_lora_class() -> type:
    from peft.tuners.lora import Linear as LoraLinear

    class MaskedLoraLinear(LoraLinear):
        """peft's ``lora.Linear`` on an :class:`NMSparseLinear`: the update is ``(s·B@A) ⊙ Mf``.

        The forward computes ``x (W + s·B@A ⊙ Mf)ᵀ + b`` in one product (the masked low-rank update cannot
        be factored, so it is folded into the weight: one dense ``O x K`` temporary per layer and step).
        Merging adds the same masked delta, so the merged weight is ``(W + s·B@A) ⊙ Mf`` (``W`` is zero
        outside the mask) and stays exactly N:M.
        """

        def _fixed_mask(self) -> torch.Tensor:
            return getattr(self.get_base_layer(), MASK_BUFFER)

        def get_delta_weight(self, adapter: str) -> torch.Tensor:
            return super().get_delta_weight(adapter) * self._fixed_mask()

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
                return super().forward(x, *args, **kwargs)
            self._check_forward_args(x, *args, **kwargs)
            base = self.get_base_layer()
            mask = self._fixed_mask()
            weight = base.weight
            separate = []  # adapters with dropout: their input differs from the base layer's
            for adapter in self.active_adapters:
                if adapter not in self.lora_A.keys():
                    continue
                if adapter in self.lora_variant:
                    raise NotImplementedError("LoRA variants (DoRA, ...) are not supported on N:M sparse layers.")
                delta = (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * mask * self.scaling[adapter]
                if isinstance(self.lora_dropout[adapter], nn.Identity):
                    weight = weight + delta.to(weight.dtype)
                else:
                    separate.append((adapter, delta))
            # One product with W + (s·B@A) ⊙ Mf: one dense O x K temporary per layer and step, and the
            # backward pass needs one O x K weight gradient for A and B (the mask prevents factoring it).
            result = F.linear(x, weight, base.bias)
            for adapter, delta in separate:
                x_in = self._cast_input_dtype(self.lora_dropout[adapter](x), delta.dtype)
                result = result + F.linear(x_in, delta).to(result.dtype)
            return result

        def __repr__(self) -> str:
            return "masked_" + super().__repr__()

    return MaskedLoraLinear


def __getattr__(name: str) -> Any:
    if name == "MaskedLoraLinear":  # built on first use so that importing bimask_hf never needs peft
        cls = _masked_lora_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _resolve(model: nn.Module, name: str) -> str | None:
    for candidate in (name, name.removeprefix("timm_model."), f"timm_model.{name}"):
        try:
            model.get_submodule(candidate)
        except AttributeError:
            continue
        return candidate
    return None


def _source_folder(model: nn.Module) -> str | None:
    source = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(source) if source and os.path.isdir(str(source)) else None


def _source_config(model: nn.Module) -> Any:
    """The ``BiMaskConfig`` saved in the folder the model was loaded from, if any."""
    from .config import CONFIG_NAME, BiMaskConfig

    folder = _source_folder(model)
    if folder is None or not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        return None
    return BiMaskConfig.from_pretrained(folder)


def _saved_sparse_layers(model: nn.Module) -> list[str] | None:
    """Sparse layer names recorded on the model, or in the ``bimask_config.json`` of the folder it came from."""
    recorded = getattr(model, "bimask_sparse_layers", None)
    if recorded:
        return list(recorded)
    from .config import BiMaskConfig

    source = _source_folder(model)
    if source is None:
        return None
    try:
        meta = BiMaskConfig.load_json(source)
    except FileNotFoundError:
        return None
    return list(meta.get("sparse_layers") or [])


def prepare_sparse_base(model: nn.Module, sparse_layers: list[str] | None = None, *,
                        require_linear: bool = True) -> list[str]:
    """Fix the masks of ``model``'s sparse layers in place (before LoRA is added); returns their names.

    Bi-Mask layers (a model under training or from ``load_sparse_model``) are merged and keep their
    current forward mask. Plain ``Linear`` layers named in ``sparse_layers`` -- by default those recorded
    by :func:`bimask_hf.merge` or in the ``bimask_config.json`` of the folder the model was loaded from --
    keep their stored zero pattern. Sparse ``Conv2d`` layers stay as they are (LoRA on them is not masked:
    do not target them).
    """
    from .inspection import sparse_layers as bimask_layers
    from .patching import merge

    fixed: dict[str, torch.Tensor] = {}
    for name, layer in bimask_layers(model).items():
        if isinstance(layer, nn.Linear) and layer.mode != "dense":
            fixed[name] = layer.forward_mask.clone()
    if fixed or bimask_layers(model):
        merge(model)
    names = sparse_layers if sparse_layers is not None else (_saved_sparse_layers(model) or [])
    for raw in names:
        name = _resolve(model, raw)
        if name is None:
            raise ValueError(f"sparse layer {raw!r} is not a module of {type(model).__name__}.")
        module = model.get_submodule(name)
        if name not in fixed and isinstance(module, nn.Linear) and not isinstance(module, NMSparseLinear):
            fixed[name] = module.weight.detach() != 0
    for name, mask in fixed.items():
        module = model.get_submodule(name)
        if isinstance(module, NMSparseLinear):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, NMSparseLinear.from_linear(module, mask))
    if fixed:
        model.bimask_sparse_layers = sorted(set(getattr(model, "bimask_sparse_layers", [])) | set(fixed))  # type: ignore[assignment]
        if getattr(model, "bimask_config", None) is None:
            model.bimask_config = _source_config(model)  # type: ignore[assignment]
    if not fixed and require_linear:
        raise ValueError(
            f"{type(model).__name__} has no sparse Linear layers to fine-tune: pass a model from "
            "load_sparse_model, one loaded from a folder saved by bimask-hf, one under Bi-Mask training, "
            "or name them with sparse_layers=[...]."
        )
    return sorted(fixed)


def _with_sparse_mapping(peft_config: Any) -> Any:
    config = copy.copy(peft_config)
    config._register_custom_module({NMSparseLinear: __getattr__("MaskedLoraLinear")})
    return config


def get_peft_model(model: nn.Module, peft_config: Any, *args: Any, sparse_layers: list[str] | None = None,
                   **kwargs: Any) -> Any:
    """peft's ``get_peft_model`` for N:M sparse models: LoRA on sparse layers keeps their mask fixed.

    Same signature as ``peft.get_peft_model`` plus ``sparse_layers`` (see :func:`prepare_sparse_base`).
    Returns a real ``PeftModel``; adapters are never sparsified, peft's ``merge_and_unload()`` returns an
    exactly N:M model. Only LoRA configs are supported.
    """
    peft = _peft()
    if not isinstance(peft_config, peft.LoraConfig):
        raise TypeError(f"bimask_hf.get_peft_model supports LoraConfig, got {type(peft_config).__name__}.")
    if getattr(peft_config, "use_dora", False):
        raise ValueError("DoRA is not supported on N:M sparse layers (its magnitude rescaling is dense); set use_dora=False.")
    names = prepare_sparse_base(model, sparse_layers, require_linear=False)
    convs = [name for name in getattr(model, "bimask_sparse_layers", [])
             if isinstance(model.get_submodule(name), nn.Conv2d) and _is_target(peft_config, name)]
    if convs:
        raise ValueError(
            f"LoRA targets sparse Conv2d layers {convs[:5]}: their update would not be masked and the merge would "
            "be dense. Target Linear layers only (or exclude these with exclude_modules)."
        )
    if not names:
        prepare_sparse_base(model, sparse_layers)  # raises the error that names what is missing
    logger.info("LoRA keeps the N:M masks of %d sparse layers fixed", len(names))
    return peft.get_peft_model(model, _with_sparse_mapping(peft_config), *args, **kwargs)


def _is_target(peft_config: Any, name: str) -> bool:
    from peft.tuners.tuners_utils import check_target_module_exists

    return bool(check_target_module_exists(peft_config, name))


def load_peft_model(model: nn.Module, model_id: str | os.PathLike, *, sparse_layers: list[str] | None = None,
                    **kwargs: Any) -> Any:
    """``PeftModel.from_pretrained`` for adapters trained with :func:`get_peft_model` on a sparse base."""
    peft = _peft()
    config = peft.PeftConfig.from_pretrained(os.fspath(model_id))
    prepare_sparse_base(model, sparse_layers)
    return peft.PeftModel.from_pretrained(model, model_id, config=_with_sparse_mapping(config), **kwargs)
