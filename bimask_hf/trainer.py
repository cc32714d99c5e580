"""`BiMaskTrainer`: the HF Trainer with Bi-Mask N:M sparse training built in.

One `BiMaskTrainingArguments` dataclass carries the Trainer's flags and the `BiMaskConfig` fields, so
`HfArgumentParser` reads a single command line. The trainer sparsifies the model (unless it already
is), and a callback does the per-step work: permutation refreshes every ``permutation_interval``
optimizer steps (identically seeded on every rank), the in-place projection of ``post`` mode, and
sparsity metrics in the Trainer's logs for every ``report_to`` tracker.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from timm.loss import SoftTargetCrossEntropy
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import number_of_arguments

from .checks import check_resume, save_checkpoint_config, stop_if_diverged
from .config import ARGUMENT_FIELDS, BiMaskConfig, BiMaskConfigArguments
from .distributed import UnsupportedSetupError, describe_setup, enable_cpu_fsdp, is_sharded
from .errors import CorruptCheckpointError
from .lora import is_peft_model
from .metrics import compute_topk_metrics, topk_indices
from .patching import project_, refresh_permutations, report, sparse_layers, sparsify, training_state
from .storage import check_writable, last_complete_checkpoint, storage_errors

logger = logging.getLogger(__name__)

__all__ = ["BiMaskTrainer", "BiMaskTrainingArguments", "BiMaskCallback", "parse_module_list"]

_SOFT_TARGET_LOSS = SoftTargetCrossEntropy()
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def parse_module_list(value: str | list[str] | None) -> str | list[str] | None:
    """CLI form of target/exclude patterns: ``"re:<regex>"`` is a regex, else a comma-separated name list."""
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
        """The `BiMaskConfig` these arguments describe."""
        return BiMaskConfig(**{name: getattr(self, name) for name in ARGUMENT_FIELDS}, seed=self.seed)


class BiMaskCallback(TrainerCallback):
    """Per-step Bi-Mask work: permutation refresh, ``post`` projection, pending log metrics.

    ``setup`` returns the distributed setup named in the run header (e.g. ``"FSDP2 x2 (cpu)"``).
    """

    def __init__(
        self, model: nn.Module, config: BiMaskConfig, print_report: bool = True, setup: Callable[[], str] | None = None,
        fixed_masks: bool = False,
    ) -> None:
        self.model = model
        self.config = config
        self.print_report = print_report
        self.fixed_masks = fixed_masks  # LoRA fine-tuning: masks are fixed, nothing to refresh or project
        self.setup = setup
        self.search_seconds = 0.0
        self.examples: Any = None  # the trainer's SeededExamples: told each epoch which one it is

    def _refresh(self, step: int, progress: bool | None = False) -> None:
        stats = refresh_permutations(self.model, step=step, progress=progress)
        self.search_seconds += stats["seconds"]

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if kwargs.get("model") is not None:
            # The model the Trainer trains: with ``model_init`` it is built anew in ``train()``.
            self.model = kwargs["model"]
        # Checkpoints written while training (any Trainer's save_pretrained) keep the dense weights and
        # permutations a resumed run needs; after training, save_pretrained publishes the N:M folder.
        self._training_state = contextlib.ExitStack()
        self._training_state.enter_context(training_state(self.model))
        if self.fixed_masks:
            if state.is_world_process_zero:
                print(f"bimask-hf: LoRA fine-tuning of a {self.config.pattern} sparse model, N:M masks fixed")
            return
        if state.global_step == 0 and self.config.mode == "bimask":
            # a resumed run keeps the permutations its checkpoint holds; the first search of a large model
            # takes minutes: a bar, as the Trainer's own (the later, incremental ones run without)
            self._refresh(0, progress=False if args.disable_tqdm else None)
        if self.print_report:
            table = report(self.model)  # a collective under FSDP2 (masks of gathered weights): every rank
            if state.is_world_process_zero:
                setup = f", {self.setup()}" if self.setup is not None else ""
                print(f"bimask-hf: {self.config.pattern} sparse training, mode={self.config.mode}{setup}\n{table}")

    def on_epoch_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.examples is not None:  # before the epoch's data loader starts (and forks its workers)
            self.examples.set_epoch(int(state.epoch or 0))

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        # ``pre`` prunes the parameter inside forward; under FSDP2 that is the gathered copy, which is
        # dropped after the forward pass, so the shards are pruned here (same effect: before the step).
        if self.config.mode == "pre" and any(is_sharded(layer.weight) for layer in sparse_layers(self.model).values()):
            project_(self.model)

    def on_optimizer_step(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.config.mode == "post" and not self.fixed_masks:
            project_(self.model)

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        stop_if_diverged(self.model, state.global_step)  # before NaN weights reach the masks and the logs
        if (self.config.mode == "bimask" and not self.fixed_masks
                and state.global_step % self.config.permutation_interval == 0):
            self._refresh(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        stack = getattr(self, "_training_state", None)
        if stack is not None:
            stack.close()

    def sparsity_logs(self) -> dict[str, float]:
        """``sparsity/*`` metrics of the current masks; resets the accumulated search time."""
        if not sparse_layers(self.model):
            return {}
        logs = report(self.model).stats.to_logs()
        logs["sparsity/permutation_search_seconds"] = self.search_seconds
        self.search_seconds = 0.0
        return logs


def _enum_value(value: Any) -> Any:
    """``sgd`` rather than ``OptimizerNames.SGD`` in cards and logs."""
    return getattr(value, "value", value)


def unsupported_setup_reason(fsdp_version: int | None = None, zero_stage: int | None = None) -> str | None:
    """Why Bi-Mask training cannot run under this setup, or None if it can.

    FSDP1 flattens parameters into 1-D shards, so outside a forward pass no module holds its weight
    and masks would be taken per shard; DeepSpeed ZeRO-3 partitions parameters the same way. FSDP2
    keeps one ``DTensor`` per parameter, which the layers gather (see ``bimask_hf.distributed``).
    """
    if fsdp_version is not None and fsdp_version != 2:
        return (
            f"FSDP version {fsdp_version} is not supported by Bi-Mask layers (it flattens weights into 1-D "
            "shards, so N:M masks would be computed per shard). Use FSDP2: fsdp_version: 2 in the accelerate "
            "config (recipes/accelerate/fsdp.yaml), or DDP."
        )
    if zero_stage == 3:
        return (
            "DeepSpeed ZeRO-3 is not supported by Bi-Mask layers (it partitions weights, so N:M masks would be "
            "computed on partitions). Use FSDP2 (recipes/accelerate/fsdp.yaml), which shards parameters and "
            "optimizer state too, or ZeRO-1/2."
        )
    return None


def _split_per_rank(dataset: Any, world_size: int) -> bool:
    """Whether ``dataset`` is a streamed dataset that ``split_dataset_by_node`` cut for ``world_size`` ranks."""
    import datasets

    distributed = getattr(dataset, "_distributed", None)
    return (
        world_size > 1 and isinstance(dataset, datasets.IterableDataset) and distributed is not None
        and distributed.world_size == world_size
    )


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and persistent buffers are on the meta device.

    Non-persistent buffers (not in a state dict) are copied for real, so loading a full state dict
    with ``assign=True`` makes the copy complete.
    """
    memo: dict[int, Any] = {}
    for tensor in model.state_dict(keep_vars=True).values():
        meta = torch.empty_like(tensor, device="meta")
        if isinstance(tensor, nn.Parameter):
            meta = nn.Parameter(meta, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = meta
    return copy.deepcopy(model, memo)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with soft (mixup/cutmix) targets: timm's ``SoftTargetCrossEntropy``, in float32."""
    return _SOFT_TARGET_LOSS(logits.float(), targets)


class BiMaskTrainer(Trainer):
    """`transformers.Trainer` for N:M sparse training with Bi-directional Masks.

    Takes the Trainer's arguments plus ``bimask_config`` (defaults to the one in
    ``BiMaskTrainingArguments``) and ``mixup_fn`` (a ``timm.data.Mixup`` applied to training batches).
    Evaluation reports top-1/top-5 accuracy unless ``compute_metrics`` is given. ``data_config`` (the
    ``data_config`` of :func:`load_image_classification_data`) is the preprocessing the saved folder records
    for pipelines and ``bimask-eval``. ``save_model`` writes a
    Hub-ready folder (pruned weights exactly zero, ``bimask_config.json``, model card); intermediate
    checkpoints keep the dense weights and permutations so a resumed run continues exactly.
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
        if bimask_config is None:
            bimask_config = getattr(model, "bimask_config", None) or getattr(args, "bimask_config", None)
        if bimask_config is None:
            bimask_config = BiMaskConfig(seed=args.seed if args is not None else 0)
        if model is None and kwargs.get("model_init") is not None:
            model_init, config = kwargs["model_init"], bimask_config

            def sparse_model_init(trial: Any = None) -> nn.Module:  # hyper-parameter search builds models anew
                # The Trainer's own convention: a model_init with one argument gets the trial.
                return sparsify(model_init(trial) if number_of_arguments(model_init) else model_init(), config)

            kwargs["model_init"] = sparse_model_init
        self.is_lora = is_peft_model(model)
        if self.is_lora:  # fixed-mask fine-tuning: never sparsify (the adapters least of all), never refresh
            base = model.get_base_model()
            if sparse_layers(base):
                raise ValueError(
                    "This PeftModel wraps Bi-Mask layers with plain LoRA, whose merge is dense. Build it with "
                    "bimask_hf.get_peft_model(model, lora_config), which keeps the N:M masks fixed."
                )
            bimask_config = getattr(base, "bimask_config", None) or bimask_config
        elif model is not None and not sparse_layers(model):
            sparsify(model, bimask_config)
        elif model is not None:
            bimask_config = getattr(model, "bimask_config", bimask_config)
        self.bimask_config = bimask_config
        self.mixup_fn = mixup_fn
        self.card_info = dict(card_info or {})
        self.data_config = dict(data_config) if data_config is not None else None
        if kwargs.get("compute_metrics") is None:
            kwargs["compute_metrics"] = compute_topk_metrics
            kwargs.setdefault("preprocess_logits_for_metrics", topk_indices)
        super().__init__(model, args, *trainer_args, **kwargs)
        self._check_setup()
        self._export_template: nn.Module | None = None
        if self.is_fsdp_enabled and self.model is not None:
            # The final save needs a plain module to load the gathered weights into; the sharded one
            # cannot be deep-copied. A copy with meta tensors costs no memory.
            self._export_template = _meta_copy(self.model)
        self.bimask_callback = BiMaskCallback(
            self.model, bimask_config, setup=lambda: describe_setup(self.accelerator), fixed_masks=self.is_lora
        )
        self.add_callback(self.bimask_callback)
        self._check_datasets()

    # ---- checks before training ----------------------------------------------------------------
    def _check_datasets(self) -> None:
        """Empty train / eval sets and eval sets without labels fail here, with the fix, not mid-run."""
        evals = self.eval_dataset if isinstance(self.eval_dataset, dict) else {"": self.eval_dataset}
        for name, dataset in [("train", self.train_dataset)] + [(f"eval{' ' + k if k else ''}", v) for k, v in evals.items()]:
            if dataset is None:
                continue
            if hasattr(dataset, "__len__") and len(dataset) == 0:
                raise ValueError(
                    f"The {name} set is empty: check the split name and --max_{name.split()[0]}_samples "
                    "(or the dataset's folder)."
                )
            columns = getattr(dataset, "column_names", None)
            labels = self.label_names or ["labels"]
            if name != "train" and isinstance(columns, list) and not set(labels) & set(columns):
                raise ValueError(
                    f"The {name} set has no {labels[0]!r} column (columns: {columns}), so no accuracy can be "
                    "computed: rename its label column to 'labels' (load_image_classification_data(label_column=...) "
                    "does) or pass no eval set."
                )

    def _check_channels(self) -> None:
        """1-channel images into a 3-channel model (or the reverse) fail before the first step."""
        dataset = self.train_dataset
        if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__") or not len(dataset):
            return
        try:
            example = dataset[0]
        except Exception:  # noqa: BLE001 - an unusual dataset: the Trainer reports its own errors
            return
        pixels = example.get("pixel_values") if isinstance(example, dict) else None
        conv = next((m for m in self.model.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is None or not isinstance(pixels, torch.Tensor) or pixels.ndim != 3:
            return
        if pixels.shape[0] != conv.in_channels:
            raise ValueError(
                f"The training images have {pixels.shape[0]} channel(s) but the model's first convolution takes "
                f"{conv.in_channels}: load the data with in_chans={conv.in_channels} (bimask-train --in_chans "
                f"{conv.in_channels}; grayscale is replicated to RGB) or build the model with in_chans={pixels.shape[0]}."
            )

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """The Trainer's ``train``, after checks; ``resume_from_checkpoint=True`` (or ``"true"``/``"last"``)
        resumes from the newest *complete* checkpoint and logs which one (and why newer ones were skipped)."""
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
        self._check_channels()
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ---- loading checkpoints -------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """The Trainer's loader, except that a transformers model's weights are matched by name first.

        transformers 5 saves some models (ViT, ...) under their original checkpoint key names
        (``vit.encoder.layer.0.attention.attention.query``), which differ from the module names
        (``vit.layers.0.attention.q_proj``); the Trainer's non-strict ``load_state_dict`` would then skip
        them silently and a resumed run would restart from its initial weights and permutations.
        """
        if not self._load_pretrained_weights(resume_from_checkpoint, model if model is not None else self.model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``, with the key matching of :meth:`_load_from_checkpoint`."""
        best = self.state.best_model_checkpoint
        if best is None or not self._load_pretrained_weights(best, self.model):
            super()._load_best_model()
        else:
            logger.info("Loaded the best model from %s (score: %s).", best, self.state.best_metric)

    def _load_pretrained_weights(self, folder: str, model: Any) -> bool:
        """Load a transformers model's ``model.safetensors`` (or its shards) from ``folder`` under the live
        key names; False when the Trainer's own loader applies (timm, peft, FSDP, DeepSpeed, other files)."""
        from safetensors.torch import load_file
        from transformers import PreTrainedModel

        from .hub.files import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, weight_files

        plain = extract_model_from_parallel(model)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or not isinstance(plain, PreTrainedModel):
            return False
        if not any(os.path.isfile(os.path.join(folder, name)) for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)):
            return False
        state: dict[str, torch.Tensor] = {}
        for name in weight_files(folder):  # the single file or every shard of the index
            state.update(load_file(os.path.join(folder, name), device="cpu"))
        live = plain.state_dict()
        names = _live_key_names(plain, live)
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

    def get_train_dataloader(self) -> Any:
        """The Trainer's train loader; a map-style train set is read through
        :class:`~bimask_hf.data.seeding.SeededExamples`, so the augmentation of an example depends on the
        seed, the epoch and its index only: a resumed run draws the same crops as the run it continues."""
        import datasets

        from .data.seeding import SeededExamples

        dataset = original = self.train_dataset
        if (dataset is None or isinstance(dataset, (torch.utils.data.IterableDataset, datasets.IterableDataset))
                or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__")
                or self.args.dataloader_persistent_workers):  # persistent workers would keep epoch 0's crops
            return super().get_train_dataloader()
        if isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="training")
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        self.bimask_callback.examples = SeededExamples(dataset, seed)
        self.train_dataset = self.bimask_callback.examples
        try:
            return super().get_train_dataloader()
        finally:
            self.train_dataset = original

    def _save_checkpoint(self, model, trial):  # type: ignore[no-untyped-def]
        # training_state: the checkpoint keeps the dense weights and permutations that resuming needs
        # (outside it, the model's save_pretrained writes the merged N:M weights of a published model).
        with storage_errors(self.args.output_dir), training_state(self.model):  # disk full: one clear message
            return super()._save_checkpoint(model, trial)

    def evaluation_loop(self, dataloader: Any, description: str, prediction_loss_only: bool | None = None,
                        *args: Any, **kwargs: Any) -> Any:
        """The Trainer's loop; an evaluation whose batches carry no labels is an error (the Trainer would
        silently report no accuracy), e.g. a streamed or plain torch eval set without a ``labels`` field.
        ``predict`` on unlabeled data stays allowed."""
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, *args, **kwargs)
        loss_only = self.args.prediction_loss_only if prediction_loss_only is None else prediction_loss_only
        if (description == "Evaluation" and not loss_only and self.compute_metrics is not None
                and output.label_ids is None and output.num_samples):
            labels = self.label_names or ["labels"]
            raise ValueError(
                f"The eval set's batches have no {labels[0]!r} field, so no accuracy can be computed: give its "
                "examples a 'labels' entry (load_image_classification_data(label_column=...) does) or pass no "
                "eval set. Use trainer.predict() for unlabeled data."
            )
        return output

    def create_accelerator_and_postprocess(self) -> None:
        """The Trainer's accelerator; a CPU run launched with an FSDP2 config really runs FSDP2."""
        super().create_accelerator_and_postprocess()
        if enable_cpu_fsdp(self.accelerator):
            self.is_fsdp_enabled = True

    def _check_setup(self) -> None:
        state = self.accelerator.state
        plugin = getattr(state, "fsdp_plugin", None)
        ds_plugin = getattr(state, "deepspeed_plugin", None)
        reason = unsupported_setup_reason(
            fsdp_version=getattr(plugin, "fsdp_version", 1) if self.is_fsdp_enabled else None,
            zero_stage=getattr(ds_plugin, "zero_stage", None) if self.is_deepspeed_enabled else None,
        )
        if reason:
            raise UnsupportedSetupError(reason)

    # ---- data ----------------------------------------------------------------------------------
    def _get_dataloader(self, dataset, description, batch_size, sampler_fn=None, is_training=False,  # type: ignore[no-untyped-def]
                        dataloader_key=None):
        """A streamed dataset already split per rank (``split_dataset_by_node``) is read as it is on each rank.

        Accelerate would otherwise split it a second time (or read it on rank 0 and dispatch batches).
        """
        if not _split_per_rank(dataset, self.args.world_size):
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn=sampler_fn,
                                           is_training=is_training, dataloader_key=dataloader_key)
        from accelerate.data_loader import prepare_data_loader
        from torch.utils.data import DataLoader

        loader = DataLoader(
            dataset, batch_size=batch_size, num_workers=self.args.dataloader_num_workers,
            collate_fn=self._get_collator_with_removed_columns(self.data_collator, description=description),
            pin_memory=self.args.dataloader_pin_memory, persistent_workers=self.args.dataloader_persistent_workers,
            prefetch_factor=self.args.dataloader_prefetch_factor,
        )
        prepared = prepare_data_loader(
            loader, self.accelerator.device, num_processes=1, process_index=0, put_on_device=True,
            dispatch_batches=False, non_blocking=self.accelerator.non_blocking,
        )
        self.accelerator._dataloaders.append(prepared)  # as Accelerator.prepare records it
        return prepared

    # ---- loss --------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        """Adds mixup/cutmix with soft-target cross-entropy; otherwise the Trainer's loss (label smoothing too)."""
        if self.mixup_fn is not None and model.training and "labels" in inputs:
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            pixel_values = inputs.pop("pixel_values")
            if pixel_values.shape[0] % 2 == 0:
                pixel_values, soft = self.mixup_fn(pixel_values, labels)
            else:  # timm's Mixup needs an even batch; use one-hot targets for an odd one
                soft = F.one_hot(labels, self.model.config.num_labels).float()
            outputs = model(pixel_values=pixel_values, **inputs)
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
            loss = soft_target_cross_entropy(logits, soft.to(logits.device))
            return (loss, outputs) if return_outputs else loss
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    # ---- optimizer -----------------------------------------------------------------------------
    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Exclude every normalisation layer (BatchNorm too, not only LayerNorm) and biases from weight decay."""
        names = super().get_decay_parameter_names(model)
        if not getattr(self.args, "exclude_norm_from_weight_decay", True):
            return names
        norm_params = {
            f"{mod_name}.{p}" if mod_name else p
            for mod_name, mod in model.named_modules()
            if isinstance(mod, _NORM_TYPES)
            for p, _ in mod.named_parameters(recurse=False)
        }
        return [n for n in names if n not in norm_params and not n.endswith(".bias")]

    # ---- logging -------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:  # type: ignore[override]
        """Adds ``sparsity/sparse_density``, ``sparsity/model_density``, ``sparsity/retention_mean|min`` and the search time to training logs."""
        if any(k in logs for k in ("loss", "train_loss")):
            logs = {**logs, **self.bimask_callback.sparsity_logs()}
        super().log(logs, start_time)

    # ---- saving --------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints (internal calls) keep dense weights and permutations for exact resumption; a final
        ``save_model`` writes a Hub-ready folder with pruned weights exactly zero and a model card."""
        if _internal_call:
            super().save_model(output_dir, _internal_call=True)
            if self.args.should_save and output_dir is not None:
                save_checkpoint_config(output_dir, self.bimask_config)  # what a resumed run must agree with
            return None
        self._save_hub_folder(output_dir or self.args.output_dir)
        if self.args.push_to_hub:
            self._upload(commit_message="Model save", revision=self.args.hub_revision)

    def _export_model(self) -> nn.Module | None:
        """The model to save: under FSDP2 the gathered full weights in a plain copy (collective; main only)."""
        if self._export_template is None:
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.fsdp import FSDPModule

        units = [module for module in self.model.modules() if isinstance(module, FSDPModule)]
        if not units:  # not wrapped (yet): a plain module
            return self.model
        for unit in units:  # an evaluation leaves the root unit gathered; the state dict wants the shards
            unit.reshard()

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.args.should_save:
            return None
        self._export_template.load_state_dict(state, assign=True)
        return self._export_template

    def _save_hub_folder(self, output_dir: str) -> None:
        model = self._export_model()  # every rank takes part in the gather
        if not self.args.should_save or model is None:
            return
        from .hub import save_sparse_model

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
        from .hub import save_sparse_model

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
        """Write the Hub-ready folder (merged N:M weights, ``bimask_config.json``, model card) and upload it."""
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
        self._finish_current_push()
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
        """The Trainer's ``evaluate``; its top-1 / top-5 also go into the model card that ``save_model`` writes
        (on the dataset ``card_info["datasets"][0]``, else the eval dataset's own name, else as an unnamed
        dataset, and its split)."""
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


def _live_key_names(model: Any, live: dict[str, torch.Tensor]) -> dict[str, str]:
    """Saved key -> module key of a transformers model, for the keys ``save_pretrained`` renames.

    transformers reverses its load-time renamings when it saves; applying that reversal to the live
    state dict maps every saved name to the tensor (hence the module key) it came from.
    """
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without load-time conversions saves module names
        return {}
    by_tensor = {id(tensor): key for key, tensor in live.items()}
    saved = revert_weight_conversion(model, dict(live))
    return {name: by_tensor[id(tensor)] for name, tensor in saved.items() if id(tensor) in by_tensor}
