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
    # Per-rank streams use public hooks only: the loaders' public methods and the public column remover.
    assert _parameters(Trainer.get_train_dataloader) == ["self"]
    assert _parameters(Trainer.get_eval_dataloader) == ["self", "eval_dataset"]
    assert _parameters(Trainer.get_test_dataloader) == ["self", "test_dataset"]
    from transformers.trainer_utils import RemoveColumnsCollator

    assert _parameters(RemoveColumnsCollator.__init__) == [
        "self", "data_collator", "signature_columns", "logger", "model_name", "description"]

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
    # Every class of the package in BiMaskTrainer's MRO: the private Trainer members they override.
    overridden = {name for cls in trainer.BiMaskTrainer.__mro__ if cls.__module__.startswith("bimask_hf.")
                  for name in cls.__dict__ if name.startswith("_") and not name.startswith("__")
                  and hasattr(Trainer, name)}
    assert overridden == {"_load_from_checkpoint", "_load_best_model"}  # at most three (issue 21), all in compat
    assert {name for name in compat.CheckpointKeysMixin.__dict__ if hasattr(Trainer, name)
            and not name.startswith("__")} == overridden


def test_no_module_but_compat_touches_a_private_trainer_or_accelerator_member():
    """``obj._member`` for a private member of ``Trainer`` or ``Accelerator`` appears only in compat.py."""
    import re
    from pathlib import Path

    from accelerate import Accelerator

    private = {name for cls in (Trainer, Accelerator) for name in dir(cls)
               if name.startswith("_") and not name.startswith("__")}
    # instance attributes the Trainer and Accelerator set in __init__ (not on the class)
    private |= {"_train_batch_size", "_signature_columns", "_dataloaders", "_eval_dataloaders", "_models",
                "_optimizers", "_schedulers", "_remove_unused_columns", "_finish_current_push"}
    package = Path(compat.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "compat.py":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for name in re.findall(r"\.(_[a-z][a-z0-9_]*)\b", line):
                if name in private:
                    found.append(f"{path.relative_to(package)}:{number}: {name}")
    assert not found, found


def test_callback_events_are_called_by_the_handler_iterating_its_public_list():
    """Entry 2: CallbackHandler.call_event is on the stack of every event, as ``self``, looping over ``callbacks``."""
    from transformers.trainer_callback import CallbackHandler, TrainerCallback

    source = inspect.getsource(CallbackHandler.call_event)
    assert "for callback in self.callbacks:" in source and "getattr(callback, event)(" in source
    found = []

    class Probe(TrainerCallback):
        def on_init_end(self, args, state, control, **kwargs):
            found.append(compat.calling_callback_handler(self))

    probe = Probe()
    trainer = Trainer(model=tiny_vit(), callbacks=[probe])
    assert found == [trainer.callback_handler]
    assert compat.calling_callback_handler(probe) is None  # not inside an event
