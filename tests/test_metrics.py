import numpy as np
import pytest

from bt_pipeline.evaluation.metrics import classification_metrics
from bt_pipeline.training.train_classifier import choose_threshold


def test_threshold_keeps_the_sensitivity_floor_with_a_margin():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    probs = np.array([0.9, 0.8, 0.4, 0.2, 0.7, 0.3, 0.1, 0.05])
    # A floor of 0.75 allows one miss of four: the 0.2 positive. The threshold sits half-way
    # between the 0.4 positive and the next lower probability (0.3).
    assert choose_threshold(labels, probs, 0.75) == pytest.approx(0.35)
    # Full sensitivity: below the 0.2 positive, half-way to 0.1.
    assert choose_threshold(labels, probs, 1.0) == pytest.approx(0.15)
    metrics = classification_metrics(labels, probs, 0.35)
    assert (metrics["tp"], metrics["fn"], metrics["fp"], metrics["tn"]) == (3, 1, 1, 3)
    assert metrics["sensitivity"] == 0.75 and metrics["specificity"] == 0.75
    assert metrics["accuracy"] == 0.75


def test_threshold_survives_float_noise():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    probs = rng.random(500)
    threshold = choose_threshold(labels, probs, 0.97)
    noisy = probs + rng.normal(0, 1e-6, 500)
    assert classification_metrics(labels, noisy, threshold)["sensitivity"] >= 0.97
