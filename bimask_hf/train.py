"""``bimask-train``: train a Bi-Mask N:M sparse model from a YAML recipe plus flag overrides.

    bimask-train recipes/cifar10_resnet32.yaml --n 1 --m 4 --output_dir runs/r32-1x4
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml -m bimask_hf.train recipes/imagenet_resnet50.yaml

Every flag of ``BiMaskTrainingArguments`` (the Trainer's own plus N:M, mode, search ...), of
:class:`ModelArguments` and of :class:`DataArguments` can be set in the YAML file or on the command
line (the command line wins). The paper scripts' flags (``--arch --data_path --job_dir --lr
--num_epochs --label_smoothing --N --M --iter --greedy_num --mask_mode --use_random_mask
--random_mask_ratio --nm_layers --wandb_project --wandb_name --resume --pretrain_dir``) are accepted.
It always trains, then evaluates and saves, unless ``--eval_only`` (or ``--do_train false``) asks to
evaluate the weights of ``--pretrained_path`` only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import yaml
from transformers import HfArgumentParser, enable_full_determinism, set_seed

logger = logging.getLogger(__name__)

# The paper scripts' flags, renamed to ours (flags with the same meaning and name need no entry).
SEED_FLAGS = {
    "--arch": "--model",
    "--data_path": "--dataset",
    "--job_dir": "--output_dir",
    "--lr": "--learning_rate",
    "--num_epochs": "--num_train_epochs",
    "--label_smoothing": "--label_smoothing_factor",
    "--resume": "--resume_from_checkpoint",
    "--wandb_name": "--run_name",
    "--pretrain_dir": "--pretrained_path",
}


@dataclass
class ModelArguments:
    """Which network to train."""

    model: str = field(
        default="resnet18",
        metadata={"help": "timm architecture (e.g. resnet50, deit_small_patch16_224, resnet32_cifar) or a "
                  "transformers model id / local folder."},
    )
    pretrained: bool = field(default=False, metadata={"help": "Start from the Hub's pretrained weights."})
    model_args: str | None = field(
        default=None,
        metadata={"help": "Extra keyword arguments of the timm model as JSON, e.g. '{\"base_width\": 16}' "
                  "(a mapping in YAML recipes)."},
    )
    pretrained_path: str | None = field(
        default=None,
        metadata={"help": "Start from the weights of a local folder or Hub id saved by bimask-hf or transformers "
                  "(the seed's --pretrain_dir)."},
    )


@dataclass
class DataArguments:
    """Which data, and how it is augmented."""

    dataset: str = field(
        default="fashion_mnist",
        metadata={"help": "cifar10 | cifar100 | imagenet-1k | fashion_mnist | digits | a Hub dataset id | a local "
                  "ImageFolder with train/ and val/ (the seed's --data_path)."},
    )
    recipe: str = field(default="default", metadata={"help": "Augmentation recipe: default | cifar | imagenet | deit."})
    streaming: bool | None = field(default=None, metadata={"help": "Stream the dataset (default: only ImageNet)."})
    image_size: int | None = field(default=None, metadata={"help": "Input resolution (default: the model's)."})
    in_chans: int = field(default=3, metadata={"help": "Input channels the model takes (grayscale is expanded)."})
    train_split: str | None = field(default=None, metadata={"help": "Training split name."})
    eval_split: str | None = field(default=None, metadata={"help": "Evaluation split name."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (auto-detected)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (auto-detected)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set."})
    mixup_alpha: float | None = field(default=None, metadata={"help": "Mixup alpha (deit recipe: 0.8)."})
    cutmix_alpha: float | None = field(default=None, metadata={"help": "CutMix alpha (deit recipe: 1.0)."})
    auto_augment: str | None = field(default=None, metadata={"help": "timm auto-augment policy string."})
    re_prob: float | None = field(default=None, metadata={"help": "Random-erasing probability."})
    shuffle_buffer: int = field(default=10_000, metadata={"help": "Shuffle buffer of streamed datasets."})
    wandb_project: str | None = field(default=None, metadata={"help": "Weights & Biases project (sets WANDB_PROJECT)."})
    use_random_mask: bool = field(
        default=False, metadata={"help": "The seed's unstructured mask: same as --density 0.5 unless --density is set."}
    )


@dataclass
class RunArguments:
    """What the run does besides training."""

    eval_only: bool = field(
        default=False,
        metadata={"help": "Only evaluate the weights of --pretrained_path (or --pretrained) on the eval split: no "
                  "training, nothing saved. Same as --do_train false. Without it bimask-train always trains "
                  "(transformers turns do_eval on by itself whenever eval_strategy is set)."},
    )


def _given(name: str, argv: list[str], recipe: dict[str, Any]) -> bool:
    """Whether the user set ``name`` explicitly (on the command line or in the recipe), not by a default."""
    return name in recipe or any(token.partition("=")[0] == f"--{name}" for token in argv)


def _translate_seed_flags(argv: list[str]) -> list[str]:
    out = []
    for i, token in enumerate(argv):
        flag, eq, value = token.partition("=")
        if flag in SEED_FLAGS:
            token = SEED_FLAGS[flag] + (eq + value if eq else "")
        out.append(token)
        if token == "--resume_from_checkpoint" and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            out.append("true")  # a bare --resume: the newest complete checkpoint in output_dir
    return out


def _check_recipe_position(argv: list[str]) -> None:
    """A recipe file anywhere but first would be parsed as a stray value: say where it goes."""
    for i, token in enumerate(argv):
        if i == 0 or not token.endswith((".yaml", ".yml")):
            continue
        previous = argv[i - 1]
        if previous.startswith("-") and "=" not in previous and previous not in ("--resume", "--resume_from_checkpoint"):
            continue  # the value of a flag (e.g. --fsdp_config f.yaml)
        raise SystemExit(
            f"bimask-train: the recipe file {token!r} must be the first argument: "
            f"bimask-train {token} {' '.join(a for a in argv if a != token)}"
        )


def _check_recipe_types(parser: HfArgumentParser, values: dict[str, Any], recipe_path: str) -> None:
    """A recipe value of the wrong type (``n: two``) is one line naming the file and key, not argparse's usage."""
    for key, value in values.items():
        action = parser._option_string_actions.get(f"--{key}")
        convert = getattr(action, "type", None)
        if action is None or value is None or convert is None:
            continue
        expected = getattr(convert, "__name__", "value")
        if isinstance(value, str):
            try:
                value = convert(value)
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                value = _WRONG
        elif convert is int and (isinstance(value, bool) or not isinstance(value, int)):
            value = _WRONG
        elif convert is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            value = _WRONG
        if value is _WRONG or (action.choices and value not in action.choices):
            wanted = (f"one of {list(action.choices)}" if action.choices else
                      {"int": "an integer", "float": "a number", "string_to_bool": "true or false"}.get(expected, expected))
            raise SystemExit(f"bimask-train: {recipe_path}: {key}: {values[key]!r} is not {wanted}.")


_WRONG = object()


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, Any]:
    """Parse ``[recipe.yaml] [--flag value ...]`` into argument dataclasses.

    The recipe's values are the defaults and the command line wins; the paper scripts' flags are renamed
    to ours first.

    Args:
        argv (`list[str]`, *optional*): The arguments, ``[recipe.yaml] [--flag value ...]`` (default:
            ``sys.argv[1:]``).

    Returns:
        `tuple[ModelArguments, DataArguments, BiMaskTrainingArguments]`: The model, data and training
        arguments.

    Raises:
        SystemExit: For a missing or misplaced recipe, unknown or mistyped recipe keys, contradicting or
            ineffective flags, or evaluation only without weights.
    """
    from .trainer import BiMaskTrainingArguments

    argv = list(sys.argv[1:] if argv is None else argv)
    _check_recipe_position(argv)
    groups = (ModelArguments, DataArguments, BiMaskTrainingArguments, RunArguments)
    parser = HfArgumentParser(groups)
    values: dict[str, Any] = {}
    if argv and argv[0].endswith((".yaml", ".yml")):
        recipe_path = argv.pop(0)
        if not os.path.isfile(recipe_path):
            raise SystemExit(f"bimask-train: recipe file {recipe_path!r} does not exist (see recipes/ for examples).")
        with open(recipe_path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
        known = {f.name for dc in groups for f in dataclasses.fields(dc)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SystemExit(f"bimask-train: unknown keys {unknown} in {recipe_path}; run bimask-train --help for the list.")
        for key in ("target_modules", "exclude_modules"):
            if isinstance(values.get(key), list):
                values[key] = ",".join(values[key])
        if isinstance(values.get("model_args"), dict):
            values["model_args"] = json.dumps(values["model_args"])
        _check_recipe_types(parser, values, recipe_path)
        parser.set_defaults(**values)
    argv = _translate_seed_flags(argv)
    model_args, data_args, train_args, run_args = parser.parse_args_into_dataclasses(argv)
    _decide_training(model_args, train_args, run_args, explicit=_given("do_train", argv, values))
    save_strategy = getattr(train_args.save_strategy, "value", train_args.save_strategy)
    if "--save_steps" in {token.partition("=")[0] for token in argv} and save_strategy != "steps":
        where = "the command line" if "--save_strategy" in argv else "the recipe"
        raise SystemExit(
            f"bimask-train: --save_steps has no effect: {where} says save_strategy: {save_strategy}. "
            "Add --save_strategy steps to save every --save_steps steps."
        )
    if data_args.use_random_mask and train_args.density is None:
        train_args.density = 0.5
        train_args.bimask_config = train_args.to_bimask_config()
    if data_args.wandb_project:
        os.environ["WANDB_PROJECT"] = data_args.wandb_project
    return model_args, data_args, train_args


def _decide_training(model_args: ModelArguments, train_args: Any, run_args: RunArguments, explicit: bool) -> None:
    """Set ``train_args.do_train``: train unless evaluation only was asked for.

    transformers sets ``do_eval=True`` whenever ``eval_strategy`` is not "no" and leaves ``do_train``
    False unless given, so neither says what the user wants; only an explicit ``--do_train false`` (or
    ``--eval_only``) skips training.
    """
    if run_args.eval_only and explicit and train_args.do_train:
        raise SystemExit("bimask-train: --eval_only and --do_train true contradict each other; give one of them.")
    train_args.do_train = not run_args.eval_only and (train_args.do_train or not explicit)
    if not train_args.do_train and model_args.pretrained_path is None and not model_args.pretrained:
        asked = "--eval_only" if run_args.eval_only else "--do_train false"
        raise SystemExit(
            f"bimask-train: {asked} evaluates without training, but no weights were given: add --pretrained_path "
            "<folder or Hub id> (or --pretrained), or drop it to train."
        )


def card_dataset(name: str) -> str:
    """The Hub id a dataset name stands for (model cards name datasets by Hub id); local paths by folder name.

    Args:
        name (`str`): Dataset name, Hub id or local folder.

    Returns:
        `str`: The Hub id, the folder's name, or ``name`` itself.
    """
    from .data import KNOWN_DATASETS

    spec = KNOWN_DATASETS.get(name)
    if spec is not None and spec.hub_id:
        return spec.hub_id
    return os.path.basename(os.path.normpath(name)) if os.path.isdir(name) else name


def card_dataset_name(name: str, max_samples: int | None = None) -> str:
    """The dataset's name in a card's results: its Hub id, saying so when only a subset was evaluated.

    Args:
        name (`str`): Dataset name, Hub id or local folder (shown as ``imagefolder <absolute path>``).
        max_samples (`int`, *optional*): Size of the evaluated subset, if one was.

    Returns:
        `str`: The name shown in the card.
    """
    shown = f"imagefolder {os.path.abspath(name)}" if os.path.isdir(name) else card_dataset(name)
    return f"{shown} (subset of {max_samples} images)" if max_samples is not None else shown


def _with_lora(model: Any, train_args: Any) -> Any:
    """``--lora_r``: LoRA adapters on ``--lora_target_modules`` with the sparse layers' masks fixed."""
    from peft import LoraConfig

    from .lora import get_peft_model
    from .trainer import parse_module_list

    targets = parse_module_list(train_args.lora_target_modules)
    if not targets:
        raise ValueError("--lora_r needs --lora_target_modules (comma-separated module names, or 're:<regex>').")
    alpha = train_args.lora_alpha if train_args.lora_alpha is not None else 2 * train_args.lora_r
    config = LoraConfig(r=train_args.lora_r, lora_alpha=alpha, lora_dropout=train_args.lora_dropout,
                        target_modules=targets)
    return get_peft_model(model, config)


def _base_model(model_args: ModelArguments) -> str | None:
    """The model whose weights a run starts from (for the card), or None for a random initialisation."""
    from .modeling import check_model_name

    name = model_args.model.removeprefix("hf-hub:")
    if check_model_name(model_args.model) == "timm":
        return f"timm/{name}" if model_args.pretrained else None
    return name if model_args.pretrained or os.path.isdir(name) else None


def build(model_args: ModelArguments, data_args: DataArguments, train_args: Any):  # type: ignore[no-untyped-def]
    """Data, model and `BiMaskTrainer` for parsed arguments (everything `main` does before training).

    Args:
        model_args (`ModelArguments`): Which network.
        data_args (`DataArguments`): Which data, and how it is augmented.
        train_args (`BiMaskTrainingArguments`): The training arguments.

    Returns:
        `tuple[ImageClassificationData, BiMaskTrainer]`: The loaded data and the trainer.

    Raises:
        ValueError: For a ``--pretrained_path`` that is neither a folder nor a Hub id, ``--model_args`` that
            is not JSON, or ``--lora_r`` without ``--lora_target_modules``.
    """
    from .data import load_image_classification_data
    from .hub.files import is_bimask_folder
    from .modeling import check_model_name, create_model, model_data_config
    from .trainer import BiMaskTrainer

    name = model_args.pretrained_path or model_args.model
    if model_args.pretrained_path is None:
        check_model_name(name)  # fail before any data is read
    elif not os.path.isdir(name) and "/" not in name:
        raise ValueError(f"--pretrained_path {name!r} is neither an existing folder nor a Hub id 'org/name'.")
    data = load_image_classification_data(
        data_args.dataset, model=model_data_config(name) if model_args.pretrained_path is None else None,
        streaming=data_args.streaming, train_split=data_args.train_split, eval_split=data_args.eval_split,
        image_column=data_args.image_column, label_column=data_args.label_column, recipe=data_args.recipe,
        image_size=data_args.image_size, in_chans=data_args.in_chans, auto_augment=data_args.auto_augment,
        re_prob=data_args.re_prob, mixup_alpha=data_args.mixup_alpha, cutmix_alpha=data_args.cutmix_alpha,
        label_smoothing=train_args.label_smoothing_factor or None, shuffle_buffer=data_args.shuffle_buffer,
        seed=train_args.seed, max_train_samples=data_args.max_train_samples,
        # streamed training data is read per rank (split_dataset_by_node); map-style data is split by
        # the Trainer's distributed sampler
        rank=train_args.process_index, world_size=train_args.world_size,
        max_eval_samples=data_args.max_eval_samples,
    )
    if model_args.pretrained_path is not None and is_bimask_folder(model_args.pretrained_path):
        from .hub import load_sparse_model

        model = load_sparse_model(model_args.pretrained_path)  # keeps its N:M layers and config
    else:
        try:
            extra = json.loads(model_args.model_args) if model_args.model_args else None
        except json.JSONDecodeError as err:
            raise ValueError(f"--model_args must be a JSON object, got {model_args.model_args!r}: {err}") from err
        model = create_model(
            name, labels=data.labels, in_chans=data_args.in_chans, pretrained=model_args.pretrained, model_args=extra,
        )
    if train_args.lora_r is not None:
        model = _with_lora(model, train_args)
    if data.mixup_fn is not None:
        train_args.label_smoothing_factor = 0.0  # folded into the mixup targets
    hub_dataset = card_dataset(data_args.dataset)
    card = {
        "model_name": os.path.basename(os.path.normpath(train_args.output_dir)),
        "base_model": model_args.pretrained_path or _base_model(model_args),
        "datasets": [hub_dataset] if not os.path.isdir(data_args.dataset) else [],
        "training_data": card_dataset_name(data_args.dataset, data_args.max_train_samples),
    }
    trainer = BiMaskTrainer(
        model=model, args=train_args, train_dataset=data.train_dataset, eval_dataset=data.eval_dataset,
        data_collator=data.collate_fn, mixup_fn=data.mixup_fn, card_info=card, data_config=data.data_config,
    )
    return data, trainer


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train, evaluate top-1/top-5, and write a Hub-ready model folder to ``--output_dir``.

    The console script is :func:`cli` (exit status 0 / non-zero); ``main`` is for Python callers. With
    evaluation only (``--eval_only``, ``--do_train false``) nothing is written.

    Args:
        argv (`list[str]`, *optional*): The arguments, ``[recipe.yaml] [--flag value ...]`` (default:
            ``sys.argv[1:]``).

    Returns:
        `dict[str, float]`: The evaluation metrics (empty without an evaluation split).
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    model_args, data_args, train_args = parse_args(argv)
    # Seed before anything random happens: the model's init, the data subsets, augmentation and the
    # permutation search then depend on --seed alone (the Trainer seeds only after the model exists).
    if train_args.full_determinism:
        enable_full_determinism(train_args.seed)
    else:
        set_seed(train_args.seed)
    data, trainer = build(model_args, data_args, train_args)
    metrics: dict[str, float] = {}
    if not train_args.do_train and data.eval_dataset is None:
        raise SystemExit("bimask-train: evaluation only, but the dataset has no evaluation split (--eval_split).")
    if train_args.do_train:
        resume = train_args.resume_from_checkpoint
        if isinstance(resume, str) and resume.lower() in ("true", "1", "last", "yes"):
            resume = True  # the seed's bare --resume: the newest checkpoint in output_dir
        trainer.train(resume_from_checkpoint=resume)
    if data.eval_dataset is not None:
        metrics = trainer.evaluate()
        if trainer.is_world_process_zero():
            print(f"eval top-1 {metrics.get('eval_top1', float('nan')):.2f}%  top-5 {metrics.get('eval_top5', float('nan')):.2f}%")
        trainer.card_info["metrics"] = {
            "top1": metrics.get("eval_top1"), "top5": metrics.get("eval_top5"),
            "dataset": card_dataset(data_args.dataset), "split": data.eval_split,
            "dataset_name": card_dataset_name(data_args.dataset, data_args.max_eval_samples),
        }
    if not train_args.do_train:
        return metrics  # evaluation only: the evaluated folder stays as it is, nothing is written
    trainer.save_model(train_args.output_dir)
    if trainer.is_world_process_zero():
        print(f"Hub-ready model folder: {os.path.abspath(train_args.output_dir)}")
    return metrics


def cli(argv: list[str] | None = None) -> int:
    """The ``bimask-train`` console script.

    Args:
        argv (`list[str]`, *optional*): The arguments, ``[recipe.yaml] [--flag value ...]`` (default:
            ``sys.argv[1:]``).

    Returns:
        `int`: Exit status 0 on success; errors propagate (non-zero status).
    """
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
