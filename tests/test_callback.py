"""Bi-Mask in any Trainer: plain `Trainer` + `BiMaskCallback`, a Trainer with its own loss, an accelerate loop."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

import bimask_hf as bh
from bimask_hf import BiMaskTrainer, BiMaskTrainingArguments, create_model
from bimask_hf.checks import CHECKPOINT_CONFIG_NAME
from bimask_hf.config import PERMUTATION_KEY
from bimask_hf.errors import ConflictingSettingsError

# Runs whose only differences are the trainer classes: no clipping, plain SGD, a constant rate, data in order.
RUN = dict(max_steps=4, per_device_train_batch_size=16, learning_rate=0.05, report_to="none", use_cpu=True,
           save_strategy="no", logging_steps=2, disable_tqdm=True, seed=0, optim="sgd", lr_scheduler_type="constant",
           max_grad_norm=0.0, train_sampling_strategy="sequential")
CONFIG = dict(n=2, m=4, permutation_interval=2, permutation_search="random", num_permutations=4)
# Wall-clock figures, not results.
_TIMES = ("sparsity/permutation_search_seconds", "train_runtime", "train_samples_per_second", "train_steps_per_second")


def _model(data):
    set_seed(0)
    return create_model("resnet8_cifar", labels=data.labels, model_args={"base_width": 8})


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _history(trainer):
    return [{k: v for k, v in entry.items() if k not in _TIMES} for entry in trainer.state.log_history]


class _OwnLossTrainer(Trainer):
    """A user's Trainer subclass with its own loss (here the same cross-entropy, written out)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(pixel_values=inputs["pixel_values"])
        loss = F.cross_entropy(outputs.logits, inputs["labels"])
        return (loss, outputs) if return_outputs else loss


def _bimask_trainer_run(tmp_path, data, mode):
    args = BiMaskTrainingArguments(output_dir=str(tmp_path / "bimask"), mode=mode, **CONFIG, **RUN)
    trainer = BiMaskTrainer(model=_model(data), args=args, train_dataset=data.eval_dataset,
                            data_collator=data.collate_fn)
    trainer.train()
    return trainer


def _plain_run(tmp_path, data, mode, trainer_class=Trainer, ahead=True):
    model = bh.sparsify(_model(data), bh.BiMaskConfig(mode=mode, **CONFIG))
    args = TrainingArguments(output_dir=str(tmp_path / trainer_class.__name__), **RUN)
    callback = bh.BiMaskCallback()
    trainer = trainer_class(model=model, args=args, train_dataset=data.eval_dataset, data_collator=data.collate_fn,
                            callbacks=None if ahead else [callback])
    if ahead:
        bh.BiMaskCallback.add_to(trainer, callback)
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def bimask_runs(tmp_path_factory, small_digits):
    """``BiMaskTrainer`` and a plain ``Trainer`` with the callback, both in ``bimask`` mode."""
    tmp_path = tmp_path_factory.mktemp("runs")
    return _bimask_trainer_run(tmp_path, small_digits, "bimask"), _plain_run(tmp_path, small_digits, "bimask")


@pytest.mark.parametrize("mode", ["bimask", "post"])
def test_plain_trainer_with_the_callback_trains_as_bimask_trainer(tmp_path, small_digits, bimask_runs, mode):
    if mode == "bimask":
        reference, plain = bimask_runs
        trainers = [plain, _plain_run(tmp_path, small_digits, mode, trainer_class=_OwnLossTrainer, ahead=False)]
    else:
        reference, trainers = _bimask_trainer_run(tmp_path, small_digits, mode), [_plain_run(tmp_path, small_digits, mode)]
    expected = _state(reference.model)
    perms = [k for k in expected if k.endswith(PERMUTATION_KEY)]
    assert perms
    if mode == "bimask":  # refreshed away from the identity it starts with
        assert any(not torch.equal(expected[k], torch.arange(len(expected[k]))) for k in perms)
    else:  # post projects the parameters themselves: exactly N:M after the last step
        for layer in bh.sparse_layers(reference.model).values():
            mf, _ = layer.compute_masks()
            assert bool(((layer.weight != 0) <= mf).all())
    for trainer in trainers:
        state = _state(trainer.model)
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7, msg=key)
        history, wanted = _history(trainer), _history(reference)
        assert [sorted(e) for e in history] == [sorted(e) for e in wanted]
        for got, want in zip(history, wanted):
            assert got == pytest.approx(want, rel=1e-5)
    logged = _history(reference)[0]
    assert logged["sparsity/sparse_density"] == 0.5 and ("sparsity/retention_mean" in logged) == (mode == "bimask")


def test_hand_written_accelerate_loop_matches_the_trainer(small_digits, bimask_runs):
    """The loop of docs/training.md: sparsify, refresh at step 0 and every interval, report for logs."""
    trainer = bimask_runs[1]

    config = bh.BiMaskConfig(**CONFIG)
    model = bh.sparsify(_model(small_digits), config)
    accelerator = Accelerator(cpu=True)
    loader = torch.utils.data.DataLoader(small_digits.eval_dataset, batch_size=16, collate_fn=small_digits.collate_fn)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    bh.refresh_permutations(model, step=0)
    model.train()
    step = 0
    while step < 4:
        for batch in loader:
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step % config.permutation_interval == 0:
                bh.refresh_permutations(model, step=step)
            if step == 4:
                break
    expected = _state(trainer.model)
    state = _state(accelerator.unwrap_model(model))
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7, msg=key)
    logged = trainer.state.log_history[-2]  # the last training log (step 4), before the run summary
    stats = bh.report(model).stats.to_logs()
    assert logged["step"] == 4 and logged["sparsity/retention_mean"] == pytest.approx(stats["sparsity/retention_mean"])


def test_callback_needs_a_sparsified_model_and_agreeing_settings(tmp_path, small_digits):
    args = TrainingArguments(output_dir=str(tmp_path / "out"), **RUN)
    with pytest.raises(ValueError, match="no Bi-Mask layers: call bimask_hf.sparsify"):
        Trainer(model=_model(small_digits), args=args, callbacks=[bh.BiMaskCallback()])
    model = bh.sparsify(_model(small_digits), bh.BiMaskConfig(n=2, m=4))
    with pytest.raises(ValueError, match=r"n=2 in the model but 1 in BiMaskCallback\(config=...\)"):
        Trainer(model=model, args=args, callbacks=[bh.BiMaskCallback(config=bh.BiMaskConfig(n=1, m=4))])


def test_bimask_trainer_refuses_arguments_that_contradict_the_model(tmp_path, small_digits):
    model = bh.sparsify(_model(small_digits), bh.BiMaskConfig(n=2, m=4))
    args = BiMaskTrainingArguments(output_dir=str(tmp_path / "out"), n=1, m=4, **RUN)
    with pytest.raises(ValueError, match=r"n=2 in the model but 1 in the training arguments. Change n in"):
        BiMaskTrainer(model=model, args=args, train_dataset=small_digits.eval_dataset)
    with pytest.raises(ValueError, match=r"mode='bimask' in the model but 'post' in BiMaskTrainer\(bimask_config"):
        BiMaskTrainer(model=model, args=BiMaskTrainingArguments(output_dir=str(tmp_path / "out"), **RUN),
                      bimask_config=bh.BiMaskConfig(mode="post"), train_dataset=small_digits.eval_dataset)
    # Arguments left at their defaults take the model's settings; training settings they name apply.
    args = BiMaskTrainingArguments(output_dir=str(tmp_path / "out"), m=4, permutation_interval=3, decay=1e-3, **RUN)
    trainer = BiMaskTrainer(model=model, args=args, train_dataset=small_digits.eval_dataset)
    assert trainer.bimask_config.n == 2 and trainer.bimask_config.permutation_interval == 3
    assert model.bimask_config == trainer.bimask_config
    assert {layer.decay for layer in bh.sparse_layers(model).values()} == {1e-3}


# ---- checkpoints under a plain Trainer ------------------------------------------------------------

def _vit(data, seed, n=2):
    from transformers import ViTConfig, ViTForImageClassification

    set_seed(seed)
    model = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                intermediate_size=64, image_size=16, patch_size=4,
                                                num_labels=len(data.labels)))
    return bh.sparsify(model, bh.BiMaskConfig(**{**CONFIG, "n": n}))


class _Snapshots(TrainerCallback):
    """The model's state at every checkpoint save, by step."""

    def __init__(self):
        self.states = {}

    def on_save(self, args, state, control, model=None, **kwargs):
        self.states[state.global_step] = _state(model)


def _vit_run(tmp_path, data, seed, resume=None, **overrides):
    run = {**RUN, "save_strategy": "steps", "save_steps": 2, **overrides}
    args = TrainingArguments(output_dir=str(tmp_path / "vit"), **run)
    snapshots = _Snapshots()
    trainer = Trainer(model=_vit(data, seed), args=args, train_dataset=data.eval_dataset,
                      eval_dataset=data.eval_dataset, data_collator=data.collate_fn,
                      callbacks=[bh.BiMaskCallback(), snapshots])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, snapshots


def test_plain_trainer_resumes_a_renamed_transformers_model_exactly(tmp_path, small_digits):
    """transformers 5 saves ViT under other key names than its modules, and the plain Trainer loads checkpoints
    by raw names (non-strict): without the callback's reload a resumed run restarts from its fresh weights."""
    straight, _ = _vit_run(tmp_path, small_digits, seed=0)
    checkpoint = tmp_path / "vit" / "checkpoint-2"
    saved = json.loads((checkpoint / CHECKPOINT_CONFIG_NAME).read_text())
    assert (saved["n"], saved["m"], saved["permutation_search"]) == (2, 4, "random")
    expected = _state(straight.model)
    perms = [k for k in expected if k.endswith(PERMUTATION_KEY)]
    assert perms and any(not torch.equal(expected[k], torch.arange(len(expected[k]))) for k in perms)
    for resume in (str(checkpoint), True):  # a folder, and the newest checkpoint (checkpoint-4 after the 1st)
        if resume is True:
            shutil.rmtree(tmp_path / "vit" / "checkpoint-4")
        resumed, _ = _vit_run(tmp_path, small_digits, seed=1, resume=resume)  # other initial weights
        state = _state(resumed.model)
        for key, value in expected.items():
            assert torch.equal(state[key], value), key


def test_plain_trainer_refuses_to_resume_with_other_settings(tmp_path, small_digits):
    _vit_run(tmp_path, small_digits, seed=0, max_steps=2)
    model = _vit(small_digits, 0, n=1)
    args = TrainingArguments(output_dir=str(tmp_path / "vit"), **RUN)
    trainer = Trainer(model=model, args=args, train_dataset=small_digits.eval_dataset,
                      data_collator=small_digits.collate_fn, callbacks=[bh.BiMaskCallback()])
    with pytest.raises(ConflictingSettingsError, match=r"trained with n=2, but this run asks for n=1"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "vit" / "checkpoint-2"))


def test_plain_trainer_keeps_the_best_checkpoint_of_a_renamed_model(tmp_path, small_digits):
    trainer, snapshots = _vit_run(tmp_path, small_digits, seed=0, eval_strategy="steps", eval_steps=2,
                                  load_best_model_at_end=True, metric_for_best_model="loss",
                                  greater_is_better=True)  # the higher loss is "best": not the last step
    best = int(trainer.state.best_model_checkpoint.rsplit("-", 1)[1])
    assert best != trainer.state.global_step, "the best checkpoint is the last one: this test checks nothing"
    state = _state(trainer.model)
    for key, value in snapshots.states[best].items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("how", ["callbacks=", "add_callback"])
def test_metrics_reach_a_tracker_when_the_callback_is_given_as_any_other(tmp_path, small_digits, how, monkeypatch):
    """The Trainer calls report_to trackers before user callbacks: the callback must get ahead of them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    model = bh.sparsify(_model(small_digits), bh.BiMaskConfig(**CONFIG))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), **{**RUN, "report_to": ["tensorboard"]})
    callback = bh.BiMaskCallback()
    trainer = Trainer(model=model, args=args, train_dataset=small_digits.eval_dataset,
                      data_collator=small_digits.collate_fn, callbacks=[callback] if how == "callbacks=" else None)
    if how == "add_callback":
        trainer.add_callback(callback)
    trainer.train()
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert names.index("BiMaskCallback") < names.index("TensorBoardCallback"), names
    assert names.count("BiMaskCallback") == 1
    events = sorted(tmp_path.rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert acc.Scalars("train/sparsity/sparse_density")[-1].value == pytest.approx(0.5), acc.Tags()["scalars"]
    # every training log: the two of logging_steps=2 and the summary with train_loss
    assert len(acc.Scalars("train/loss")) == 2 and len(acc.Scalars("train/sparsity/retention_mean")) == 3
