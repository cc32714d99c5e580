"""Publish Bi-Mask sparse models to the Hugging Face Hub and load them back.

- :func:`save_sparse_model` writes a folder that plain transformers / timm load (pruned weights are
  exact zeros in ``model.safetensors``), plus ``bimask_config.json`` and a ``README.md`` model card;
  with ``compressed=True`` N:M layers are stored as kept values + packed indices instead.
- :func:`load_sparse_model` loads such a folder or Hub repo with the plain libraries, verifies the
  N:M pattern and re-patches the model so it is ready to fine-tune with the same N:M.
- :func:`create_model_card` / :func:`update_card_results` build and refresh the model card.
"""

from .cards import create_model_card, update_card_results
from .files import CorruptCheckpointError
from .load import check_nm, load_sparse_model
from .save import save_sparse_model

__all__ = [
    "CorruptCheckpointError",
    "check_nm",
    "create_model_card",
    "load_sparse_model",
    "save_sparse_model",
    "update_card_results",
]
