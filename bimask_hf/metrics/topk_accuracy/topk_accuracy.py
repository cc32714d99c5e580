"""Top-k accuracy as an `evaluate` metric module, loadable offline by path.

    import evaluate, bimask_hf.metrics
    metric = evaluate.load(bimask_hf.metrics.TOPK_METRIC_PATH)
    metric.compute(predictions=ranked_indices, references=labels)  # {"top1": .., "top5": ..}
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Top-1 and top-5 accuracy (percent) from ranked class indices of shape (N, k) or logits (N, C)."
_KWARGS_DESCRIPTION = """
Args:
    predictions: per example, class indices ranked best first (k >= 1), or the logits.
    references: the true class index of each example.
Returns:
    top1, top5: accuracy in percent.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopkAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, topk=(1, 5)):
        ranked = np.asarray(predictions)
        labels = np.asarray(references)
        if np.all(np.mod(ranked, 1) == 0) and ranked.shape[1] <= max(topk):
            ranked = ranked.astype(np.int64)
        else:
            ranked = np.argsort(-ranked, axis=-1, kind="stable")[:, : max(topk)]
        hits = ranked == labels[:, None]
        return {f"top{k}": float(hits[:, :k].any(axis=1).mean() * 100.0) for k in topk}
