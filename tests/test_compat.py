"""What `bimask_hf/compat.py` relies on in transformers: a failure here means an upstream release changed it.

Each test names the compat entry it guards. When one fails, read the entry's reason in ``compat.py``:
either adapt the entry to the new private member, or delete it if upstream now offers a public hook (or
no longer has the problem).
"""

from __future__ import annotations

import inspect

from safetensors.torch import load_file
from transformers import Trainer

from bimask_hf import compat, trainer
from tests.models import tiny_vit


def _parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_private_trainer_members_keep_the_signatures_compat_overrides():
    # Entry 1: the Trainer resumes through _load_from_checkpoint and loads the best model in _load_best_model.
    assert _parameters(Trainer._load_from_checkpoint) == ["self", "resume_from_checkpoint", "model"]
    assert _parameters(Trainer._load_best_model) == ["self"]
    assert "self._load_from_checkpoint(resume_from_checkpoint)" in inspect.getsource(Trainer.train)
    # Entry 2: every public get_*_dataloader builds its loader in _get_dataloader, with the column-removing collator.
    assert _parameters(Trainer._get_dataloader) == [
        "self", "dataset", "description", "batch_size", "sampler_fn", "is_training", "dataloader_key"]
    for public in (Trainer.get_train_dataloader, Trainer.get_eval_dataloader, Trainer.get_test_dataloader):
        assert "self._get_dataloader(" in inspect.getsource(public), public.__name__
    assert "_get_collator_with_removed_columns" in inspect.getsource(Trainer._get_dataloader)
    assert _parameters(Trainer._get_collator_with_removed_columns) == ["self", "data_collator", "description"]


def test_the_trainer_still_loads_checkpoints_by_raw_key_names(tmp_path):
    """Entry 1's reason: save_pretrained renames ViT keys and the Trainer's loader does not map them back."""
    model = tiny_vit()
    model.save_pretrained(tmp_path)
    saved = set(load_file(tmp_path / "model.safetensors"))
    live = set(model.state_dict())
    assert saved != live, "transformers saves module names again: compat entry 1 may be unnecessary"
    names = compat.live_key_names(model, model.state_dict())
    assert {names.get(key, key) for key in saved} <= live  # and the mapping compat applies recovers them
    source = inspect.getsource(Trainer._load_from_checkpoint)
    assert "load_state_dict(state_dict, False)" in source and "revert_weight_conversion" not in source


def test_the_trainer_uses_only_the_compat_module_for_private_members():
    own = {name for name, _ in inspect.getmembers(trainer.BiMaskTrainer) if name.startswith("_")
           and not name.startswith("__") and name in trainer.BiMaskTrainer.__dict__}
    assert own <= {"_save_hub_folder", "_save_lora", "_upload", "_card_data"}, own  # BiMaskTrainer's own helpers
    overridden = {name for cls in (compat.CheckpointKeysMixin, compat.PerRankStreamMixin)
                  for name in cls.__dict__ if name.startswith("_") and not name.startswith("__")
                  and hasattr(Trainer, name)}
    assert overridden == {"_load_from_checkpoint", "_load_best_model", "_get_dataloader"}
