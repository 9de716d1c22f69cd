"""Slice-classifier metrics and the decision-threshold rule."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, log_loss, roc_auc_score


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray,
                           threshold: float) -> dict[str, float]:
    """Loss, accuracy, ROC AUC, sensitivity, specificity and the confusion matrix counts."""
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


def choose_threshold(labels: np.ndarray, probabilities: np.ndarray,
                     min_sensitivity: float) -> float:
    """The highest threshold whose sensitivity on these (validation) slices is at least
    ``min_sensitivity``.

    A missed tumour slice loses that slice's mask, a false alarm only costs one U-Net pass that
    should come back empty, so sensitivity is held at a floor and, above it, the threshold is
    pushed as high as possible to keep false alarms down.
    """
    labels = np.asarray(labels).astype(int).ravel()
    probabilities = np.asarray(probabilities, dtype=np.float64).ravel()
    positives = np.sort(probabilities[labels == 1])
    if positives.size == 0:
        return 0.5
    allowed_misses = int(np.floor((1.0 - min_sensitivity) * positives.size))
    # Every positive from index allowed_misses up must stay above the threshold. Placing it
    # half-way down to the next lower probability of any slice (not exactly on that positive)
    # keeps the decision from flipping on float noise, e.g. a different batch composition.
    boundary = positives[allowed_misses]
    below = probabilities[probabilities < boundary]
    return float((boundary + below.max()) / 2) if below.size else float(boundary)
