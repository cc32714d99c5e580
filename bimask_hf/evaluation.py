"""``bimask-eval``: top-1 / top-5 accuracy of a saved (sparse) model on a dataset split.

    bimask-eval runs/fmnist-2x4 --dataset fashion_mnist --split test
    bimask-eval org/resnet50-2x4-bimask --dataset imagenet-1k --split validation --update-card

The model is a local folder or Hub id written by bimask-hf (its N:M pattern is verified on load) or
any transformers / timm image classifier.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .families import takes_pixel_values
from .metrics import topk_accuracy

__all__ = ["cli", "evaluate_model", "load_for_eval", "main"]


def load_for_eval(name_or_path: str) -> nn.Module:
    """A bimask-hf folder through :func:`load_sparse_model` (pattern verified), else the plain libraries.

    A missing folder, a damaged ``bimask_config.json`` or a folder without a model raise errors naming the
    problem.

    Args:
        name_or_path (`str`): A local folder or Hub id; timm-format folders (``timm`` ``save_for_hf``) load
            too.

    Returns:
        `nn.Module`: The model.

    Raises:
        FileNotFoundError: If it is neither a local folder nor a loadable Hub repo.
    """
    return _load_folder(name_or_path)[0]


def _load_folder(name_or_path: str) -> tuple[nn.Module, str]:
    import httpx

    from .hub import load_sparse_model
    from .hub.files import _looks_like_path, is_bimask_folder, resolve_folder
    from .hub.load import load_plain_model

    if os.path.exists(name_or_path) or _looks_like_path(name_or_path):
        folder = resolve_folder(name_or_path)  # FileNotFoundError names a missing local folder
    else:
        try:
            folder = resolve_folder(name_or_path)
        # "runs/x" is also a valid Hub id: say it is not a local folder either. The Hub client raises
        # OSError subclasses (HTTP, missing repo, offline), ValueError (invalid id) or httpx's errors.
        except (OSError, ValueError, httpx.HTTPError) as error:
            raise FileNotFoundError(
                f"{name_or_path!r} is not an existing local folder, and loading it as a Hub repo id failed "
                f"({type(error).__name__}: {error}). Check the path (bimask-train writes to --output_dir)."
            ) from error
    if is_bimask_folder(folder):
        # A bimask-hf folder: its N:M pattern is verified; a damaged config is an error, not a plain load.
        return load_sparse_model(folder), folder
    return load_plain_model(folder), folder


@torch.no_grad()
def evaluate_model(
    model: nn.Module | str,
    dataset: str,
    split: str | None = None,
    batch_size: int = 128,
    max_samples: int | None = None,
    image_size: int | None = None,
    in_chans: int | None = None,
    device: str | None = None,
    progress: bool | None = None,
    **data_kwargs: Any,
) -> dict[str, Any]:
    """Top-1 / top-5 accuracy of ``model`` on ``dataset``'s ``split``.

    Images are preprocessed as the model was trained: the input size, channels, mean/std, interpolation
    and crop recorded in its folder (``config.json``'s ``pretrained_cfg`` or ``preprocessor_config.json``),
    else what the model itself says; ``image_size`` / ``in_chans`` / ``data_kwargs`` override them.

    Args:
        model (`nn.Module` or `str`): A model, or a folder / Hub id loaded with :func:`load_for_eval`.
        dataset (`str`): Dataset name, Hub id or ImageFolder path.
        split (`str`, *optional*): Split to evaluate (default: the dataset's evaluation split).
        batch_size (`int`, *optional*, defaults to 128): Batch size.
        max_samples (`int`, *optional*): Evaluate on this many examples only.
        image_size (`int`, *optional*): Overrides the recorded input size.
        in_chans (`int`, *optional*): Overrides the recorded input channels.
        device (`str`, *optional*): Where to run (default: ``"cuda"`` if available, else ``"cpu"``).
        progress (`bool`, *optional*): A bar over the batches (None: when stderr is a terminal and progress
            bars are on; see :func:`bimask_hf.progress.progress_bar`).
        **data_kwargs: Further arguments of :func:`bimask_hf.data.load_image_classification_data`.

    Returns:
        `dict[str, Any]`: ``{"top1", "top5", "samples", "split"}`` (accuracy in percent).

    Raises:
        ValueError: If the dataset has no such evaluation split.
    """
    from .data import load_image_classification_data
    from .data.loading import _model_data_config
    from .hub.preprocessing import read_preprocessing
    from .progress import progress_bar

    data_config = None
    if isinstance(model, str):
        model, folder = _load_folder(model)
        data_config = read_preprocessing(folder)
    if data_config is None:
        data_config = _model_data_config(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    data_kwargs.setdefault("crop_pct", data_config.get("crop_pct"))
    data_kwargs.setdefault("crop_mode", data_config.get("crop_mode"))
    data = load_image_classification_data(
        dataset, model=data_config, eval_split=split, max_eval_samples=max_samples, image_size=image_size,
        in_chans=in_chans, rank=0, world_size=1, **data_kwargs,
    )
    if data.eval_dataset is None:
        raise ValueError(f"Dataset {dataset!r} has no evaluation split {split!r}.")
    loader = torch.utils.data.DataLoader(data.eval_dataset, batch_size=batch_size, collate_fn=data.collate_fn)
    ranked, labels = [], []
    for batch in progress_bar(loader, desc="bimask-eval", unit="batch", enabled=progress):
        pixel_values = batch["pixel_values"].to(device)
        out = model(pixel_values=pixel_values) if takes_pixel_values(model) else model(pixel_values)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        ranked.append(logits.topk(min(5, logits.shape[-1]), dim=-1).indices.cpu().numpy())
        labels.append(batch["labels"].numpy())
    result: dict[str, Any] = topk_accuracy(np.concatenate(ranked), np.concatenate(labels))
    result["samples"] = float(sum(len(lbl) for lbl in labels))
    result["split"] = data.eval_split
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point (see the module docstring).

    Args:
        argv (`list[str]`, *optional*): The arguments (default: ``sys.argv[1:]``).

    Returns:
        `dict[str, Any]`: ``{"top1", "top5", "samples"}``, as printed.
    """
    parser = argparse.ArgumentParser(prog="bimask-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="local folder or Hub id of the model")
    parser.add_argument("--dataset", required=True, help="dataset name, Hub id or ImageFolder path")
    parser.add_argument("--split", default=None, help="split to evaluate (default: the dataset's eval split)")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--max_samples", type=int, default=None)
    parser.add_argument("--image_size", type=int, default=None)
    parser.add_argument("--in_chans", type=int, default=None)
    parser.add_argument("--update-card", "--update_card", dest="update_card", action="store_true",
                        help="write the results into the local folder's README.md model card and model-index")
    args = parser.parse_args(argv)
    if args.update_card and not os.path.isdir(args.model):
        parser.error("--update-card needs a local model folder (download it first, or save with bimask-hf).")
    result = evaluate_model(args.model, args.dataset, split=args.split, batch_size=args.batch_size,
                            max_samples=args.max_samples, image_size=args.image_size, in_chans=args.in_chans)
    split = result.pop("split", None) or args.split or "eval"
    subset = args.max_samples is not None
    print(f"{args.model} on {args.dataset}/{split} ({int(result['samples'])} images"
          f"{', a subset' if subset else ''}): top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%")
    if args.update_card:
        from .hub import update_card_results
        from .hub.files import CARD_NAME
        from .train import card_dataset, card_dataset_name

        # The same dataset id and split name as the training run's card, so this result replaces that one.
        update_card_results(
            args.model, {"top1": result["top1"], "top5": result["top5"]}, dataset=card_dataset(args.dataset),
            split=split, dataset_name=card_dataset_name(args.dataset, int(result["samples"]) if subset else None),
        )
        note = f" (a subset of {int(result['samples'])} images, as the card says)" if subset else ""
        print(f"Updated the {card_dataset(args.dataset)}/{split} result in {os.path.join(args.model, CARD_NAME)}{note}")
    return result


def cli(argv: list[str] | None = None) -> int:
    """The ``bimask-eval`` console script.

    Args:
        argv (`list[str]`, *optional*): The arguments (default: ``sys.argv[1:]``).

    Returns:
        `int`: Exit status 0 on success; errors propagate (non-zero status).
    """
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
