"""`BiMaskTrainer`: the HF Trainer with Bi-Mask N:M sparse training built in.

One `BiMaskTrainingArguments` dataclass carries the Trainer's flags and the `BiMaskConfig` fields, so
`HfArgumentParser` reads a single command line. `BiMaskTrainer` adds to a plain Trainer only what it cannot
know: it sparsifies the model from those arguments, adds :class:`~bimask_hf.callback.BiMaskCallback` (which
does the per-step work in any Trainer) ahead of the ``report_to`` trackers, reports top-1/top-5 accuracy by
default, and saves a Hub-ready folder (exact N:M weights, ``bimask_config.json``, model card). Image-classification
training (mixup, no decay on norms, seeded augmentation) comes from
:class:`~bimask_hf.image_classification.ImageClassificationTrainer`.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from accelerate.utils import extract_model_from_parallel
from transformers import TrainingArguments
from transformers.trainer_utils import number_of_arguments

from .callback import BiMaskCallback, check_config_agrees
from .checks import check_resume, save_checkpoint_config
from .compat import CheckpointKeysMixin
from .config import ARGUMENT_FIELDS, BiMaskConfig, BiMaskConfigArguments
from .distributed import (
    PerRankStreamMixin,
    check_setup,
    describe_setup,
    enable_cpu_fsdp,
    gather_full_model,
    meta_copy,
    unsupported_setup_reason,
)
from .hub import save_sparse_model
from .image_classification import ImageClassificationTrainer, soft_target_cross_entropy
from .lora import is_peft_model
from .metrics import compute_topk_metrics, topk_indices
from .patching import sparse_layers, sparsify
from .storage import check_writable, last_complete_checkpoint, storage_errors

logger = logging.getLogger(__name__)

__all__ = ["BiMaskTrainer", "BiMaskTrainingArguments", "BiMaskCallback", "parse_module_list",
           "soft_target_cross_entropy", "unsupported_setup_reason"]


def parse_module_list(value: str | list[str] | None) -> str | list[str] | None:
    """The command-line form of target/exclude patterns as ``BiMaskConfig`` takes them.

    Args:
        value: ``"re:<regex>"`` (a regex), a comma-separated name list, a list, or None.

    Returns:
        The regex string, the list of names, or None for an empty value.
    """
    if value is None or isinstance(value, list):
        return value
    value = value.strip()
    if not value:
        return None
    if value.startswith("re:"):
        return value[3:]
    return [v.strip() for v in value.split(",") if v.strip()]


@dataclass
class BiMaskTrainingArguments(TrainingArguments, BiMaskConfigArguments):
    """`TrainingArguments` plus every `BiMaskConfig` field (declared once, in `BiMaskConfig`).

    The N:M fields (``n``, ``m``, ``mode``, ``decay``, ``permutation_interval``, ...) come from
    :class:`~bimask_hf.config.BiMaskConfigArguments`, with the paper scripts' flags as aliases
    (``--N --M --mask_mode --iter --greedy_num --random_mask_ratio --nm_layers``); the Trainer's ``seed``
    also seeds the permutation search.
    """

    exclude_norm_from_weight_decay: bool = field(
        default=True, metadata={"help": "No weight decay on normalisation layers and biases."}
    )
    lora_r: int | None = field(
        default=None,
        metadata={"help": "Fine-tune with LoRA of this rank (bimask_hf.get_peft_model: sparse layers keep their "
                  "N:M masks fixed, adapters are never sparsified). Needs peft."},
    )
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default: 2 x lora_r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={"help": "LoRA targets: comma-separated module names/suffixes, or 're:<regex>' (required with "
                  "--lora_r)."},
    )
    merge_lora: bool = field(
        default=False,
        metadata={"help": "With LoRA, save_model also writes the merged, exactly N:M model to <output_dir>/merged."},
    )

    def __post_init__(self) -> None:
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = False  # every parameter gets a gradient; skip DDP's extra graph walk
        if not self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
            # `accelerate launch` of a multi-process config (recipes/accelerate/cpu_2proc.yaml) on a machine
            # without GPUs does not pass the config's use_cpu to its processes: without this they would
            # run as independent single-process trainings racing on output_dir, instead of DDP on gloo.
            self.use_cpu = True
        super().__post_init__()
        self.target_modules = parse_module_list(self.target_modules)  # type: ignore[assignment]
        self.exclude_modules = parse_module_list(self.exclude_modules)  # type: ignore[assignment]
        self.bimask_config = self.to_bimask_config()  # validates early, with BiMaskConfig's messages

    def to_bimask_config(self) -> BiMaskConfig:
        """The `BiMaskConfig` these arguments describe.

        Returns:
            The config, with the Trainer's ``seed`` as the search's seed.
        """
        return BiMaskConfig(**{name: getattr(self, name) for name in ARGUMENT_FIELDS}, seed=self.seed)


def _enum_value(value: Any) -> Any:
    """``sgd`` rather than ``OptimizerNames.SGD`` in cards and logs."""
    return getattr(value, "value", value)


def _requested_config(model: Any, args: Any, bimask_config: BiMaskConfig | None) -> BiMaskConfig:
    """The config a ``BiMaskTrainer`` trains ``model`` with.

    A model that is already sparsified keeps its N:M, mode and layers: an explicit ``bimask_config``, or
    arguments, that set them to other values are an error naming both (``n=1`` for a 2:4 model is not a
    silent 2:4 run); training settings they set (decay, permutation interval and search) apply.
    """
    if not sparse_layers(model):
        return bimask_config or getattr(args, "bimask_config", None) or BiMaskConfig(seed=getattr(args, "seed", 0))
    if bimask_config is not None:
        return check_config_agrees(model, bimask_config, "BiMaskTrainer(bimask_config=...)")
    # The Trainer's own --seed is not a setting of the model: it seeds the search only of a model sparsified here.
    return check_config_agrees(model, getattr(args, "bimask_config", None), "the training arguments",
                               fields=ARGUMENT_FIELDS)


class BiMaskTrainer(CheckpointKeysMixin, PerRankStreamMixin, ImageClassificationTrainer):
    """`transformers.Trainer` for N:M sparse training with Bi-directional Masks.

    Intermediate checkpoints keep the dense weights and permutations, so a resumed run continues exactly;
    ``save_model`` writes a Hub-ready folder (pruned weights exactly zero, ``bimask_config.json``, model card).

    Args:
        model: A timm or transformers model, sparsified here unless it already is (then its config must agree
            with ``bimask_config`` and the arguments), or a ``bimask_hf.get_peft_model`` LoRA model.
        args: ``BiMaskTrainingArguments`` (or plain ``TrainingArguments``: default 2:4 Bi-Mask).
        *trainer_args: The Trainer's other positional arguments.
        bimask_config: The settings (default: those of the model, else of ``args``).
        mixup_fn: A ``timm.data.Mixup`` applied to training batches.
        card_info: Extra model-card fields (``datasets``, ``base_model``, ``training_args`` ...).
        data_config: The ``data_config`` of :func:`load_image_classification_data`: the preprocessing the saved
            folder records for pipelines and ``bimask-eval``.
        **kwargs: The Trainer's keyword arguments. Evaluation reports top-1/top-5 accuracy unless
            ``compute_metrics`` is given.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        *trainer_args: Any,
        bimask_config: BiMaskConfig | None = None,
        mixup_fn: Any = None,
        card_info: dict[str, Any] | None = None,
        data_config: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None and kwargs.get("model_init") is not None:
            model_init = kwargs["model_init"]
            config = bimask_config or getattr(args, "bimask_config", None) or BiMaskConfig(
                seed=args.seed if args is not None else 0)

            def sparse_model_init(trial: Any = None) -> nn.Module:  # hyper-parameter search builds models anew
                # The Trainer's own convention: a model_init with one argument gets the trial.
                return sparsify(model_init(trial) if number_of_arguments(model_init) else model_init(), config)

            kwargs["model_init"] = sparse_model_init
            bimask_config = config
        self.is_lora = is_peft_model(model)
        if self.is_lora:  # fixed-mask fine-tuning: never sparsify (the adapters least of all), never refresh
            base = model.get_base_model()
            if sparse_layers(base):
                raise ValueError(
                    "This PeftModel wraps Bi-Mask layers with plain LoRA, whose merge is dense. Build it with "
                    "bimask_hf.get_peft_model(model, lora_config), which keeps the N:M masks fixed."
                )
            bimask_config = (getattr(base, "bimask_config", None) or bimask_config
                             or getattr(args, "bimask_config", None) or BiMaskConfig())
        elif model is not None:
            bimask_config = _requested_config(model, args, bimask_config)
            sparsify(model, bimask_config)  # unchanged when it already is
        self.bimask_config = bimask_config
        self.card_info = dict(card_info or {})
        self.data_config = dict(data_config) if data_config is not None else None
        if kwargs.get("compute_metrics") is None:
            kwargs["compute_metrics"] = compute_topk_metrics
            kwargs.setdefault("preprocess_logits_for_metrics", topk_indices)
        self.bimask_callback = BiMaskCallback(
            config=bimask_config,
            setup=lambda: describe_setup(self.accelerator), fixed_masks=self.is_lora,
            reload_checkpoints=False,  # CheckpointKeysMixin loads them by name in the first place
        )
        super().__init__(model, args, *trainer_args, mixup_fn=mixup_fn, **kwargs)
        check_setup(self.accelerator, fsdp=self.is_fsdp_enabled, deepspeed=self.is_deepspeed_enabled)
        self._export_template: nn.Module | None = None
        if self.is_fsdp_enabled and self.model is not None:
            # The final save needs a plain module to load the gathered weights into; the sharded one
            # cannot be deep-copied. A copy with meta tensors costs no memory.
            self._export_template = meta_copy(self.model)
        BiMaskCallback.add_to(self, self.bimask_callback)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """The Trainer's ``train``, after checks.

        Args:
            resume_from_checkpoint: A checkpoint folder; ``True`` (or ``"true"``/``"last"``) resumes from the
                newest *complete* checkpoint and logs which one (and why newer ones were skipped).
            *args: The Trainer's other arguments.
            **kwargs: The Trainer's other keyword arguments.

        Returns:
            The Trainer's ``TrainOutput``.

        Raises:
            ValueError: ``resume_from_checkpoint=True`` but there is no complete checkpoint.
            StorageError: The output folder is not writable, or a checkpoint save ran out of space.
        """
        if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.lower() in ("true", "last", "yes", "1"):
            resume_from_checkpoint = True
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"resume_from_checkpoint=True, but {self.args.output_dir!r} holds no complete checkpoint-N "
                    "folder to resume from; start without it, or pass a checkpoint folder."
                )
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            check_resume(resume_from_checkpoint, self.bimask_config)  # before any weight or state is loaded
        if self.args.should_save:
            check_writable(self.args.output_dir)  # a read-only or full output folder fails now, not after training
        try:
            with storage_errors(self.args.output_dir):  # disk full / read-only in a checkpoint save: one clear message
                return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:  # also when training fails: later saves of the model write the exact N:M folder
            self.bimask_callback.end_training()

    def create_accelerator_and_postprocess(self) -> None:
        """The Trainer's accelerator; a CPU run launched with an FSDP2 config really runs FSDP2."""
        super().create_accelerator_and_postprocess()
        if enable_cpu_fsdp(self.accelerator):
            self.is_fsdp_enabled = True

    # ---- saving --------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write a Hub-ready folder: pruned weights exactly zero, ``bimask_config.json``, model card.

        Checkpoints (the Trainer's internal calls) keep the dense weights and permutations instead, so a
        resumed run continues exactly.

        Args:
            output_dir: The folder (default: ``args.output_dir``); pushed too with ``args.push_to_hub``.
            _internal_call: Set by the Trainer for checkpoints.
        """
        if _internal_call:
            super().save_model(output_dir, _internal_call=True)
            if self.args.should_save and output_dir is not None:
                save_checkpoint_config(output_dir, self.bimask_config)  # what a resumed run must agree with
            return None
        self._save_hub_folder(output_dir or self.args.output_dir)
        if self.args.push_to_hub:
            self._upload(commit_message="Model save", revision=self.args.hub_revision)

    def _save_hub_folder(self, output_dir: str) -> None:
        model = gather_full_model(self.model, self._export_template, self.args.should_save)  # every rank
        if not self.args.should_save or model is None:
            return
        if self.is_lora:
            self._save_lora(model, output_dir)
            return
        save_sparse_model(
            model, output_dir, config=self.bimask_config, card_data=self._card_data(),
            metrics=self.card_info.get("metrics"), data_config=self.data_config,
        )
        with storage_errors(output_dir):
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_lora(self, model: Any, output_dir: str) -> None:
        """Adapters (peft's ``save_pretrained``) and, with ``merge_lora``, the merged N:M model in ``merged/``."""
        model = extract_model_from_parallel(model)
        with storage_errors(output_dir):
            model.save_pretrained(output_dir)
        if not getattr(self.args, "merge_lora", False):
            return
        merged = copy.deepcopy(model).merge_and_unload()
        base = self.card_info.get("base_model") or getattr(merged, "name_or_path", None) or "the sparse base model"
        card = {**self._card_data(), "lora_from": base, "base_model": self.card_info.get("base_model")}
        save_sparse_model(
            merged, os.path.join(output_dir, "merged"), config=self.bimask_config, card_data=card,
            metrics=self.card_info.get("metrics"), data_config=self.data_config,
        )

    def push_to_hub(  # type: ignore[override]
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Write the Hub-ready folder (merged N:M weights, ``bimask_config.json``, model card) and upload it.

        Args:
            commit_message: The commit message.
            blocking: Wait for the upload to finish.
            token: A Hub token (default: ``args.hub_token``).
            revision: The branch to push to (default: ``args.hub_revision``).
            private: Create the repo private (when it does not exist yet).
            **kwargs: Accepted for the Trainer's signature; the card comes from ``hub_cards/``.

        Returns:
            The upload's ``CommitInfo`` (a future when not blocking); None on processes other than the main one.
        """
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        self._save_hub_folder(self.args.output_dir)
        return self._upload(commit_message, blocking=blocking, token=token, revision=revision)

    def _upload(self, commit_message: str | None, blocking: bool = True, token: str | None = None,
                revision: str | None = None) -> Any:
        if not self.is_world_process_zero():
            return None
        from huggingface_hub import upload_folder

        if self.hub_model_id is None:
            self.init_hf_repo(token=token or self.args.hub_token)
        if getattr(self, "push_in_progress", None) is not None and not self.push_in_progress.is_done():
            self.push_in_progress.wait_until_done()  # a checkpoint push still running: this one goes after it
        return upload_folder(
            repo_id=self.hub_model_id, folder_path=self.args.output_dir, commit_message=commit_message,
            token=token or self.args.hub_token, run_as_future=not blocking,
            ignore_patterns=["_*", "checkpoint-*", "runs/*"], revision=revision or self.args.hub_revision,
        )

    def _card_data(self) -> dict[str, Any]:
        from transformers.modelcard import parse_log_history

        args = self.args
        hyper = {
            "learning_rate": args.learning_rate, "train_batch_size": args.per_device_train_batch_size,
            "num_processes": args.world_size, "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "optimizer": _enum_value(args.optim), "optimizer_args": args.optim_args,
            "lr_scheduler_type": _enum_value(args.lr_scheduler_type),
            "num_epochs": args.num_train_epochs, "max_steps": args.max_steps, "weight_decay": args.weight_decay,
            "label_smoothing_factor": args.label_smoothing_factor, "seed": args.seed,
            # What the accelerator ran with (a launcher config or env var can set it, not only --bf16/--fp16).
            "mixed_precision": _enum_value(self.accelerator.mixed_precision),
            "global_steps": self.state.global_step,
        }
        info = {k: v for k, v in self.card_info.items() if k != "metrics"}
        repo_id = self.hub_model_id or args.hub_model_id  # the pushed repo, or the one asked for
        if repo_id and "repo_id" not in info:
            info["repo_id"] = repo_id
        _, training_results, _ = parse_log_history(self.state.log_history)
        if training_results and "training_results" not in info:
            info["training_results"] = training_results
        return {**info, "training_args": {**hyper, **self.card_info.get("training_args", {})}}

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """The Trainer's ``evaluate``; its top-1 / top-5 also go into the model card ``save_model`` writes.

        The card names the dataset ``card_info["datasets"][0]``, else the eval dataset's own name, else an
        unnamed dataset, and its split.

        Args:
            *args: The Trainer's ``evaluate`` arguments.
            **kwargs: The Trainer's ``evaluate`` keyword arguments.

        Returns:
            The metrics.
        """
        metrics = super().evaluate(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[2] if len(args) > 2 else "eval")
        top1, top5 = metrics.get(f"{prefix}_top1"), metrics.get(f"{prefix}_top5")
        if top1 is not None:
            eval_dataset = kwargs.get("eval_dataset", args[0] if args else None) or self.eval_dataset
            named = self.card_info.get("datasets") or []
            named = [named] if isinstance(named, str) else list(named)
            info = getattr(eval_dataset, "info", None)
            dataset = named[0] if named else getattr(info, "dataset_name", None)  # None: an unnamed dataset
            split = getattr(eval_dataset, "split", None)
            self.card_info["metrics"] = {"top1": top1, "top5": top5, "dataset": dataset,
                                         "split": str(split) if split is not None else prefix}
        return metrics

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """The model card is written by :meth:`save_model` from ``hub_cards/``; nothing else to do."""
        return None
