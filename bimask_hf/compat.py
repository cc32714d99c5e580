"""Every use of a private `transformers.Trainer` member, in one place.

Written for transformers 5.25 and accelerate 1.16. Each entry says why no public hook serves;
``tests/test_compat.py`` fails when upstream changes the behaviour an entry relies on, so a transformers
release that breaks one is noticed here, not in a user's run.

1. ``Trainer._load_from_checkpoint`` and ``Trainer._load_best_model`` (overridden by
   :class:`CheckpointKeysMixin`). transformers 5 saves some models (ViT, ...) under their original
   checkpoint key names (``vit.encoder.layer.0.attention.attention.query``), which differ from the module
   names (``vit.layers.0.attention.q_proj``), and the Trainer loads checkpoints with a non-strict
   ``load_state_dict`` of the raw keys: a resumed run would silently restart from its initial weights and
   permutations. The Trainer has no public hook between reading a checkpoint and loading it. (A plain
   ``Trainer`` with :class:`~bimask_hf.callback.BiMaskCallback` gets the same result from public hooks: the
   callback loads the weights again by name when training begins and after the best model was loaded,
   which ``BiMaskTrainer`` avoids doing twice.)
2. The ``CallbackHandler`` that calls an event, found on the stack (:func:`calling_callback_handler`). The
   Trainer calls the ``report_to`` trackers before the callbacks a user passes, so a ``BiMaskCallback``
   given as ``Trainer(callbacks=[...])`` would add its ``sparsity/*`` metrics to a log the trackers have
   already written. No event receives the handler; ``CallbackHandler.call_event`` calls every callback's
   event with the handler as its ``self``, and the callback moves itself ahead of the trackers in the
   handler's public ``callbacks`` list. If the handler is not found, the callback warns instead.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from transformers.trainer_callback import CallbackHandler

from .errors import CorruptCheckpointError

logger = logging.getLogger(__name__)

__all__ = ["CheckpointKeysMixin", "calling_callback_handler", "live_key_names", "load_checkpoint_weights",
           "saves_renamed_keys"]


def live_key_names(model: Any, live: dict[str, torch.Tensor]) -> dict[str, str]:
    """Saved key -> module key of a transformers model, for the keys ``save_pretrained`` renames.

    transformers reverses its load-time renamings when it saves; applying that reversal to the live
    state dict maps every saved name to the tensor (hence the module key) it came from.

    Args:
        model: A transformers ``PreTrainedModel``.
        live: Its state dict.

    Returns:
        ``{saved key: module key}`` for every key the save renames (empty for a transformers without renamings).
    """
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without load-time conversions saves module names
        return {}
    by_tensor = {id(tensor): key for key, tensor in live.items()}
    saved = revert_weight_conversion(model, dict(live))
    return {name: by_tensor[id(tensor)] for name, tensor in saved.items() if id(tensor) in by_tensor}


def saves_renamed_keys(model: Any) -> bool:
    """Whether transformers saves ``model``'s weights under other keys than its module names (ViT, ...).

    Args:
        model: A model (wrapped or not).

    Returns:
        True for a transformers model whose ``save_pretrained`` renames some keys.
    """
    from transformers import PreTrainedModel

    plain = extract_model_from_parallel(model)
    return isinstance(plain, PreTrainedModel) and bool(live_key_names(plain, plain.state_dict()))


def load_checkpoint_weights(folder: str, model: Any) -> bool:
    """Load a transformers model's ``model.safetensors`` (or its shards) from ``folder`` under the live key names.

    Args:
        folder: A checkpoint folder the Trainer wrote.
        model: The model to load into (wrapped or not).

    Returns:
        True when loaded; False when the Trainer's own loader applies (timm, peft, other file formats).

    Raises:
        CorruptCheckpointError: The file does not hold this model's weights.
    """
    from safetensors.torch import load_file
    from transformers import PreTrainedModel

    from .hub.files import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, weight_files

    plain = extract_model_from_parallel(model)
    if not isinstance(plain, PreTrainedModel):
        return False
    if not any(os.path.isfile(os.path.join(folder, name)) for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)):
        return False
    state: dict[str, torch.Tensor] = {}
    for name in weight_files(folder):  # the single file or every shard of the index
        state.update(load_file(os.path.join(folder, name), device="cpu"))
    live = plain.state_dict()
    names = live_key_names(plain, live)
    state = {names.get(key, key): value for key, value in state.items()}
    result = plain.load_state_dict(state, strict=False)
    # A key left out of the file because it is tied to a loaded one (shares its storage) is not missing.
    loaded = {live[k].untyped_storage().data_ptr() for k in state if k in live}
    missing = [k for k in result.missing_keys if live[k].untyped_storage().data_ptr() not in loaded]
    if missing or result.unexpected_keys:
        raise CorruptCheckpointError(
            f"{folder} does not hold this model's weights: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {result.unexpected_keys[:5]}"
            f"{' ...' if len(result.unexpected_keys) > 5 else ''}. Resume with the model (and --model_args) "
            "the checkpoint was trained with."
        )
    return True


def calling_callback_handler(callback: Any) -> Any:
    """The transformers ``CallbackHandler`` calling an event of ``callback`` now (entry 2).

    Args:
        callback: The callback whose event method calls this.

    Returns:
        The handler (whose ``callbacks`` list holds ``callback``), or None when none is on the stack.
    """
    frame = sys._getframe(1)
    for _ in range(6):  # the event method, then CallbackHandler.call_event, then its on_<event>
        if frame is None:
            return None
        handler = frame.f_locals.get("self")
        if isinstance(handler, CallbackHandler) and any(c is callback for c in handler.callbacks):
            return handler
        frame = frame.f_back
    return None


class CheckpointKeysMixin:
    """Resume and ``load_best_model_at_end`` with a transformers model's weights matched by name (entry 1)."""

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        target = model if model is not None else self.model  # type: ignore[attr-defined]
        if self._own_loader_applies() or not load_checkpoint_weights(resume_from_checkpoint, target):
            super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint  # type: ignore[attr-defined]
        if best is None or self._own_loader_applies() or not load_checkpoint_weights(best, self.model):  # type: ignore[attr-defined]
            super()._load_best_model()  # type: ignore[misc]
        else:
            logger.info("Loaded the best model from %s (score: %s).", best, self.state.best_metric)  # type: ignore[attr-defined]

    def _own_loader_applies(self) -> bool:
        # FSDP and DeepSpeed checkpoints are their own formats, loaded by the Trainer.
        return bool(self.is_fsdp_enabled or self.is_deepspeed_enabled)  # type: ignore[attr-defined]
