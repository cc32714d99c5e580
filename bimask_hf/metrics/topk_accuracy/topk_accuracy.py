"""Top-k accuracy as an `evaluate` metric module, loadable offline by path.

    import evaluate, bimask_hf.metrics
    metric = evaluate.load(bimask_hf.metrics.TOPK_METRIC_PATH)            # ranked class indices
    metric.compute(predictions=ranked_indices, references=labels)          # {"top1": 0.91, "top5": 0.99}
    metric = evaluate.load(bimask_hf.metrics.TOPK_METRIC_PATH, "logits")  # scores / logits per class
    metric.compute(predictions=logits, references=labels)

Like every `evaluate` accuracy, the results are fractions in [0, 1] (bimask-hf's Trainer metrics and
``bimask-eval`` report percent). What the predictions are is chosen by the configuration name, never
guessed from their values: ``"ranked"`` (default) takes class indices, best first, of shape ``(N, k)``
or ``(N,)`` (top-1 only), and refuses float predictions (it would read logits as indices);
``"logits"`` takes one score per class, shape ``(N, C)``.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = (
    "Top-1 and top-5 accuracy, as fractions in [0, 1], from ranked class indices (configuration 'ranked', "
    "the default) or from per-class scores (configuration 'logits')."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions: configuration 'ranked' (default): per example the class indices ranked best first, shape
        (N, k) with k >= 1, or (N,) with the top-1 class only; configuration 'logits': per example one
        score (logit or probability) per class, shape (N, C).
    references: the true class index of each example.
    topk: the k values to report (default (1, 5)); with ranked predictions k may not exceed their width.
Returns:
    top1, top5 (one key per k): the fraction of examples whose true class is among the k best, in [0, 1].
"""
CONFIGS = ("ranked", "logits")


def _refuse_scores(config_name, predictions):
    """Raise ValueError when ranked class indices are expected but ``predictions`` hold float values."""
    if config_name == "logits" or predictions is None:
        return
    values = np.asarray(predictions)
    if values.dtype.kind != "f":  # the dtype decides, never the values (a one-hot float row is not indices)
        return
    raise ValueError(
        f"topk_accuracy's {config_name!r} configuration takes ranked class indices (integers), got "
        f"{values.dtype} predictions such as {values.reshape(-1)[:3].tolist()}; for logits or scores per class "
        "load the 'logits' configuration: evaluate.load(TOPK_METRIC_PATH, 'logits')."
    )


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopkAccuracy(evaluate.Metric):
    """Top-k accuracy; ``config_name`` says whether predictions are ranked indices or logits."""

    def _info(self):
        if self.config_name not in (*CONFIGS, "default"):
            raise ValueError(f"Unknown configuration {self.config_name!r} of topk_accuracy; choose one of {CONFIGS}.")
        references = datasets.Value("int64")
        if self.config_name == "logits":
            features = datasets.Features({"predictions": datasets.Sequence(datasets.Value("float32")),
                                          "references": references})
        else:
            features = [
                datasets.Features({"predictions": datasets.Sequence(datasets.Value("int64")), "references": references}),
                datasets.Features({"predictions": datasets.Value("int64"), "references": references}),
            ]
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=features,
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of predictions and references (float predictions need the 'logits' configuration).
"""
        # The features of "ranked" are integers: datasets would cast logits to int64 silently.
        _refuse_scores(self.config_name, predictions)
        return super().add_batch(predictions=predictions, references=references, **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one prediction and reference (float predictions need the 'logits' configuration)."""
        _refuse_scores(self.config_name, None if prediction is None else [prediction])
        return super().add(prediction=prediction, reference=reference, **kwargs)

    def _compute(self, predictions, references, topk=(1, 5)):
        predictions = np.asarray(predictions)
        labels = np.asarray(references).reshape(-1)
        if self.config_name == "logits":
            if predictions.ndim != 2:
                raise ValueError(f"'logits' predictions must have shape (N, num_classes), got {predictions.shape}.")
            ranked = np.argsort(-predictions, axis=-1, kind="stable")[:, : max(topk)]
            width = None  # every k is answerable (k >= C counts every example)
        else:
            ranked = predictions.reshape(-1, 1) if predictions.ndim == 1 else predictions
            width = ranked.shape[1]
            too_wide = [k for k in topk if k > width]
            if too_wide:
                raise ValueError(
                    f"Ranked predictions hold {width} class(es) per example, too few for top-{too_wide[0]}; pass "
                    f"topk=(1,) for top-1 labels, more ranked indices, or load the 'logits' configuration for scores."
                )
        hits = ranked == labels[:, None]
        return {f"top{k}": float(hits[:, :k].any(axis=1).mean()) for k in topk}
