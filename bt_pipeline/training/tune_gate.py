"""Stage 1 on the U-Net's encoder (``bt tune --gate``): RandomSearch over the gate's head and
how many trunk blocks fine-tune, on trunk features computed once; then the winner retrained,
its threshold chosen on val, scored on every split and shipped with its config.

The frozen part of the trunk never changes, so its output for every slice is computed once
per cut (one cut per ``fine_tune_blocks`` value) and each trial trains only what lies above it:
seconds per epoch instead of minutes. Trunk features carry no augmentation; the head's dropout
and early stopping on val ROC AUC stand in for it. Selection is by val patients, whom neither
the shipped U-Net nor the head trained on; test patients are only scored.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import keras
import keras_tuner
import numpy as np
import pandas as pd

from bt_pipeline.atomic import write_text_atomic
from bt_pipeline.config import GateConfig, UNetConfig, load_json
from bt_pipeline.data.loader import SplitArrays, load_split
from bt_pipeline.data.manifest import read_manifest
from bt_pipeline.evaluation.metrics import classification_metrics
from bt_pipeline.models.gate import Gate, build_gate_from_config, cut_layer_name, fingerprint
from bt_pipeline.training.callbacks import ship_model
from bt_pipeline.training.search_reports import trials_table, write_search_reports
from bt_pipeline.training.train_classifier import choose_threshold

DENSE_ACTIVATIONS = ["relu", "sigmoid", "tanh", "elu"]
#: Trunk blocks that may fine-tune: the bottleneck (1) at most; deeper cuts cost minutes per
#: epoch on 2 cores, which the full 20 x 20 x 2 budget cannot afford.
FINE_TUNE_CHOICES = [0, 1]


def gate_kwargs_from_hp(hp: keras_tuner.HyperParameters) -> dict:
    """Map hyperparameters to GateConfig fields (the builder's arguments and the LR)."""
    dropout = dict(min_value=0.0, max_value=0.5, step=0.05, default=0.2)
    return {
        "fine_tune_blocks": hp.Choice("fine_tune_blocks", FINE_TUNE_CHOICES, default=0),
        "feature_dropout": hp.Float("dropout_features", **dropout),
        "dense_dropout": hp.Float("dropout_dense", **dropout),
        "dense_units": hp.Int("dense_units", 32, 512, step=32, default=128),
        "dense_activation": hp.Choice("dense_activation", DENSE_ACTIVATIONS, default="relu"),
        "learning_rate": hp.Float("learning_rate", 1e-4, 1e-2, sampling="log", default=1e-3),
    }


def compile_head(gate: Gate, learning_rate: float) -> keras.Model:
    gate.head.compile(optimizer=keras.optimizers.Adam(learning_rate),
                      loss="binary_crossentropy",
                      metrics=[keras.metrics.BinaryAccuracy(name="accuracy"),
                               keras.metrics.AUC(name="auc")])
    return gate.head


class GateHyperModel(keras_tuner.HyperModel):
    """``build(hp)`` only turns ``hp`` into the gate builder's arguments; it returns the part
    that trains (fine-tuned blocks and head), fed by cached trunk features."""

    def __init__(self, unet: keras.Model, config: GateConfig):
        super().__init__(name="encoder_gate")
        self.unet, self.config = unet, config

    def gate(self, hp: keras_tuner.HyperParameters) -> tuple[Gate, GateConfig]:
        config = dataclasses.replace(self.config, **gate_kwargs_from_hp(hp))
        return build_gate_from_config(self.unet, config), config

    def build(self, hp: keras_tuner.HyperParameters) -> keras.Model:
        gate, config = self.gate(hp)
        return compile_head(gate, config.learning_rate)


class TrunkFeatures:
    """Each split's trunk output at each cut, computed on first use and kept in memory."""

    def __init__(self, unet: keras.Model, splits: dict[str, SplitArrays], batch_size: int = 32):
        self.unet, self.splits, self.batch_size = unet, splits, batch_size
        self._cache: dict[tuple[int, str], np.ndarray] = {}

    def get(self, fine_tune_blocks: int, split: str) -> np.ndarray:
        key = (fine_tune_blocks, split)
        if key not in self._cache:
            cut = self.unet.get_layer(cut_layer_name(self.unet, fine_tune_blocks))
            trunk = keras.Model(self.unet.inputs, cut.output)
            self._cache[key] = trunk.predict(self.splits[split].images,
                                             batch_size=self.batch_size, verbose=0)
        return self._cache[key]


class GateSearch(keras_tuner.RandomSearch):
    """RandomSearch whose trials train on cached trunk features and report the mean over
    executions of each execution's best val ROC AUC, and the trial's wall time."""

    def __init__(self, hypermodel: GateHyperModel, features: TrunkFeatures, *, seed: int,
                 **kwargs):
        super().__init__(hypermodel, seed=seed, **kwargs)
        self.features, self.search_seed = features, seed

    def run_trial(self, trial, epochs: int, batch_size: int, verbose="auto"):
        started, aucs, losses = time.monotonic(), [], []
        k = trial.hyperparameters.get("fine_tune_blocks")
        train, val = self.features.get(k, "train"), self.features.get(k, "val")
        labels = {name: self.features.splits[name].labels for name in ("train", "val")}
        for execution in range(self.executions_per_trial):
            keras.utils.set_random_seed(self.search_seed + 10 * int(trial.trial_id) + execution)
            head = self.hypermodel.build(trial.hyperparameters)
            history = head.fit(train, labels["train"], validation_data=(val, labels["val"]),
                               epochs=epochs, batch_size=batch_size, shuffle=True,
                               verbose=verbose)
            best = int(np.argmax(history.history["val_auc"]))
            aucs.append(history.history["val_auc"][best])
            losses.append(history.history["val_loss"][best])
        return {"val_auc": float(np.mean(aucs)), "val_loss": float(np.mean(losses)),
                "seconds": time.monotonic() - started, "epochs": epochs,
                "executions": self.executions_per_trial}

    def save_model(self, trial_id, model, step=0):  # the best configuration is retrained
        pass


def make_gate_tuner(unet: keras.Model, config: GateConfig, features: TrunkFeatures,
                    work_dir: Path, max_trials: int, executions: int) -> GateSearch:
    return GateSearch(GateHyperModel(unet, config), features,
                      objective=keras_tuner.Objective("val_auc", "max"),
                      max_trials=max_trials, executions_per_trial=executions, seed=config.seed,
                      directory=str(work_dir), project_name="gate", overwrite=False)


def retrain_gate(unet: keras.Model, config: GateConfig, features: TrunkFeatures,
                 verbose="auto") -> Gate:
    """Train ``config``'s gate on the train split's trunk features, keeping the epoch with the
    best val ROC AUC."""
    keras.utils.set_random_seed(config.seed)
    gate = build_gate_from_config(unet, config)
    head = compile_head(gate, config.learning_rate)
    k, splits = config.fine_tune_blocks, features.splits
    head.fit(features.get(k, "train"), splits["train"].labels,
             validation_data=(features.get(k, "val"), splits["val"].labels),
             epochs=config.epochs, batch_size=config.batch_size, shuffle=True, verbose=verbose,
             callbacks=[keras.callbacks.EarlyStopping("val_auc", mode="max",
                                                      patience=config.patience,
                                                      restore_best_weights=True)])
    return gate


def threshold_score_and_ship_gate(gate: Gate, config: GateConfig, features: TrunkFeatures,
                                  ship_to: Path | None, facts: dict) -> pd.DataFrame:
    """Threshold by the sensitivity rule on val, every split scored, the whole gate (trunk and
    head) shipped with its config. Returns the per-split metrics."""
    k, splits = config.fine_tune_blocks, features.splits
    probabilities = {name: gate.head.predict(features.get(k, name), batch_size=256,
                                             verbose=0).ravel() for name in splits}
    threshold = choose_threshold(splits["val"].labels, probabilities["val"],
                                 config.min_val_sensitivity)
    config = dataclasses.replace(config, threshold=threshold,
                                 unet_fingerprint=fingerprint(features.unet))
    table = pd.DataFrame([{"split": name, **classification_metrics(arrays.labels,
                                                                   probabilities[name], threshold)}
                          for name, arrays in splits.items()])
    if ship_to is not None:
        ship_model(gate.full, ship_to, config, {
            **facts, "parameters": int(gate.full.count_params()),
            "trainable_parameters": int(sum(np.prod(w.shape)
                                            for w in gate.head.trainable_weights)),
            "metrics": table.set_index("split").to_dict(orient="index")})
    return table


def run_gate_tuning(data_config, unet_path: Path, out_dir: Path, work_dir: Path, trials: int,
                    epochs: int, executions: int, ship_to: Path | None,
                    verbose="auto") -> pd.DataFrame | None:
    """The whole of ``bt tune --gate``: search, retrain the winner, threshold, score, ship.
    Returns the per-split metrics table."""
    if not Path(unet_path).is_file():
        raise FileNotFoundError(f"{unet_path}: no trained U-Net; the gate is built on one, so "
                                "train it first (make train-unet), then make tune")
    unet = keras.saving.load_model(unet_path, compile=False)
    preprocessing = load_json(Path(unet_path).with_suffix(".json"), UNetConfig).preprocessing
    data_config = dataclasses.replace(data_config, image_size=preprocessing.image_size,
                                      context_slices=preprocessing.context_slices,
                                      tv_weight=preprocessing.tv_weight)
    manifest = read_manifest(data_config.manifest)
    splits = {name: load_split(manifest, name, data_config) for name in ("train", "val", "test")}
    base = GateConfig(image_size=preprocessing.image_size,
                      context_slices=preprocessing.context_slices,
                      tv_weight=preprocessing.tv_weight, epochs=epochs, seed=data_config.seed)
    features = TrunkFeatures(unet, splits)
    tuner = make_gate_tuner(unet, base, features, work_dir, trials, executions)
    started = time.monotonic()
    tuner.search(epochs=epochs, batch_size=base.batch_size, verbose=verbose)
    best = tuner.get_best_hyperparameters(1)[0]
    table = trials_table(tuner, objective="val_auc", extra=("epochs", "executions"))
    settings = {"trials": trials, "epochs_per_trial": epochs, "executions_per_trial": executions,
                "image_size": preprocessing.image_size, "seed": data_config.seed,
                "trunk": str(unet_path), "objective": "val_auc",
                "trial_seconds_total": round(float(table["seconds"].sum()), 1)}
    write_search_reports(table, best.values, out_dir, settings, objective="val_auc")
    config = dataclasses.replace(base, **gate_kwargs_from_hp(best))
    gate = retrain_gate(unet, config, features, verbose)
    metrics = threshold_score_and_ship_gate(gate, config, features, ship_to, {
        "data": dataclasses.asdict(data_config), "trunk": str(unet_path),
        "search_and_retrain_wall_seconds": round(time.monotonic() - started, 1)})
    write_text_atomic(out_dir / "gate_metrics.csv",
                      metrics.to_csv(index=False, lineterminator="\n", float_format="%.4f"))
    return metrics
