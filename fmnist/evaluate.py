"""Accuracy, per-class precision/recall/F1 and the confusion matrix. No Ray."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Evaluation:
    """Scores of predictions against labels. `confusion[i, j]`: true class i predicted as j."""

    accuracy: float
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray
    confusion: np.ndarray
    class_names: tuple[str, ...]

    def per_class(self) -> list[dict[str, Any]]:
        """One dict per class: name, precision, recall, f1, support."""
        return [
            {"class": name, "precision": float(p), "recall": float(r), "f1": float(f),
             "support": int(s)}
            for name, p, r, f, s in zip(
                self.class_names, self.precision, self.recall, self.f1, self.support, strict=True
            )
        ]


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts of (true, predicted) pairs, shape (num_classes, num_classes)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"labels {y_true.shape} and predictions {y_pred.shape} differ in shape")
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def score(y_true: np.ndarray, y_pred: np.ndarray, class_names: tuple[str, ...]) -> Evaluation:
    """Score predicted class ids against true ones. A class never predicted has precision 0."""
    k = len(class_names)
    cm = confusion_matrix(y_true, y_pred, k)
    tp = np.diag(cm).astype(float)
    predicted = cm.sum(axis=0).astype(float)
    actual = cm.sum(axis=1).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(actual > 0, tp / actual, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    total = cm.sum()
    return Evaluation(
        accuracy=float(tp.sum() / total) if total else 0.0,
        precision=precision,
        recall=recall,
        f1=f1,
        support=actual.astype(np.int64),
        confusion=cm,
        class_names=tuple(class_names),
    )


def evaluate(model: Any, x: np.ndarray, y: np.ndarray, class_names: tuple[str, ...],
             batch_size: int = 1024) -> tuple[Evaluation, np.ndarray]:
    """Predict with a Keras model and score; also returns the class probabilities."""
    probs = np.asarray(model.predict(x, batch_size=batch_size, verbose=0))
    return score(y, probs.argmax(axis=1), class_names), probs
