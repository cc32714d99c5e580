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
:func:`load_peft_model` (``PeftModel.from_pretrained`` with the mapping registered). Plain
``PeftModel.from_pretrained`` would give the sparse layers plain LoRA, whose merge is dense, so adapters
saved from :func:`get_peft_model` cannot be loaded by it: their ``adapter_config.json`` keeps the real
``target_modules`` under ``"bimask_hf"`` and gives peft a ``target_modules`` pattern that matches no layer
and names :func:`load_peft_model` (peft's error quotes it); the adapter's README says how to load it.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import CONFIG_NAME, BiMaskConfig
from .inspection import sparse_layers as bimask_layers
from .patching import merge

logger = logging.getLogger(__name__)

__all__ = ["NMSparseLinear", "get_peft_model", "is_peft_model", "load_peft_model",
           "prepare_sparse_base"]

MASK_BUFFER = "nm_mask"
LOADER = "bimask_hf.lora.load_peft_model"
ADAPTER_KEY = "bimask_hf"  # in adapter_config.json: how to load the adapter and its real target_modules
# A regex that matches no module name ("(?!)" always fails) and reads as the fix in peft's error message.
GUARD_TARGET = f"(?!)N:M sparse adapter: load it with {LOADER}(base_model, adapter), not PeftModel.from_pretrained"
ADAPTER_CONFIG_NAME = "adapter_config.json"


def _peft():  # noqa: ANN202 - imported lazily: peft is an optional dependency
    try:
        import peft
    except ImportError as error:  # pragma: no cover - peft is in the dev extra
        raise ImportError("LoRA fine-tuning needs peft: pip install 'bimask-hf[peft]' (or pip install peft).") from error
    return peft


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a peft ``PeftModel`` (without importing peft when it is not installed).

    Args:
        model (`Any`): The model.

    Returns:
        `bool`: True for a ``PeftModel``.
    """
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
        """Wrap ``module``, sharing its parameters, with a fixed mask of its weight.

        Args:
            module (`nn.Linear`): The layer.
            mask (`torch.Tensor`): Boolean mask of the weight's shape (the entries an adapter may change).

        Returns:
            `NMSparseLinear`: The wrapped layer, in ``module``'s training mode.

        Raises:
            ValueError: If the shapes differ.
        """
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


def _sparse_lora_config_class() -> type:
    from peft import LoraConfig

    class SparseLoraConfig(LoraConfig):
        """peft's ``LoraConfig`` of an adapter on an N:M sparse base; saved so that only
        :func:`load_peft_model` loads it (see the module docstring)."""

        def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
            super().save_pretrained(save_directory, **kwargs)
            _mark_adapter_folder(save_directory)

    SparseLoraConfig.__module__ = __name__  # pickled by name: the module's __getattr__ builds it
    return SparseLoraConfig


_LAZY = {"MaskedLoraLinear": _masked_lora_class, "SparseLoraConfig": _sparse_lora_config_class}


def __getattr__(name: str) -> Any:
    if name in _LAZY:  # built on first use so that importing bimask_hf never needs peft
        cls = _LAZY[name]()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_README_SECTION = """
## Loading this adapter (N:M sparse base)

This LoRA adapter was trained with `bimask_hf.get_peft_model` on an N:M sparse model: each sparse
layer's update is masked by the layer's N:M mask, so the merged model stays exactly N:M. Load it with
bimask-hf; plain `PeftModel.from_pretrained` refuses it (it would merge a dense update):

```python
from transformers import AutoModelForImageClassification
from bimask_hf.lora import load_peft_model

base = AutoModelForImageClassification.from_pretrained("{base}")
model = load_peft_model(base, "<this adapter's folder or repo id>")
merged = model.merge_and_unload()  # exactly N:M
```
"""


def _mark_adapter_folder(folder: str) -> None:
    """Move the real ``target_modules`` under ``"bimask_hf"`` and explain the loading in the README."""
    import json

    path = os.path.join(folder, ADAPTER_CONFIG_NAME)
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("target_modules") != GUARD_TARGET:
        from .version import __version__

        config[ADAPTER_KEY] = {"loader": LOADER, "target_modules": config.get("target_modules"),
                               "library_version": __version__}
        config["target_modules"] = GUARD_TARGET
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True))
    readme = os.path.join(folder, "README.md")
    text = open(readme, encoding="utf-8").read() if os.path.isfile(readme) else ""
    if LOADER.rpartition(".")[2] not in text:
        base = config.get("base_model_name_or_path") or "<the sparse base model>"
        with open(readme, "a", encoding="utf-8") as f:
            f.write(_README_SECTION.replace("{base}", str(base)))


def _resolve(model: nn.Module, name: str) -> str | None:
    for candidate in (name, name.removeprefix("timm_model."), f"timm_model.{name}"):
        try:
            model.get_submodule(candidate)
        except AttributeError:
            continue
        return candidate
    return None


def _sources(model: nn.Module) -> list[tuple[str, str | None]]:
    """``(folder or Hub id, revision)`` the model was loaded from, as the plain libraries record it.

    transformers keeps ``config._name_or_path`` and the commit it read (``config._commit_hash``); timm
    keeps ``pretrained_cfg["hf_hub_id"]`` (``hf-hub:``) or ``["file"]`` (``local-dir:``), also inside a
    TimmWrapper.
    """
    config = getattr(model, "config", None)
    found: list[tuple[str, str | None]] = []
    for name in (getattr(model, "name_or_path", None), getattr(config, "_name_or_path", None)):
        if name:
            found.append((str(name), getattr(config, "_commit_hash", None)))
    for module in (model, getattr(model, "timm_model", None)):
        cfg = getattr(module, "pretrained_cfg", None)
        if isinstance(cfg, dict):
            found += [(str(cfg[key]), None) for key in ("hf_hub_id", "file") if cfg.get(key)]
    unique: list[tuple[str, str | None]] = []
    for item in found:
        if item[0] not in [u[0] for u in unique]:
            unique.append(item)
    return unique


def _source_meta(model: nn.Module) -> dict[str, Any] | None:
    """The ``bimask_config.json`` of the folder or Hub repo ``model`` was loaded from, if it has one.

    A Hub id is read through the Hub cache (``hf_hub_download`` at the revision the model was loaded
    at), so offline mode (``HF_HUB_OFFLINE=1``) and ``HF_ENDPOINT`` apply as for the model itself.
    """
    from .hub.files import _looks_like_path, read_json

    for source, revision in _sources(model):
        if os.path.isdir(source):
            if os.path.isfile(os.path.join(source, CONFIG_NAME)):
                return BiMaskConfig.load_json(source)
            continue
        if _looks_like_path(source) or os.path.exists(source):
            continue
        path = _hub_file(source, CONFIG_NAME, revision)
        if path is not None:
            return read_json(path, "Bi-Mask config")
    return None


def _hub_file(repo_id: str, filename: str, revision: str | None, **kwargs: Any) -> str | None:
    """Local path of ``filename`` of Hub repo ``repo_id`` (downloaded or cached), None if it has none;
    ``kwargs`` (``token``, ``cache_dir``) go to ``hf_hub_download``."""
    import httpx
    from huggingface_hub import hf_hub_download

    kwargs["revision"] = revision
    if os.environ.get("HF_ENDPOINT"):
        kwargs["endpoint"] = os.environ["HF_ENDPOINT"].rstrip("/")  # read at call time
    try:
        return hf_hub_download(repo_id=repo_id, filename=filename, **kwargs)
    # A repo without the file, a missing repo, an invalid id, offline without a cached copy, no network.
    except (OSError, ValueError, httpx.HTTPError) as error:
        logger.debug("No %s for %s: %s", filename, repo_id, error)
        return None


def _source_config(model: nn.Module) -> Any:
    """The ``BiMaskConfig`` saved with the model the base was loaded from, if any."""
    meta = _source_meta(model)
    return None if meta is None else BiMaskConfig.from_dict(meta)


def _saved_sparse_layers(model: nn.Module) -> list[str] | None:
    """Sparse layer names recorded on the model, or in the ``bimask_config.json`` of the folder or Hub repo
    it was loaded from."""
    recorded = getattr(model, "bimask_sparse_layers", None)
    if recorded:
        return list(recorded)
    meta = _source_meta(model)
    return None if meta is None else list(meta.get("sparse_layers") or [])


def prepare_sparse_base(model: nn.Module, sparse_layers: list[str] | None = None, *,
                        require_linear: bool = True) -> list[str]:
    """Fix the masks of ``model``'s sparse layers in place (before LoRA is added).

    Bi-Mask layers (a model under training or from ``load_sparse_model``) are merged and keep their
    current forward mask. Plain ``Linear`` layers named in ``sparse_layers`` keep their stored zero pattern.
    Sparse ``Conv2d`` layers stay as they are (LoRA on them is not masked: do not target them).

    Args:
        model (`nn.Module`): The sparse base model.
        sparse_layers (`list[str]`, *optional*): Names of its sparse ``Linear`` layers; by default those
            recorded by :func:`bimask_hf.merge` or in the ``bimask_config.json`` of the folder or Hub repo
            the model was loaded from by plain transformers or timm.
        require_linear (`bool`, *optional*, defaults to `True`): Raise when no sparse ``Linear`` is found.

    Returns:
        `list[str]`: The names of the layers whose masks were fixed, sorted.

    Raises:
        ValueError: If a named layer is not a module of ``model``, or none is found with ``require_linear``.
    """
    fixed: dict[str, torch.Tensor] = {}
    for name, layer in bimask_layers(model).items():
        if isinstance(layer, nn.Linear) and layer.spec.masked:
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
            "load_sparse_model, one loaded from a folder or Hub repo saved by bimask-hf (its "
            "bimask_config.json names them), one under Bi-Mask training, or name them with sparse_layers=[...]."
        )
    return sorted(fixed)


def _with_sparse_mapping(peft_config: Any) -> Any:
    config = copy.copy(peft_config)
    config.__class__ = __getattr__("SparseLoraConfig")  # same fields; only its save differs
    config._register_custom_module({NMSparseLinear: __getattr__("MaskedLoraLinear")})
    return config


def get_peft_model(model: nn.Module, peft_config: Any, *args: Any, sparse_layers: list[str] | None = None,
                   **kwargs: Any) -> Any:
    """peft's ``get_peft_model`` for N:M sparse models: LoRA on sparse layers keeps their mask fixed.

    Adapters are never sparsified; peft's ``merge_and_unload()`` returns an exactly N:M model.

    Args:
        model (`nn.Module`): The sparse base model (see :func:`prepare_sparse_base`).
        peft_config (`peft.LoraConfig`): The LoRA config; only LoRA configs are supported.
        *args: As in ``peft.get_peft_model``.
        sparse_layers (`list[str]`, *optional*): See :func:`prepare_sparse_base`.
        **kwargs: As in ``peft.get_peft_model``.

    Returns:
        `peft.PeftModel`: A real ``PeftModel``.

    Raises:
        TypeError: For a config other than ``LoraConfig``.
        ValueError: For DoRA, for LoRA targeting sparse ``Conv2d`` layers, or without sparse ``Linear``
            layers.
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
    """``PeftModel.from_pretrained`` for adapters trained with :func:`get_peft_model` on a sparse base.

    The adapters keep the N:M masks fixed, as in training.

    Args:
        model (`nn.Module`): The sparse base as :func:`get_peft_model` takes it (from
            :func:`load_sparse_model`, or loaded by plain transformers/timm from a folder or Hub repo saved by
            bimask-hf).
        model_id (`str` or `os.PathLike`): The adapter's folder or Hub repo.
        sparse_layers (`list[str]`, *optional*): See :func:`prepare_sparse_base`.
        **kwargs: Passed to ``PeftModel.from_pretrained`` (``revision``, ``subfolder``, ``is_trainable``,
            ...).

    Returns:
        `peft.PeftModel`: The model with the adapter loaded.
    """
    import warnings

    peft = _peft()
    source = os.fspath(model_id)
    hub = {k: kwargs[k] for k in ("revision", "subfolder", "token", "cache_dir") if kwargs.get(k) is not None}
    with warnings.catch_warnings():  # the "bimask_hf" entry is ours: peft warns about keys it does not know
        warnings.filterwarnings("ignore", message=r"Unexpected keyword arguments \['bimask_hf'\]")
        config = peft.PeftConfig.from_pretrained(source, **hub)
        saved = _adapter_entry(source, hub)
        if saved is not None:
            targets = saved.get("target_modules")
            config.target_modules = set(targets) if isinstance(targets, list) else targets
        prepare_sparse_base(model, sparse_layers)
        return peft.PeftModel.from_pretrained(model, model_id, config=_with_sparse_mapping(config), **kwargs)


def _adapter_entry(source: str, hub: dict[str, Any]) -> dict[str, Any] | None:
    """The ``"bimask_hf"`` entry of an adapter's ``adapter_config.json`` (folder or Hub repo), if any."""
    import json

    folder = os.path.join(source, hub.get("subfolder") or "")
    path = os.path.join(folder, ADAPTER_CONFIG_NAME)
    if not os.path.isfile(path):
        name = f"{hub['subfolder']}/{ADAPTER_CONFIG_NAME}" if hub.get("subfolder") else ADAPTER_CONFIG_NAME
        path = _hub_file(source, name, hub.get("revision"),  # type: ignore[assignment]
                         **{k: hub[k] for k in ("token", "cache_dir") if k in hub})
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f).get(ADAPTER_KEY)
