"""Stage 1 after the search: retrain the chosen classifier, choose its decision threshold on
val, score every split, ship it with its config (``bt tune`` runs this after its search)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from bt_pipeline.config import ClassifierConfig, DataConfig, check_preprocessing
from bt_pipeline.data.loader import SplitArrays, classifier_dataset
from bt_pipeline.evaluation.metrics import classification_metrics
from bt_pipeline.models.classifier import build_classifier_from_config, compile_classifier
from bt_pipeline.training.callbacks import ship_model, stopped_early, training_callbacks


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


def predict_probabilities(model: keras.Model, arrays: SplitArrays, config: DataConfig):
    plain = dataclasses.replace(config, augment=False)
    return model.predict(classifier_dataset(arrays, plain, training=False), verbose=0).ravel()


def retrain_and_ship(config: ClassifierConfig, data_config: DataConfig,
                     splits: dict[str, SplitArrays], run_dir: Path, ship_to: Path | None,
                     verbose="auto") -> tuple[keras.Model, pd.DataFrame]:
    """Train ``config`` with early stopping on val AUC, choose the threshold on val, score every
    split, ship the model with its config. Returns the model and the per-split metrics."""
    check_preprocessing(data_config, config)
    keras.utils.set_random_seed(config.seed)
    model = compile_classifier(build_classifier_from_config(config), config.learning_rate)
    started = time.monotonic()
    train = classifier_dataset(splits["train"], data_config, training=True)
    val = classifier_dataset(splits["val"], data_config, training=False)
    # Selected on val ROC AUC: the threshold is set on val afterwards, so what the checkpoint
    # must get right is the ranking of slices, not the loss at 0.5.
    if stopped_early(run_dir / "log.csv", "val_auc", "max", config.patience):
        print(f"{run_dir}: early stopping already ended this retrain; scoring its best model")
    else:
        model.fit(train, validation_data=val, epochs=config.epochs, verbose=verbose,
                  callbacks=training_callbacks(run_dir, "val_auc", "max", config.patience))
    model = keras.saving.load_model(run_dir / "best.keras")
    wall = time.monotonic() - started
    table = threshold_score_and_ship(model, config, data_config, splits, ship_to,
                                     {"retrain_wall_seconds": round(wall, 1)})
    return model, table


def threshold_score_and_ship(model: keras.Model, config: ClassifierConfig,
                             data_config: DataConfig, splits: dict[str, SplitArrays],
                             ship_to: Path | None, facts: dict) -> pd.DataFrame:
    """Choose the decision threshold on val, score every split with it, ship the model with
    its config (threshold and metrics included). Returns the per-split metrics."""
    probabilities = {name: predict_probabilities(model, arrays, data_config)
                     for name, arrays in splits.items()}
    threshold = choose_threshold(splits["val"].labels, probabilities["val"],
                                 config.min_val_sensitivity)
    config = dataclasses.replace(config, threshold=threshold)
    table = pd.DataFrame([{"split": name, **classification_metrics(arrays.labels,
                                                                   probabilities[name], threshold)}
                          for name, arrays in splits.items()])
    if ship_to is not None:
        ship_model(model, ship_to, config, {
            **facts, "data": dataclasses.asdict(data_config),
            "parameters": int(model.count_params()),
            "metrics": table.set_index("split").to_dict(orient="index")})
    return table

