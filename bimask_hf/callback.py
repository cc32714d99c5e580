"""`BiMaskCallback`: Bi-Mask training in any `transformers.Trainer`.

Sparsify the model, then hand the callback to the Trainer, as with any other callback::

    model = bh.sparsify(model, bh.BiMaskConfig(n=2, m=4))
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[bh.BiMaskCallback()])
    trainer.train()
    bh.save_sparse_model(trainer.model, "out")  # merged, exactly N:M weights + bimask_config.json + card

The callback reads the model the Trainer passes to its events and the :class:`~bimask_hf.config.BiMaskConfig`
that :func:`~bimask_hf.patching.sparsify` attached to it, and does the per-step work of the method:
permutation refreshes every ``permutation_interval`` optimizer steps (seeded by the step, identical on
every rank), the in-place projection of ``post`` mode (and of ``pre`` mode on FSDP2 shards), and the
``sparsity/*`` metrics in the Trainer's training logs. The permutations are buffers of the model, so they
are saved and resumed with the weights; the callback records in each checkpoint the settings it was trained
with, refuses to resume one with contradicting settings, and loads a transformers model's weights again by
name where transformers 5 saved them under other keys (ViT, ...) than the Trainer loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch.nn as nn
from transformers import TrainerCallback

from .checks import CHECKPOINT_CONFIG_NAME, check_resume, save_checkpoint_config, stop_if_diverged
from .compat import calling_callback_handler, load_checkpoint_weights, saves_renamed_keys
from .config import STRUCTURE_FIELDS, BiMaskConfig
from .distributed import describe_setup, is_sharded
from .lora import is_peft_model
from .modes import mode_spec
from .patching import project_, refresh_permutations, report, sparse_layers, training_state

logger = logging.getLogger(__name__)

__all__ = ["BiMaskCallback", "check_config_agrees"]

# Training-log keys the Trainer writes (``loss`` every ``logging_steps``, ``train_loss`` at the end).
_TRAINING_LOG_KEYS = ("loss", "train_loss")


def check_config_agrees(
    model: nn.Module, config: BiMaskConfig | None, given_as: str, fields: Iterable[str] | None = None
) -> BiMaskConfig:
    """The config ``model`` was sparsified with, after reconciling it with the ``config`` a caller names.

    Only the fields ``config`` sets to other than their defaults count as named (a field left at its default
    takes the model's value). A named field that defines the sparse layers (:data:`STRUCTURE_FIELDS`: N, M,
    mode, ...) and differs from the model's is an error; a named training setting (decay, permutation
    interval and search, seed) replaces the model's, on the model too.

    Args:
        model: A model patched by :func:`~bimask_hf.patching.sparsify` (or a peft model wrapping one).
        config: The config the caller names, or None to take the model's.
        given_as: How the caller named ``config``, for the message (e.g. ``"BiMaskCallback(config=...)"``).
        fields: The fields of ``config`` to consider (default: all).

    Returns:
        The config the model trains with.

    Raises:
        ValueError: The model has no Bi-Mask layers, or was sparsified with other N:M, mode, ... than ``config``.
    """
    base = model.get_base_model() if is_peft_model(model) else model
    attached = getattr(base, "bimask_config", None)
    if attached is None:
        raise ValueError(
            f"{type(base).__name__} has no Bi-Mask layers: call bimask_hf.sparsify(model, config) before building "
            "the Trainer (or use bimask_hf.BiMaskTrainer, which sparsifies from its arguments)."
        )
    if config is None:
        return attached
    defaults = BiMaskConfig()
    considered = [name for name in (fields if fields is not None else config.to_dict())
                  if getattr(config, name) != getattr(defaults, name)]
    differences = attached.differences(config, fields=considered)
    structural = {name: pair for name, pair in differences.items() if name in STRUCTURE_FIELDS}
    if structural:
        listed = ", ".join(f"{name}={mine!r} in the model but {theirs!r} in {given_as}"
                           for name, (mine, theirs) in structural.items())
        raise ValueError(
            f"The model is already sparsified with other settings than {given_as}: {listed}. Change "
            f"{', '.join(structural)} in {given_as} to the model's values (or leave them out), or call "
            "bimask_hf.merge(model) and sparsify it again with the new settings."
        )
    if not differences:
        return attached
    logger.info("Training settings from %s replace the model's: %s", given_as,
                ", ".join(f"{name}={theirs!r} (was {mine!r})" for name, (mine, theirs) in differences.items()))
    updated = dataclasses.replace(attached, **{name: theirs for name, (_, theirs) in differences.items()})
    base.bimask_config = updated
    for layer in sparse_layers(base).values():
        layer.decay = updated.decay
    return updated


def _resumed_checkpoint(args: Any, step: int) -> str | None:
    """The checkpoint folder a run resumed at ``step`` from: ``args.resume_from_checkpoint``, else
    ``<output_dir>/checkpoint-<step>``, whichever holds the Trainer's state at that step."""
    candidates = [args.resume_from_checkpoint] if isinstance(args.resume_from_checkpoint, str) else []
    candidates.append(os.path.join(args.output_dir, f"checkpoint-{step}"))
    for folder in candidates:
        try:
            with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as f:
                if json.load(f).get("global_step") == step:
                    return folder
        except (OSError, ValueError):
            continue
    return None


class BiMaskCallback(TrainerCallback):
    """Per-step Bi-Mask work in a `transformers.Trainer`: permutation refresh, projection, sparsity logs.

    Needs nothing at construction: the model comes from the Trainer's events and its settings from the
    ``BiMaskConfig`` that :func:`~bimask_hf.patching.sparsify` attached to it. Trainer subclasses with their
    own ``compute_loss`` work the same, since the callback only acts between steps.

    The ``sparsity/*`` metrics are added to every training log (``loss`` / ``train_loss``) in place, so
    ``trainer.state.log_history`` and the callbacks after this one see them. The Trainer calls the trackers
    named in ``report_to`` before the callbacks given in ``callbacks=``, so the callback moves itself ahead
    of them when the Trainer is built (or, after ``trainer.add_callback``, when training begins), and the
    trackers log the metrics too; :meth:`add_to` does the same explicitly.

    Args:
        model: Deprecated way to give the model up front; the Trainer's own model is used once training begins.
        config: The settings the model must have been sparsified with; checked against the model's own
            (an error names any field that differs). Default: the model's.
        print_report: Print the per-layer sparsity table when training begins (main process).
        setup: Returns the distributed setup named in that header (default:
            :func:`~bimask_hf.distributed.describe_setup`).
        fixed_masks: LoRA fine-tuning: masks are fixed, nothing to refresh or project. Default: whether the
            model is a peft model.
        reload_checkpoints: When a run resumes, and after the Trainer loaded its best model, load a
            transformers model's weights again by name if transformers saved them under other keys than the
            Trainer loads. ``BiMaskTrainer`` turns it off: it loads them by name itself.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        config: BiMaskConfig | None = None,
        print_report: bool = True,
        setup: Callable[[], str] | None = None,
        fixed_masks: bool | None = None,
        reload_checkpoints: bool = True,
    ) -> None:
        self.model: nn.Module | None = None
        self.requested_config = config
        self.config: BiMaskConfig | None = config
        self.print_report = print_report
        self.setup = setup
        self.fixed_masks = fixed_masks
        self.reload_checkpoints = reload_checkpoints
        self.search_seconds = 0.0
        self.ahead_of_trackers = False
        self.starting = False
        self.checkpoint_format = contextlib.ExitStack()
        if model is not None:
            self.bind(model)

    @classmethod
    def add_to(cls, trainer: Any, callback: BiMaskCallback | None = None) -> BiMaskCallback:
        """Add ``callback`` (a new one by default) to ``trainer`` ahead of its ``report_to`` trackers.

        Args:
            trainer: A `transformers.Trainer` (or subclass) whose model was sparsified.
            callback: The callback to add; a new ``BiMaskCallback()`` if None.

        Returns:
            The callback added.
        """
        callback = callback if callback is not None else cls()
        callback._move_ahead(trainer.callback_handler.callbacks)
        if trainer.model is not None:
            callback.bind(trainer.model)
        return callback

    def _move_ahead(self, callbacks: list[Any]) -> None:
        """Put this callback right after the Trainer's flow callback (which decides when to log), before
        everything that logs. Safe while ``callbacks`` is being iterated by an event: the callbacks after
        this one keep their positions, so each is still called once."""
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(min(1, len(callbacks)), self)
        self.ahead_of_trackers = True

    def _get_ahead_of_trackers(self) -> None:
        """Given as ``Trainer(callbacks=[...])`` or ``add_callback``: move ahead of the ``report_to`` trackers."""
        if not self.ahead_of_trackers:
            handler = calling_callback_handler(self)
            if handler is not None:
                self._move_ahead(handler.callbacks)

    def bind(self, model: nn.Module) -> None:
        """Act on ``model`` from now on.

        Args:
            model: The Trainer's model (with ``model_init``, a new one per run).

        Raises:
            ValueError: ``model`` has no Bi-Mask layers, or other settings than ``config``.
        """
        if self.fixed_masks is None:
            self.fixed_masks = is_peft_model(model)
        if self.fixed_masks:  # LoRA: the masks stay as they are; the config only names the pattern
            base = model.get_base_model() if is_peft_model(model) else model
            self.config = getattr(base, "bimask_config", None) or self.requested_config or BiMaskConfig()
        else:
            self.config = check_config_agrees(model, self.requested_config, "BiMaskCallback(config=...)")
        self.model = model

    def _refresh(self, step: int, progress: bool | None = False) -> None:
        stats = refresh_permutations(self.model, step=step, progress=progress)
        self.search_seconds += stats["seconds"]

    def _refreshes(self) -> bool:
        return not self.fixed_masks and mode_spec(self.config.mode).backward_mask

    def on_init_end(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        if model is not None:  # a wrong or unsparsified model fails when the Trainer is built, not mid-run
            self.bind(model)
        self._get_ahead_of_trackers()

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        if model is not None:
            self.bind(model)
        if self.model is None:
            raise ValueError("BiMaskCallback got no model from the Trainer; pass the sparsified model to it.")
        self._get_ahead_of_trackers()  # added with trainer.add_callback after the Trainer was built
        if args.report_to and not self.ahead_of_trackers and state.is_world_process_zero:
            logger.warning(
                "BiMaskCallback was added after the report_to trackers %s, which then log no sparsity/* metrics: "
                "add it with bimask_hf.BiMaskCallback.add_to(trainer) (or train with BiMaskTrainer).", args.report_to,
            )
        if state.global_step > 0:  # the Trainer restored a checkpoint's state: this run resumes
            self._resume(args, state)
        self.starting = True  # the first step begins with the start-of-training work
        # While training, the model's save_pretrained writes the training state (dense weights and
        # permutations) that the Trainer's checkpoints need to resume exactly; after it, the exact N:M folder.
        self.checkpoint_format.close()
        self.checkpoint_format.enter_context(training_state(self.model))

    def on_train_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        best = state.best_model_checkpoint
        # The Trainer has just loaded the best checkpoint by raw key names (load_best_model_at_end).
        if args.load_best_model_at_end and best is not None and os.path.isdir(best) and self._reloads(args):
            load_checkpoint_weights(best, self.model)
        self.end_training()

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        # What a resumed run must agree with (BiMaskTrainer writes it while saving; a plain Trainer here).
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if (args.should_save and self.config is not None and os.path.isdir(folder)
                and not os.path.isfile(os.path.join(folder, CHECKPOINT_CONFIG_NAME))):
            save_checkpoint_config(folder, self.config)

    def _reloads(self, args: Any) -> bool:
        """Whether the Trainer's own checkpoint loading missed weights that this callback must load by name."""
        if not self.reload_checkpoints or self.model is None or self.fixed_masks:
            return False
        if getattr(args, "fsdp", None) or getattr(args, "deepspeed", None):  # their own checkpoint formats
            return False
        if any(is_sharded(p) for p in self.model.parameters()):
            return False
        return saves_renamed_keys(self.model)

    def _resume(self, args: Any, state: Any) -> None:
        """Check the resumed checkpoint's settings and load renamed weights by name."""
        folder = _resumed_checkpoint(args, state.global_step)
        if folder is None:
            if self._reloads(args):
                raise ValueError(
                    f"This run resumed at step {state.global_step}, but its checkpoint folder is neither "
                    f"{args.output_dir}/checkpoint-{state.global_step} nor args.resume_from_checkpoint, so "
                    "BiMaskCallback cannot load this transformers model's renamed weights from it. Resume from a "
                    "checkpoint inside --output_dir, or set TrainingArguments(resume_from_checkpoint=<folder>)."
                )
            logger.warning("Resumed at step %d from a checkpoint outside %s: its N:M settings are not checked.",
                           state.global_step, args.output_dir)
            return
        if not self.fixed_masks:
            check_resume(folder, self.config)
        if self._reloads(args):
            load_checkpoint_weights(folder, self.model)

    def end_training(self) -> None:
        """Leave the training state: ``save_pretrained`` writes the exact N:M folder again (idempotent)."""
        self.checkpoint_format.close()

    def _start(self, args: Any, state: Any) -> None:
        """Start-of-training work, just before the first step (every callback has seen the initial state)."""
        self.starting = False
        if self.fixed_masks:
            if state.is_world_process_zero:
                print(f"bimask-hf: LoRA fine-tuning of a {self.config.pattern} sparse model, N:M masks fixed")
            return
        if state.global_step == 0 and self._refreshes():
            # a resumed run keeps the permutations its checkpoint holds; the first search of a large model
            # takes minutes: a bar, as the Trainer's own (the later, incremental ones run without)
            self._refresh(0, progress=False if args.disable_tqdm else None)
        if self.print_report:
            table = report(self.model)  # a collective under FSDP2 (masks of gathered weights): every rank
            if state.is_world_process_zero:
                setup = (self.setup or describe_setup)()
                print(f"bimask-hf: {self.config.pattern} sparse training, mode={self.config.mode}, {setup}\n{table}")

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.starting:
            self._start(args, state)
        # ``pre`` prunes the parameter inside forward; under FSDP2 that is the gathered copy, which is
        # dropped after the forward pass, so the shards are pruned here (same effect: before the step).
        if (mode_spec(self.config.mode).projects_before and not self.fixed_masks
                and any(is_sharded(layer.weight) for layer in sparse_layers(self.model).values())):
            project_(self.model)

    def on_optimizer_step(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if mode_spec(self.config.mode).projects_after and not self.fixed_masks:
            project_(self.model)

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        stop_if_diverged(self.model, state.global_step)  # before NaN weights reach the masks and the logs
        if self._refreshes() and state.global_step % self.config.permutation_interval == 0:
            self._refresh(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        if logs is None or not any(key in logs for key in _TRAINING_LOG_KEYS):
            return
        extra = self.sparsity_logs()  # every rank: the report gathers sharded weights
        logs.update(extra)
        # The Trainer has just recorded this log as {**logs, "step": ...}: the history gets the metrics too.
        if state.log_history and all(state.log_history[-1].get(key) == value for key, value in logs.items()
                                     if key not in extra):
            state.log_history[-1].update(extra)

    def sparsity_logs(self) -> dict[str, float]:
        """``sparsity/*`` metrics of the current masks; resets the accumulated search time.

        Returns:
            ``sparsity/sparse_density``, ``sparsity/model_density``, ``sparsity/retention_mean|min`` (when a
            layer has backward masks) and ``sparsity/permutation_search_seconds``; empty without Bi-Mask layers.
        """
        if self.model is None or not sparse_layers(self.model):
            return {}
        logs = report(self.model).stats.to_logs()
        logs["sparsity/permutation_search_seconds"] = self.search_seconds
        self.search_seconds = 0.0
        return logs
