"""Stage 1: tune the slice classifier with Keras Tuner RandomSearch (``bt tune``), then
retrain and ship the best (training/train_classifier.py).

The objective is validation accuracy only; test patients are never looked at until the
shipped model is scored. Re-running the command resumes the search from ``--work-dir``.
For chief/worker tuning set ``KERASTUNER_TUNER_ID``, ``KERASTUNER_ORACLE_IP`` and
``KERASTUNER_ORACLE_PORT`` (docs/training.md); every process runs this same command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import keras
import keras_tuner
import numpy as np
import pandas as pd

from bt_pipeline.atomic import write_text_atomic
from bt_pipeline.config import (
    SHIPPED_CLASSIFIER,
    SHIPPED_UNET,
    ClassifierConfig,
    DataConfig,
    check_preprocessing,
)
from bt_pipeline.data.loader import SplitArrays, classifier_dataset, load_split
from bt_pipeline.data.manifest import read_manifest
from bt_pipeline.models.classifier import build_classifier_from_config, compile_classifier
from bt_pipeline.runtime import add_common_arguments, apply_threads, keras_verbosity
from bt_pipeline.training.cross_validation import SHIPPED_RECIPE
from bt_pipeline.training.search_reports import trials_table, write_search_reports
from bt_pipeline.training.train_classifier import retrain_and_ship

DENSE_ACTIVATIONS = ["relu", "sigmoid", "tanh", "elu"]
# elu and swish keep a gradient for negative inputs, which helps small nets that ReLU can kill.
CONV_ACTIVATIONS = ["relu", "elu", "swish"]


def classifier_kwargs_from_hp(hp: keras_tuner.HyperParameters, n_blocks: int) -> dict:
    """Map hyperparameters to ClassifierConfig fields (the builder's arguments and the LR)."""
    dropout = dict(min_value=0.0, max_value=0.5, step=0.05, default=0.15)
    return {
        "block_dropouts": tuple(hp.Float(f"dropout_{i + 1}", **dropout) for i in range(n_blocks)),
        "dense_dropout": hp.Float("dropout_dense", **dropout),
        "dense_units": hp.Int("dense_units", 64, 512, step=32, default=128),
        "dense_activation": hp.Choice("dense_activation", DENSE_ACTIVATIONS, default="relu"),
        "conv_activation": hp.Choice("conv_activation", CONV_ACTIVATIONS, default="relu"),
        "learning_rate": hp.Float("learning_rate", 1e-4, 1e-2, sampling="log", default=1e-3),
    }


class ClassifierHyperModel(keras_tuner.HyperModel):
    """``build(hp)`` only turns ``hp`` into arguments of the training builder."""

    def __init__(self, config: ClassifierConfig):
        super().__init__(name="slice_classifier")
        self.config = config

    def build(self, hp: keras_tuner.HyperParameters) -> keras.Model:
        config = dataclasses.replace(self.config,
                                     **classifier_kwargs_from_hp(hp, len(self.config.filters)))
        return compile_classifier(build_classifier_from_config(config), config.learning_rate)


class ClassifierSearch(keras_tuner.RandomSearch):
    """RandomSearch whose trials report the mean over executions of each execution's best
    epoch (by val accuracy) and the trial's wall time."""

    def __init__(self, hypermodel, *, seed: int, **kwargs):
        super().__init__(hypermodel, seed=seed, **kwargs)
        self.search_seed = seed

    def run_trial(self, trial, train, val, epochs: int, verbose="auto"):
        started, accuracies, losses = time.monotonic(), [], []
        print(f"trial {trial.trial_id} runs on {self.tuner_id}", flush=True)
        for execution in range(self.executions_per_trial):
            keras.utils.set_random_seed(self.search_seed + 10 * int(trial.trial_id) + execution)
            model = self.hypermodel.build(trial.hyperparameters)
            history = model.fit(train, validation_data=val, epochs=epochs, verbose=verbose)
            best_epoch = int(np.argmax(history.history["val_accuracy"]))
            accuracies.append(history.history["val_accuracy"][best_epoch])
            losses.append(history.history["val_loss"][best_epoch])
        return {"val_accuracy": float(np.mean(accuracies)), "val_loss": float(np.mean(losses)),
                "seconds": time.monotonic() - started}

    def save_model(self, trial_id, model, step=0):  # the best configuration is retrained instead
        pass


def make_tuner(config: ClassifierConfig, work_dir: Path, max_trials: int,
               executions: int, seed: int) -> ClassifierSearch:
    return ClassifierSearch(
        ClassifierHyperModel(config),
        objective=keras_tuner.Objective("val_accuracy", "max"),
        max_trials=max_trials, executions_per_trial=executions, seed=seed,
        directory=str(work_dir), project_name="classifier", overwrite=False,
    )


def config_from_hparams(base: ClassifierConfig, hparams: dict) -> ClassifierConfig:
    """The shipped classifier's config: ``base`` with the tuned values filled in."""
    hp = keras_tuner.HyperParameters()
    for name, value in hparams.items():
        hp.Fixed(name, value)
    kwargs = classifier_kwargs_from_hp(hp, len(base.filters))
    return dataclasses.replace(base, **kwargs)


def run_tuning(data_config: DataConfig, base: ClassifierConfig, out_dir: Path, work_dir: Path,
               trials: int, epochs: int, executions: int, ship_to: Path | None,
               verbose="auto", hparams_file: Path | None = None) -> pd.DataFrame | None:
    """The whole of ``make tune``. Returns the per-split metrics table (None on a worker).

    With ``hparams_file`` (a ``best_hparams.json`` of an earlier search) the search is skipped
    and only the retrain runs, e.g. to retrain the winner at another input size."""
    manifest = read_manifest(data_config.manifest)
    wanted = ("train", "val", "test")
    splits = {name: load_split(manifest, name, data_config) for name in wanted}
    if hparams_file is not None:
        best_hparams = json.loads(hparams_file.read_text(encoding="utf-8"))["hyperparameters"]
    else:
        best_hparams = search(data_config, base, splits, out_dir, work_dir, trials, epochs,
                              executions, verbose)
        if best_hparams is None:
            return None  # a worker: the chief writes the reports and retrains
    config = config_from_hparams(base, best_hparams)
    _, table = retrain_and_ship(config, data_config, splits, work_dir / "retrain", ship_to,
                                verbose)
    write_text_atomic(out_dir / "classifier_metrics.csv",
                      table.to_csv(index=False, lineterminator="\n", float_format="%.4f"))
    return table


def search(data_config: DataConfig, base: ClassifierConfig, splits: dict[str, SplitArrays],
           out_dir: Path, work_dir: Path, trials: int, epochs: int, executions: int,
           verbose) -> dict | None:
    """Run (or resume) the RandomSearch, write its reports; the best hyperparameters, or None
    on a worker process."""
    check_preprocessing(data_config, base)
    tuner = make_tuner(base, work_dir, trials, executions, data_config.seed)
    tuner.search(classifier_dataset(splits["train"], data_config, training=True),
                 classifier_dataset(splits["val"], data_config, training=False),
                 epochs=epochs, verbose=verbose)
    if os.environ.get("KERASTUNER_TUNER_ID", "chief").startswith("tuner"):
        return None
    best_hparams = tuner.get_best_hyperparameters(1)[0].values
    table = trials_table(tuner)
    # Summed over trials, so a resumed search still reports what the whole search cost.
    settings = {"trials": trials, "epochs_per_trial": epochs, "executions_per_trial": executions,
                "image_size": data_config.image_size, "seed": data_config.seed,
                "trial_seconds_total": round(float(table["seconds"].sum()), 1)}
    write_search_reports(table, best_hparams, out_dir, settings)
    return best_hparams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=20, help="epochs per execution")
    parser.add_argument("--executions", type=int, default=2, help="executions per trial")
    parser.add_argument("--retrain-epochs", type=int, default=ClassifierConfig.epochs)
    parser.add_argument("--image-size", type=int, default=ClassifierConfig.image_size)
    parser.add_argument("--convs-per-block", type=int, default=ClassifierConfig.convs_per_block)
    parser.add_argument("--patience", type=int, default=ClassifierConfig.patience,
                        help="early-stopping patience of the retrain (epochs)")
    parser.add_argument("--retrain-from", metavar="JSON",
                        help="skip the search: retrain the hyperparameters of this file (the "
                             "CNN: a search's best_hparams.json; --gate: an earlier gate's JSON, "
                             "whose head and epochs are trained on the new trunks)")
    parser.add_argument("--gate", action="store_true",
                        help="stage 1 on the U-Net's trained encoder (--trunk) instead of the "
                             "from-scratch CNN")
    parser.add_argument("--trunk", default=str(SHIPPED_UNET), metavar="UNET",
                        help="with --gate: the trained U-Net whose encoder the shipped gate "
                             "sits on")
    parser.add_argument("--folds-only", action="store_true",
                        help="with --gate: train the recipe's fold gates only (what its "
                             "cross-validation scores the pipeline with) and ship nothing")
    parser.add_argument("--shipped-only", action="store_true",
                        help="with --gate --retrain-from: train only the shipped gate, the "
                             "fold gates (and their threshold) kept as --folds-only trained "
                             "them")
    parser.add_argument("--recipe", default=SHIPPED_RECIPE,
                        help="with --gate: the U-Net recipe whose cross-validation folds the "
                             "search trains and judges on (one gate per fold)")
    parser.add_argument("--fine-tune-choices", type=int, nargs="+", default=[0, 1],
                        metavar="BLOCKS",
                        help="with --gate: how many top trunk blocks a trial may fine-tune "
                             "(0 = frozen, its features computed once; 1 = the bottleneck "
                             "trains too, far slower)")
    parser.add_argument("--cv-dir", default="reports/cv",
                        help="with --gate: where the recipe's fold U-Nets are")
    parser.add_argument("--out-dir", default="tuning")
    parser.add_argument("--work-dir", default="tuning/work")
    parser.add_argument("--ship-to", default=None, metavar="KERAS",
                        help="where the retrained best model and its JSON go (default: "
                             "<out-dir>/gate.keras or classifier.keras; the shipped stage 1, "
                             f"{SHIPPED_CLASSIFIER}, only when named here: make tune)")


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    if args.ship_to is None:  # nothing shipped unless asked for
        args.ship_to = str(Path(args.out_dir) / ("gate.keras" if args.gate else
                                                 "classifier.keras"))
    if args.gate:
        from bt_pipeline.training.tune_gate import run_gate_tuning

        data_config = DataConfig(data_root=args.data_dir, manifest=args.manifest,
                                 seed=args.seed)
        trunk = None if args.folds_only else Path(args.trunk)
        table = run_gate_tuning(data_config, args.recipe, Path(args.cv_dir), trunk,
                                Path(args.out_dir), Path(args.work_dir), args.trials,
                                args.epochs, args.executions, Path(args.ship_to),
                                keras_verbosity(), tuple(args.fine_tune_choices),
                                Path(args.retrain_from) if args.retrain_from else None,
                                args.shipped_only)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        if trunk is not None:
            print(f"gate: {args.ship_to}; reports in {args.out_dir}/")
        else:
            print(f"fold gates: {Path(args.cv_dir) / args.recipe / 'models'}/; "
                  f"reports in {args.out_dir}/")
        return 0
    data_config = DataConfig(data_root=args.data_dir, manifest=args.manifest,
                             image_size=args.image_size, seed=args.seed,
                             context_slices=args.context_slices)
    base = ClassifierConfig(image_size=args.image_size, epochs=args.retrain_epochs,
                            patience=args.patience, convs_per_block=args.convs_per_block,
                            context_slices=args.context_slices, seed=args.seed)
    hparams_file = Path(args.retrain_from) if args.retrain_from else None
    table = run_tuning(data_config, base, Path(args.out_dir), Path(args.work_dir),
                       args.trials, args.epochs, args.executions, Path(args.ship_to),
                       keras_verbosity(), hparams_file)
    if table is not None:
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        print(f"classifier: {args.ship_to}; reports in {args.out_dir}/")
    return 0
