"""Metrics shipped with bimask-hf: top-1/top-5 accuracy for the Trainer and as an `evaluate` module."""

from pathlib import Path

from .topk import compute_topk_metrics, topk_accuracy, topk_indices

#: Path of the `evaluate` metric module, for ``evaluate.load(TOPK_METRIC_PATH)`` with no Hub access.
TOPK_METRIC_PATH = str(Path(__file__).parent / "topk_accuracy" / "topk_accuracy.py")

__all__ = ["TOPK_METRIC_PATH", "compute_topk_metrics", "topk_accuracy", "topk_indices"]
