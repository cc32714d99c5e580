"""Model cards for Bi-Mask sparse models: Hub metadata, model-index results and a readable body.

The body comes from the Jinja template ``bimask_model_card.md`` shipped in ``bimask_hf.hub_cards``;
the results table sits between two HTML comments so :func:`update_card_results` can rewrite it.
"""

from __future__ import annotations

import enum
import importlib.resources
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch.nn as nn
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..config import BiMaskConfig
from ..families import reads_as_timm
from ..inspection import LayerReport, SparsityReport, report, sparse_layers
from ..modes import MODE_TABLE
from .files import CARD_NAME

__all__ = ["create_model_card", "update_card_results", "card_metrics", "TEMPLATE_NAME"]

TEMPLATE_NAME = "bimask_model_card.md"
RESULTS_START = "<!-- bimask-results-start -->"
RESULTS_END = "<!-- bimask-results-end -->"
TASK = "image-classification"
TOP_K_NAMES = {"top1": "Top-1 accuracy", "top5": "Top-5 accuracy"}
_METRIC_KEYS = {
    "top1": ("top1", "top1_accuracy", "acc1", "accuracy"),
    "top5": ("top5", "top5_accuracy", "acc5"),
}
MODE_DESCRIPTIONS = {name: spec.description for name, spec in MODE_TABLE.items()}
# TrainingArguments has ~120 fields; a card lists the ones that define the recipe.
_RECIPE_KEYS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "optim", "weight_decay", "lr_scheduler_type", "warmup_ratio", "warmup_steps", "label_smoothing_factor",
    "seed", "fp16", "bf16", "world_size",
)
CITATION = """@inproceedings{zhang2023bimask,
  title     = {Bi-directional Masks for Efficient N:M Sparse Training},
  author    = {Zhang, Yuxin and Luo, Yiting and Lin, Mingbao and Zhong, Yunshan and Xie, Jingjing and Chao, Fei and Ji, Rongrong},
  booktitle = {Proceedings of the 40th International Conference on Machine Learning (ICML)},
  year      = {2023},
  eprint    = {2302.06058},
  archivePrefix = {arXiv}
}"""


def card_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``{"top1": ..., "top5": ...}`` from a metrics dict (``top1``, ``eval_top1``, ``accuracy``... keys).

    Values are kept as given; the convention (as in the paper's tables) is percent.

    Args:
        metrics (`Mapping[str, Any]`): Metrics, e.g. the Trainer's ``evaluate()`` result.

    Returns:
        `dict[str, float]`: The top-1 and top-5 values found (either may be missing).
    """
    found: dict[str, float] = {}
    for name, aliases in _METRIC_KEYS.items():
        for alias in aliases:
            for key in (alias, f"eval_{alias}", f"test_{alias}"):
                if key in metrics and metrics[key] is not None:
                    found[name] = float(metrics[key])
                    break
            if name in found:
                break
    return found


UNNAMED_DATASET = "unnamed dataset"  # results on data that was given no name: in the table, not the model-index


def _eval_results(metrics: Mapping[str, Any], dataset: str, split: str | None, dataset_name: str | None) -> list[EvalResult]:
    return [
        EvalResult(
            task_type=TASK,
            task_name="Image Classification",
            dataset_type=dataset,
            dataset_name=dataset_name or dataset,
            dataset_split=split,
            metric_type="accuracy",
            metric_name=TOP_K_NAMES[key],
            metric_value=round(value, 4),  # 86.93, not 86.92999999999999
        )
        for key, value in card_metrics(metrics).items()
    ]


def results_table(eval_results: Iterable[EvalResult] | None) -> str:
    """Markdown table of top-1 / top-5 results, one row per (dataset, split)."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for result in eval_results or []:
        row = rows.setdefault((result.dataset_name, result.dataset_split or "-"), {})
        row[result.metric_name or result.metric_type] = result.metric_value
    if not rows:
        return "No evaluation results yet (`bimask-eval --update-card` adds them)."
    columns = list(TOP_K_NAMES.values())
    lines = ["| Dataset | Split | " + " | ".join(columns) + " |", "|---|---|" + "---:|" * len(columns)]
    for (dataset, split), row in rows.items():
        cells = [_fmt(row.get(c)) for c in columns]
        lines.append(f"| {dataset} | {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def bimask_architecture(model_or_report: nn.Module | SparsityReport) -> str | None:
    """The timm architecture name if bimask-hf itself registers it (plain timm needs ``import bimask_hf``)."""
    if not isinstance(model_or_report, nn.Module):
        return None
    from ..models import cifar

    for module in model_or_report.modules():
        cfg = getattr(module, "pretrained_cfg", None)
        arch = cfg.get("architecture") if isinstance(cfg, Mapping) else None
        if arch and hasattr(cifar, arch):
            return arch
    return None


def _as_report(model_or_report: nn.Module | SparsityReport, config: BiMaskConfig) -> SparsityReport:
    if isinstance(model_or_report, SparsityReport):
        return model_or_report
    if sparse_layers(model_or_report):
        return report(model_or_report)
    return report(model_or_report, config)


def default_library_name(model: nn.Module) -> str:
    """``"timm"`` for folders timm reads natively (bare timm models and TimmWrapper), else ``"transformers"``."""
    return "timm" if reads_as_timm(model) else "transformers"


def _hyperparameters(config: BiMaskConfig, training_args: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    items: list[tuple[str, str]] = []
    if training_args:
        args = dict(training_args)
        if len(args) > 25:  # a whole TrainingArguments.to_dict(): keep the recipe
            args = {k: v for k, v in args.items() if k in _RECIPE_KEYS or k.startswith("bimask")}
        items += [(k, _plain(v)) for k, v in args.items() if v is not None and v != ""]
    items += [
        ("N:M pattern", config.pattern),
        ("mask mode", config.mode),
        ("SR-STE decay", str(config.decay)),
        ("permutation search", config.permutation_search),
        ("permutation interval (steps)", str(config.permutation_interval)),
        ("permutation candidates", str(config.num_permutations)),
        ("group layout", config.group_layout),
    ]
    if config.preset is not None:  # the paper's algorithm: its tie order, fresh random search, stems, decay
        items += [("preset", config.preset), ("tie order", config.tie_break),
                  ("decay per sample", str(config.decay_per_sample))]
    return items


def _plain(value: Any) -> str:
    """A card value: an enum's value (``sgd``, not ``OptimizerNames.SGD``), else ``str``."""
    return str(value.value) if isinstance(value, enum.Enum) else str(value)


def _tags(config: BiMaskConfig) -> list[str]:
    if not MODE_TABLE[config.mode].masked:
        return ["bimask", "dense-baseline", TASK]
    if config.density is not None:
        return ["bimask", "unstructured-sparsity", TASK]
    return ["bimask", "n:m-sparsity", f"{config.n}:{config.m}-sparsity", TASK]


def _as_list(value: str | list[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def create_model_card(
    model_or_report: nn.Module | SparsityReport,
    config: BiMaskConfig,
    *,
    model_name: str,
    base_model: str | None = None,
    datasets: str | list[str] | None = None,
    metrics: Mapping[str, Any] | None = None,
    training_args: Mapping[str, Any] | None = None,
    license: str = "apache-2.0",
    library_name: str | None = None,
    repo_id: str | None = None,
    compressed: bool = False,
    custom_architecture: str | None = None,
    in_chans: int = 3,
    training_results: list[dict[str, Any]] | None = None,
    framework_versions: list[tuple[str, str]] | None = None,
    lora_from: str | None = None,
    pipeline: bool = True,
    trained_preprocessing: bool = False,
    training_data: str | None = None,
) -> ModelCard:
    """Build the model card of a Bi-Mask sparse model.

    Args:
        model_or_report (`nn.Module` or `SparsityReport`): A patched model, a merged one, or its
            :class:`SparsityReport` (the per-layer table).
        config (`BiMaskConfig`): The configuration the model was trained with.
        model_name (`str`): The model's name (a repo id is used as it is in the examples).
        base_model (`str`, *optional*): The model the training started from.
        datasets (`str` or `list[str]`, *optional*): Hub ids of the training data.
        metrics (`Mapping[str, Any]`, *optional*): ``top1``/``top5`` (percent) and the ``dataset`` / ``split``
            they were measured on (``dataset_name`` optional; the dataset defaults to the first of
            ``datasets``); they become the card's ``model-index`` and results table (results on a dataset
            without a name go in the table only, as an "unnamed dataset").
        training_args (`Mapping[str, Any]`, *optional*): ``TrainingArguments`` as a dict; the card lists the
            fields that define the recipe.
        license (`str`, *optional*, defaults to `"apache-2.0"`): The license.
        library_name (`str`, *optional*): Defaults to ``"timm"`` for timm models and TimmWrapper,
            ``"transformers"`` otherwise (it must be given with a report).
        repo_id (`str`, *optional*): The Hub repo the folder is pushed to, used in the loading examples;
            without one they read ``<namespace>/<model_name>``, a placeholder to replace.
        compressed (`bool`, *optional*, defaults to `False`): Whether the weights are N:M-compressed (no
            pipeline example then).
        custom_architecture (`str`, *optional*): A timm architecture bimask-hf registers (default: found in
            a model, not in a report); it makes the examples ``import bimask_hf``.
        in_chans (`int`, *optional*, defaults to 3): Input channels; other than 3 means bimask-hf's image
            processor, which makes the examples ``import bimask_hf``.
        training_results (`list[dict[str, Any]]`, *optional*): Rows of transformers' training-results table
            (``transformers.modelcard.parse_log_history``).
        framework_versions (`list[tuple[str, str]]`, *optional*): Defaults to the installed versions of
            bimask-hf, transformers, timm, PyTorch, datasets and accelerate.
        lora_from (`str`, *optional*): The sparse model a merged LoRA fine-tune started from (the card says
            so, tag ``lora``).
        pipeline (`bool`, *optional*, defaults to `True`): Whether the folder's image processor lets
            ``pipeline("image-classification")`` load it (only then is it shown).
        trained_preprocessing (`bool`, *optional*, defaults to `False`): Whether that processor is the
            training run's evaluation transform.
        training_data (`str`, *optional*): The data the model was trained on (a Hub id or a local folder).

    Returns:
        `huggingface_hub.ModelCard`: The card.

    Raises:
        ValueError: For a report without ``library_name``.
    """
    layer_report = _as_report(model_or_report, config)
    if library_name is None:
        if isinstance(model_or_report, SparsityReport):
            raise ValueError("create_model_card: pass library_name='timm' or 'transformers' with a SparsityReport.")
        library_name = default_library_name(model_or_report)
    datasets = _as_list(datasets)
    eval_results: list[EvalResult] = []
    table_results: list[EvalResult] = []
    if metrics:
        dataset = metrics.get("dataset") or (datasets[0] if datasets else None)
        if dataset is not None:
            eval_results = _eval_results(metrics, dataset, metrics.get("split"), metrics.get("dataset_name"))
        else:
            table_results = _eval_results(metrics, UNNAMED_DATASET, metrics.get("split"), None)
    card_data = ModelCardData(
        model_name=model_name,
        base_model=base_model,
        datasets=datasets,
        license=license,
        library_name=library_name,
        pipeline_tag=TASK,
        tags=_tags(config) + (["lora"] if lora_from else []),
        metrics=["accuracy"] if eval_results else None,
        eval_results=eval_results or None,
    )
    sparse_rows = [r for r in layer_report.rows if r.mode != "dense"]
    dense_rows = [r for r in layer_report.rows if r.mode == "dense"]
    stats = layer_report.stats
    template = importlib.resources.files("bimask_hf.hub_cards").joinpath(TEMPLATE_NAME)
    with importlib.resources.as_file(template) as template_path:
        return ModelCard.from_template(
            card_data,
            template_path=os.fspath(template_path),
            model_name=model_name,
            repo_id=repo_id or (model_name if "/" in model_name else f"<namespace>/{model_name}"),
            pipeline=pipeline and not compressed,
            trained_preprocessing=trained_preprocessing,
            training_data=training_data,
            dense=not MODE_TABLE[config.mode].masked,
            base_model=base_model,
            library=library_name,
            custom_architecture=custom_architecture or bimask_architecture(model_or_report),
            custom_processor=in_chans != 3 and pipeline,
            in_chans=in_chans,
            training_results=training_results or None,
            framework_versions=framework_versions if framework_versions is not None else _framework_versions(),
            lora_from=lora_from,
            compressed=compressed,
            pattern=config.pattern,
            nm=config.density is None,
            n=config.n,
            m=config.m,
            mode=config.mode,
            mode_description=MODE_DESCRIPTIONS.get(config.mode, config.mode),
            sparse_rows=[_row(r) for r in sparse_rows],
            dense_rows=[_row(r) for r in dense_rows],
            overall_density=f"{stats.model_density:.3f}",
            sparse_density=f"{stats.sparse_density:.3f}",
            retention_mean=_opt(stats.retention_mean),
            retention_min=_opt(stats.retention_min),
            hyperparameters=_hyperparameters(config, training_args),
            results_table=results_table(eval_results or table_results),
            results_start=RESULTS_START,
            results_end=RESULTS_END,
            citation=CITATION,
        )


def _framework_versions() -> list[tuple[str, str]]:
    from importlib.metadata import PackageNotFoundError, version

    from ..version import __version__

    found = [("bimask-hf", __version__)]
    for name, dist in (("Transformers", "transformers"), ("timm", "timm"), ("PyTorch", "torch"),
                       ("Datasets", "datasets"), ("Accelerate", "accelerate")):
        try:
            found.append((name, version(dist)))
        except PackageNotFoundError:
            continue
    return found


def _row(r: LayerReport) -> dict[str, str]:
    return {
        "name": r.name,
        "kind": r.kind,
        "shape": "x".join(map(str, r.shape)),
        "mode": r.mode,
        "pattern": r.pattern,
        "density": f"{r.density:.3f}",
        "retention": _opt(r.retention) or "-",
        "reason": r.reason or "",
    }


def _opt(value: float | None) -> str | None:
    return None if value is None else f"{value:.4f}"


def update_card_results(
    folder: str | os.PathLike,
    metrics: Mapping[str, Any],
    dataset: str,
    split: str,
    *,
    dataset_name: str | None = None,
) -> ModelCard:
    """Write new top-1 / top-5 results into ``folder/README.md``: its ``model-index`` and results table.

    Results for other datasets or splits are kept; those for ``(dataset, split)`` are replaced. A card
    whose table markers were edited away gets a new "Results" section.

    Args:
        folder (`str` or `os.PathLike`): A local model folder with a card.
        metrics (`Mapping[str, Any]`): Metrics holding top-1 and/or top-5 (see :func:`card_metrics`).
        dataset (`str`): The dataset's Hub id.
        split (`str`): The split evaluated.
        dataset_name (`str`, *optional*): The dataset's name in the results.

    Returns:
        `huggingface_hub.ModelCard`: The saved card.

    Raises:
        FileNotFoundError: If the folder has no card.
        ValueError: If ``metrics`` holds no top-1/top-5 value.
    """
    path = os.path.join(os.fspath(folder), CARD_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No model card {path!r}; save the model with bimask_hf.save_sparse_model first.")
    new = _eval_results(metrics, dataset, split, dataset_name)
    if not new:
        raise ValueError(f"update_card_results: no top-1/top-5 value in metrics {sorted(metrics)}.")
    card = ModelCard.load(path)
    replaced = {(r.dataset_type, r.dataset_split, r.metric_name) for r in new}
    kept = [
        r for r in (card.data.eval_results or []) if (r.dataset_type, r.dataset_split, r.metric_name) not in replaced
    ]
    card.data.eval_results = kept + new
    if not card.data.model_name:
        card.data.model_name = os.path.basename(os.path.abspath(os.fspath(folder)))
    metric_ids = list(card.data.metrics or [])
    card.data.metrics = metric_ids + ([] if "accuracy" in metric_ids else ["accuracy"])
    table = results_table(card.data.eval_results)
    text = card.text
    start, end = text.find(RESULTS_START), text.find(RESULTS_END)
    if 0 <= start < end:
        text = text[: start + len(RESULTS_START)] + "\n" + table + "\n" + text[end:]
    else:
        text = text.rstrip() + f"\n\n## Results\n\n{RESULTS_START}\n{table}\n{RESULTS_END}\n"
    card.text = text
    card.save(path)
    return card
