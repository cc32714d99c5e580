"""Top-1 / top-5 accuracy for the Trainer, without the Hub.

``preprocess_logits_for_metrics`` keeps only the indices of the 5 best classes per image, so
evaluation on ImageNet-sized label spaces does not accumulate full logits.
"""

from __future__ import annotations

import numpy as np
import torch

TOPK = (1, 5)


def topk_indices(logits: torch.Tensor | tuple, labels: torch.Tensor | None = None, k: int = max(TOPK)) -> torch.Tensor:
    """Indices of the ``k`` highest logits (fewer if there are fewer classes), best first.

    The Trainer's ``preprocess_logits_for_metrics``.

    Args:
        logits (`torch.Tensor` or `tuple`): ``(B, C)`` logits, or a tuple whose first entry they are.
        labels (`torch.Tensor`, *optional*): Unused; the Trainer passes them.
        k (`int`, *optional*, defaults to 5): How many classes to keep.

    Returns:
        `torch.Tensor`: ``(B, min(k, C))`` class indices.
    """
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.topk(min(k, logits.shape[-1]), dim=-1).indices


def topk_accuracy(ranked: np.ndarray, labels: np.ndarray, topk: tuple[int, ...] = TOPK) -> dict[str, float]:
    """``{"top1": ..., "top5": ...}`` in percent (0-100), from integer class indices or float logits.

    The dtype decides, never the values. Percent is the convention of the paper's tables, the Trainer's
    ``eval_top1`` and the model cards; the ``evaluate`` module (:data:`bimask_hf.metrics.TOPK_METRIC_PATH`)
    reports fractions in [0, 1].

    Args:
        ranked (`np.ndarray`): Integer class indices ranked best first, ``(B, k)``, or ``(B,)`` top-1
            predictions (then only ``top1`` is reported); or float logits ``(B, C)``.
        labels (`np.ndarray`): ``(B,)`` true classes.
        topk (`tuple[int, ...]`, *optional*, defaults to `(1, 5)`): The k to report.

    Returns:
        `dict[str, float]`: ``top<k>`` to accuracy in percent.

    Raises:
        ValueError: If the shapes do not match.
    """
    ranked = np.asarray(ranked)
    labels = np.asarray(labels).reshape(-1)
    if ranked.ndim == 1 and np.issubdtype(ranked.dtype, np.integer):
        ranked, topk = ranked[:, None], (1,)
    if ranked.ndim != 2 or ranked.shape[0] != labels.shape[0]:
        raise ValueError(f"Expected ranked indices of shape (B, k) for {labels.shape[0]} labels, got {ranked.shape}.")
    if not np.issubdtype(ranked.dtype, np.integer):  # logits: rank them
        ranked = np.argsort(-ranked, axis=-1, kind="stable")[:, : max(topk)]
    hits = ranked == labels[:, None]
    return {f"top{k}": float(hits[:, :k].any(axis=1).mean() * 100.0) for k in topk}


def compute_topk_metrics(eval_pred) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """``compute_metrics`` for the HF Trainer: top-1 and top-5 accuracy in percent.

    Args:
        eval_pred (`transformers.EvalPrediction`): Predictions (ranked indices or logits) and label ids.

    Returns:
        `dict[str, float]`: ``{"top1": ..., "top5": ...}``.
    """
    predictions, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(predictions, (tuple, list)):
        predictions = predictions[0]
    return topk_accuracy(predictions, labels)
