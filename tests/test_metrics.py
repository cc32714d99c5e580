"""The shipped top-k metrics: the `evaluate` module (0-1 scale) and the Trainer's percent helpers."""

from __future__ import annotations

import evaluate
import numpy as np
import pytest

from bimask_hf.metrics import TOPK_METRIC_PATH, topk_accuracy


def _reference_topk(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label's score is beaten by fewer than k other scores (ties broken by index)."""
    hits = 0
    for row, label in zip(scores, labels):
        better = sum(1 for c, s in enumerate(row) if s > row[label] or (s == row[label] and c < label))
        hits += better < k
    return hits / len(labels)


def test_evaluate_module_one_hot_scores_are_not_misread_as_indices():
    # One-hot scores of 3 classes look like small integers; they must still be read as scores.
    labels = np.array([0, 1, 2, 2])
    one_hot = np.eye(3, dtype=np.float32)[[0, 1, 1, 2]]
    metric = evaluate.load(TOPK_METRIC_PATH, "logits")
    result = metric.compute(predictions=one_hot, references=labels)
    assert result["top1"] == pytest.approx(_reference_topk(one_hot, labels, 1)) == pytest.approx(0.75)
    assert result["top5"] == 1.0


def test_evaluate_module_ranked_indices_on_a_0_1_scale():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(40, 10)).astype(np.float32)
    labels = rng.integers(0, 10, size=40)
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    got = evaluate.load(TOPK_METRIC_PATH).compute(predictions=ranked, references=labels)
    from_logits = evaluate.load(TOPK_METRIC_PATH, "logits").compute(predictions=scores, references=labels)
    for k in (1, 5):
        assert got[f"top{k}"] == pytest.approx(_reference_topk(scores, labels, k))
        assert from_logits[f"top{k}"] == got[f"top{k}"]
    assert 0.0 <= got["top1"] <= got["top5"] <= 1.0


def test_evaluate_module_accepts_1d_top1_predictions():
    labels = np.array([3, 1, 4, 1, 5])
    predictions = np.array([3, 1, 0, 1, 2])
    metric = evaluate.load(TOPK_METRIC_PATH)
    assert metric.compute(predictions=predictions, references=labels, topk=(1,)) == {"top1": 0.6}
    with pytest.raises(ValueError, match="too few for top-5"):
        metric.compute(predictions=predictions, references=labels)


def test_library_topk_accuracy_takes_1d_predictions_in_percent():
    assert topk_accuracy(np.array([3, 1, 0, 1]), np.array([3, 1, 4, 1])) == {"top1": 75.0}
    # Float one-hot scores are logits by dtype, whatever their values.
    assert topk_accuracy(np.eye(3)[[0, 1, 1]], np.array([0, 1, 2]))["top1"] == pytest.approx(200 / 3)


def test_evaluate_module_refuses_logits_on_its_ranked_configuration():
    """The default configuration's features are integers: logits would be cast to class "indices"."""
    rng = np.random.default_rng(1)
    logits, labels = rng.normal(size=(6, 4)).astype(np.float32), rng.integers(0, 4, size=6)
    metric = evaluate.load(TOPK_METRIC_PATH)
    for predictions in (logits, logits.tolist(), np.eye(4)[labels]):  # one-hot floats are scores too
        with pytest.raises(ValueError, match="'logits' configuration"):
            metric.compute(predictions=predictions, references=labels, topk=(1,))
    with pytest.raises(ValueError, match="'logits' configuration"):
        metric.add(prediction=logits[0], reference=labels[0])
    ranked = np.argsort(-logits, axis=1, kind="stable")
    assert metric.compute(predictions=ranked.tolist(), references=labels, topk=(1, 4)) == {"top1": pytest.approx(
        _reference_topk(logits, labels, 1)), "top4": 1.0}
