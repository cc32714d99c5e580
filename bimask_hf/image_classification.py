"""Image-classification training on the HF Trainer, independent of sparsity.

:class:`ImageClassificationTrainer` adds to `transformers.Trainer` what training an image classifier from
scratch needs: mixup/cutmix with a soft-target loss, no weight decay on normalisation layers and biases,
augmentation seeded by (seed, epoch, example) so a resumed run draws the same crops, and checks that fail
before the first step (empty sets, eval sets without labels, images with the wrong number of channels).
``BiMaskTrainer`` builds on it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from transformers import Trainer, TrainerCallback

from .data.seeding import SeededExamples

__all__ = ["ImageClassificationTrainer", "SeededEpochCallback", "soft_target_cross_entropy"]

_SOFT_TARGET_LOSS = SoftTargetCrossEntropy()
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with soft (mixup/cutmix) targets: timm's ``SoftTargetCrossEntropy``, in float32.

    Args:
        logits: ``(batch, classes)`` scores, any float dtype.
        targets: ``(batch, classes)`` target distributions.

    Returns:
        The mean loss, in float32.
    """
    return _SOFT_TARGET_LOSS(logits.float(), targets)


class SeededEpochCallback(TrainerCallback):
    """Tells the :class:`~bimask_hf.data.seeding.SeededExamples` of a run which epoch starts."""

    def __init__(self) -> None:
        self.examples: SeededExamples | None = None

    def on_epoch_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        """Set the epoch of the run's :class:`SeededExamples`, before the epoch's data loader starts.

        The loader's workers fork when it starts, so they see the new epoch.

        Args:
            args (`TrainingArguments`): The run's arguments.
            state (`TrainerState`): The run's state; ``state.epoch`` is the epoch starting.
            control (`TrainerControl`): The Trainer's control flags (unchanged).
            **kwargs: The Trainer's other callback arguments.
        """
        if self.examples is not None:  # before the epoch's data loader starts (and forks its workers)
            self.examples.set_epoch(int(state.epoch or 0))


class ImageClassificationTrainer(Trainer):
    """`transformers.Trainer` for image classification: mixup/cutmix, no decay on norms, seeded augmentation.

    Args:
        *args: The Trainer's arguments.
        mixup_fn: A ``timm.data.Mixup`` applied to training batches (soft-target cross-entropy), or None.
        **kwargs: The Trainer's keyword arguments.
    """

    def __init__(self, *args: Any, mixup_fn: Any = None, **kwargs: Any) -> None:
        self.mixup_fn = mixup_fn
        super().__init__(*args, **kwargs)
        self.epoch_callback = SeededEpochCallback()
        self.add_callback(self.epoch_callback)
        self.check_datasets()

    # ---- checks before training ----------------------------------------------------------------
    def check_datasets(self) -> None:
        """Empty train / eval sets and eval sets without labels fail here, with the fix, not mid-run.

        Raises:
            ValueError: A set is empty, or an eval set has no label column.
        """
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

    def check_channels(self) -> None:
        """1-channel images into a 3-channel model (or the reverse) fail before the first step.

        Raises:
            ValueError: The first training image's channels differ from the model's first convolution's.
        """
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

    def train(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """The Trainer's ``train``, after :meth:`check_channels`.

        Args:
            *args: The Trainer's ``train`` arguments.
            **kwargs: The Trainer's ``train`` keyword arguments.

        Returns:
            `transformers.trainer_utils.TrainOutput`: What the Trainer's ``train`` returns.

        Raises:
            ValueError: If the training images' channels differ from the model's.
        """
        self.check_channels()
        return super().train(*args, **kwargs)

    def evaluation_loop(self, dataloader: Any, description: str, prediction_loss_only: bool | None = None,
                        *args: Any, **kwargs: Any) -> Any:
        """The Trainer's loop; an evaluation whose batches carry no labels is an error.

        The Trainer would silently report no accuracy, e.g. for a streamed or plain torch eval set without a
        ``labels`` field. ``predict`` on unlabeled data stays allowed.

        Args:
            dataloader (`torch.utils.data.DataLoader`): The batches.
            description (`str`): ``"Evaluation"`` or ``"Prediction"`` (the Trainer's).
            prediction_loss_only (`bool`, *optional*): As in the Trainer (default: the arguments').
            *args: The Trainer's other arguments.
            **kwargs: The Trainer's other keyword arguments.

        Returns:
            `transformers.trainer_utils.EvalLoopOutput`: The Trainer's output.

        Raises:
            ValueError: For an evaluation with metrics whose batches have no labels.
        """
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

    # ---- data ----------------------------------------------------------------------------------
    def get_train_dataloader(self) -> Any:
        """The Trainer's train loader, reading a map-style train set through :class:`SeededExamples`.

        The augmentation of an example then depends on the seed, the epoch and its index only: a resumed run
        draws the same crops as the run it continues. The Trainer removes unused columns in its collator.
        Streamed sets, and runs with persistent workers (which would keep epoch 0's crops), get the Trainer's
        own loader.

        Returns:
            `torch.utils.data.DataLoader`: The training loader.
        """
        import datasets

        dataset = original = self.train_dataset
        if (dataset is None or isinstance(dataset, (torch.utils.data.IterableDataset, datasets.IterableDataset))
                or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__")
                or self.args.dataloader_persistent_workers):  # persistent workers would keep epoch 0's crops
            return super().get_train_dataloader()
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        self.epoch_callback.examples = SeededExamples(dataset, seed)
        self.train_dataset = self.epoch_callback.examples
        try:
            return super().get_train_dataloader()
        finally:
            self.train_dataset = original

    # ---- loss --------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        """Mixup/cutmix with soft-target cross-entropy; otherwise the Trainer's loss (label smoothing too).

        An odd training batch, which timm's ``Mixup`` cannot mix, is trained on one-hot targets.

        Args:
            model (`nn.Module`): The model.
            inputs (`dict[str, torch.Tensor]`): The batch (``pixel_values``, ``labels``).
            return_outputs (`bool`, *optional*, defaults to `False`): Also return the model's outputs.
            num_items_in_batch (`int`, *optional*): As in the Trainer.

        Returns:
            `torch.Tensor` or `tuple`: The loss, or ``(loss, outputs)`` with ``return_outputs``.
        """
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
        """Exclude every normalisation layer (BatchNorm too, not only LayerNorm) and biases from weight decay.

        ``exclude_norm_from_weight_decay=False`` in the arguments keeps the Trainer's own choice.

        Args:
            model (`nn.Module`): The model.

        Returns:
            `list[str]`: Names of the parameters that get weight decay.
        """
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
