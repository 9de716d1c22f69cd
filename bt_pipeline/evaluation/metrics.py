"""NumPy metrics: the slice classifier's (loss, accuracy, AUC, sensitivity, ...) and the
masks' Dice and IoU. A leaf module: training, inference and evaluation all score with it."""

from __future__ import annotations

import numpy as np


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray,
                           threshold: float) -> dict[str, float]:
    """Loss, accuracy, ROC AUC, sensitivity, specificity and the confusion matrix counts."""
    from sklearn.metrics import confusion_matrix, log_loss, roc_auc_score  # slow to import

    labels = np.asarray(labels).astype(int).ravel()
    probabilities = np.clip(np.asarray(probabilities, dtype=np.float64).ravel(), 1e-7, 1 - 1e-7)
    predicted = (probabilities >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    both_classes = len(np.unique(labels)) == 2
    return {
        "n": int(labels.size),
        "loss": float(log_loss(labels, probabilities, labels=[0, 1])),
        "accuracy": float((tp + tn) / labels.size),
        "auc": float(roc_auc_score(labels, probabilities)) if both_classes else float("nan"),
        "sensitivity": float(tp / (tp + fn)) if tp + fn else float("nan"),
        "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
        "tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn),
        "threshold": float(threshold),
    }


def dice_score(truth: np.ndarray, prediction: np.ndarray) -> float:
    """Dice of two binary NumPy arrays (any shape); 1.0 when both are empty."""
    truth, prediction = truth.astype(bool), prediction.astype(bool)
    total = int(truth.sum()) + int(prediction.sum())
    return 1.0 if total == 0 else 2.0 * int((truth & prediction).sum()) / total


def iou_score(truth: np.ndarray, prediction: np.ndarray) -> float:
    """IoU of two binary NumPy arrays (any shape); 1.0 when both are empty."""
    truth, prediction = truth.astype(bool), prediction.astype(bool)
    union = int((truth | prediction).sum())
    return 1.0 if union == 0 else int((truth & prediction).sum()) / union
