"""The reference study's experiments, regenerated on this machine (``bt experiments``).

1. learning rate {0.1, 0.01, 0.0001} x batch normalisation {on, off}: train and val loss curves;
2. batch size {16, 32, 64} x learning rate {0.0001, 0.1}: train and val loss curves;
3. the study's next steps against a baseline, each scored on the val patients the way
   ``make evaluate`` scores the shipped models (per-patient Dice at the original 256x256 grid):
   Total Variation denoising of the input (trained and run with it), an ensemble of N U-Nets
   (seeds differ), flip test-time augmentation, and ensemble + flips.

Every run is a U-Net at an experiment scale (input size, base width: arguments) so that the
tables fit a 2-core CPU; the scale and epoch counts are written next to the results. Runs are
seeded; a finished run is kept (curves and model) and skipped when the command is run again,
so an interrupted run of the command loses at most the run in progress.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from bt_pipeline.atomic import write_text_atomic, write_with
from bt_pipeline.config import (
    BASELINE_CLASSIFIER,
    ClassifierConfig,
    DataConfig,
    UNetConfig,
    load_json,
)
from bt_pipeline.data.loader import SplitArrays, load_split, unet_dataset
from bt_pipeline.data.manifest import read_manifest
from bt_pipeline.evaluation.scoring import predict_split, score_split, summarise
from bt_pipeline.inference.predictor import TwoStagePredictor, load_model_file
from bt_pipeline.models.unet import build_unet, compile_unet
from bt_pipeline.reports import plt, save_figure, write_summary
from bt_pipeline.runtime import add_common_arguments, apply_threads, keras_verbosity

LR_BN_RATES = (0.1, 0.01, 0.0001)
BATCH_SIZES = (16, 32, 64)
BATCH_RATES = (0.0001, 0.1)


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the experiment U-Net."""

    table: str
    learning_rate: float
    batch_norm: bool = True
    batch_size: int = 32
    epochs: int = 30
    tv_weight: float = 0.0
    seed: int = 1337

    @property
    def name(self) -> str:
        return (f"{self.table}-lr{self.learning_rate:g}-bn{int(self.batch_norm)}"
                f"-bs{self.batch_size}-tv{self.tv_weight:g}-s{self.seed}-e{self.epochs}")


@dataclasses.dataclass(frozen=True)
class Scale:
    """The experiment U-Net's size; every run of one command shares it."""

    image_size: int = 64
    depth: int = 4
    base_filters: int = 8


def planned_runs(epochs_lr_bn: int, epochs_batch: int, epochs_options: int,
                 ensemble_size: int, tv_weight: float, seed: int) -> list[Run]:
    """Every run the three tables need, in the order they are trained."""
    if tv_weight <= 0 or ensemble_size < 2:
        raise ValueError("the options table needs --tv-weight > 0 and --ensemble-size >= 2")
    runs = [Run("lr_bn", rate, bn, 32, epochs_lr_bn, seed=seed)
            for rate in LR_BN_RATES for bn in (True, False)]
    runs += [Run("batch_lr", rate, True, size, epochs_batch, seed=seed)
             for rate in BATCH_RATES for size in BATCH_SIZES]
    base = dict(table="options", learning_rate=1e-3, epochs=epochs_options)
    runs += [Run(**base, seed=seed + k) for k in range(ensemble_size)]
    runs.append(Run(**base, tv_weight=tv_weight, seed=seed))
    return runs


class _Splits:
    """Train/val arrays per TV weight, decoded (or read from cache) once."""

    def __init__(self, manifest: pd.DataFrame, data: DataConfig):
        self.manifest, self.data, self.cache = manifest, data, {}

    def get(self, tv_weight: float) -> dict[str, SplitArrays]:
        if tv_weight not in self.cache:
            config = dataclasses.replace(self.data, tv_weight=tv_weight)
            self.cache[tv_weight] = {s: load_split(self.manifest, s, config)
                                     for s in ("train", "val")}
        return self.cache[tv_weight]


def train_run(run: Run, scale: Scale, splits: dict[str, SplitArrays], data: DataConfig,
              verbose) -> tuple[keras.Model, pd.DataFrame]:
    """Train one run for exactly ``run.epochs`` epochs (no early stopping: the curves are the
    result) and return the model and one row per epoch."""
    keras.utils.set_random_seed(run.seed)
    config = dataclasses.replace(data, batch_size=run.batch_size, seed=run.seed,
                                 tv_weight=run.tv_weight)
    train = unet_dataset(splits["train"], config, training=True)
    val = unet_dataset(splits["val"], dataclasses.replace(config, augment=False), training=False)
    model = compile_unet(build_unet(scale.image_size, scale.depth, scale.base_filters,
                                    run.batch_norm, channels=data.channels), run.learning_rate)
    started = time.monotonic()
    history = model.fit(train, validation_data=val, epochs=run.epochs, verbose=verbose,
                        callbacks=[keras.callbacks.TerminateOnNaN()])
    seconds = time.monotonic() - started
    curves = pd.DataFrame(history.history)
    curves.insert(0, "epoch", np.arange(1, len(curves) + 1))
    for key, value in reversed(dataclasses.asdict(run).items()):
        curves.insert(0, key, value)
    curves.insert(0, "run", run.name)
    curves["run_seconds"] = round(seconds, 1)
    return model, curves


def curves_table(curves: pd.DataFrame, group: str) -> pd.DataFrame:
    """One row per run of ``group``: final and best losses, best val Dice, wall time."""
    rows = []
    for _, run in curves[curves["table"] == group].groupby("run", sort=False):
        rows.append({
            "learning_rate": run["learning_rate"].iloc[0], "batch_norm": run["batch_norm"].iloc[0],
            "batch_size": run["batch_size"].iloc[0], "epochs_run": len(run),
            "train_loss_last": run["loss"].iloc[-1], "val_loss_last": run["val_loss"].iloc[-1],
            "val_loss_best": run["val_loss"].min(),
            "val_dice_best": run["val_dice_metric"].max(),
            "seconds": run["run_seconds"].iloc[0]})
    return pd.DataFrame(rows)


def curves_figure(curves: pd.DataFrame, group: str, panel: str, line: str,
                  out: Path) -> str:
    """Train (solid) and val (dashed) loss per epoch: one panel per ``panel`` value, one colour
    per ``line`` value."""
    runs = curves[curves["table"] == group]
    panels = sorted(runs[panel].unique(), reverse=True)
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, value in zip(axes[0], panels, strict=True):
        for colour, (label, run) in enumerate(runs[runs[panel] == value].groupby(line)):
            ax.plot(run["epoch"], run["loss"], color=f"C{colour}", label=f"{line}={label} train")
            ax.plot(run["epoch"], run["val_loss"], color=f"C{colour}", linestyle="--",
                    label=f"{line}={label} val")
        # log scale: a diverging run (loss 1e6 at lr 0.1) must not flatten the others
        ax.set(title=f"{panel} = {value:g}", xlabel="epoch", ylabel="BCE + Dice loss (log)",
               yscale="log")
        ax.legend(fontsize=7)
    return save_figure(figure, out / f"{group}_curves.png")


def score_options(models: dict[Run, keras.Model], runs: list[Run], scale: Scale,
                  manifest: pd.DataFrame, data_root: str, ensemble_size: int,
                  tv_weight: float, classifier_path=BASELINE_CLASSIFIER) -> pd.DataFrame:
    """Val scores of the baseline and of each next-step option, scored as ``make evaluate``
    scores (per patient, at each slice's original grid), gated by the baseline's copy of the
    from-scratch classifier (an encoder gate runs only on the U-Net it was built on)."""
    classifier = load_model_file(classifier_path)
    classifier_config = load_json(Path(classifier_path).with_suffix(".json"), ClassifierConfig)
    unet_config = UNetConfig(image_size=scale.image_size, depth=scale.depth,
                             base_filters=scale.base_filters)
    options = [run for run in runs if run.table == "options"]
    plain = [run for run in options if run.tv_weight == 0][:ensemble_size]
    denoised = next(run for run in options if run.tv_weight > 0)
    variants = {
        "baseline": dict(unets=plain[:1]),
        f"TV denoising (weight {tv_weight:g})": dict(unets=[denoised], tv=tv_weight),
        f"ensemble of {ensemble_size}": dict(unets=plain),
        "flip TTA": dict(unets=plain[:1], flips=True),
        f"ensemble of {ensemble_size} + flip TTA": dict(unets=plain, flips=True),
    }
    rows = []
    for label, variant in variants.items():
        members = [models[run] for run in variant["unets"]]
        config = dataclasses.replace(unet_config, tv_weight=variant.get("tv", 0.0))
        predictor = TwoStagePredictor(classifier, members[0], classifier_config, config,
                                      extra_unets=tuple(members[1:]),
                                      tta_flips=variant.get("flips", False))
        started = time.monotonic()
        predictions = predict_split(predictor, manifest, "val", data_root)
        seconds = time.monotonic() - started
        summary = summarise(*score_split(predictor, predictions, "val")).iloc[0]
        rows.append({"option": label, "val_dice_unet_mean": summary["dice_unet_mean"],
                     "val_iou_unet_pooled": summary["iou_unet_pooled"],
                     "val_dice_pipeline_mean": summary["dice_pipeline_mean"],
                     "val_predict_seconds": round(seconds, 1)})
    table = pd.DataFrame(rows)
    table["delta_dice_unet_vs_baseline"] = (table["val_dice_unet_mean"]
                                            - table["val_dice_unet_mean"].iloc[0])
    return table


def run_experiments(data: DataConfig, scale: Scale, out: Path, epochs_lr_bn: int,
                    epochs_batch: int, epochs_options: int, ensemble_size: int = 3,
                    tv_weight: float = 0.1, verbose="auto",
                    classifier_path=BASELINE_CLASSIFIER) -> dict[str, pd.DataFrame]:
    """Train every planned run not already done, then write the tables, figures and summary."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(data.manifest)
    data = dataclasses.replace(data, image_size=scale.image_size)
    runs = planned_runs(epochs_lr_bn, epochs_batch, epochs_options, ensemble_size, tv_weight,
                        data.seed)
    curves_file = out / "curves.csv"
    curves = pd.read_csv(curves_file) if curves_file.is_file() else pd.DataFrame()
    splits, models = _Splits(manifest, data), {}
    for number, run in enumerate(runs, start=1):
        model_file = out / "models" / f"{run.name}.keras"
        done = not curves.empty and run.name in set(curves["run"])
        if done and model_file.is_file():
            print(f"[{number}/{len(runs)}] {run.name}: done earlier, kept", flush=True)
            models[run] = load_model_file(model_file)
            continue
        print(f"[{number}/{len(runs)}] {run.name}: training", flush=True)
        model, run_curves = train_run(run, scale, splits.get(run.tv_weight), data, verbose)
        models[run] = model
        write_with(model_file, lambda tmp, m=model: m.save(tmp), suffix=".keras")
        if not curves.empty:
            curves = curves[curves["run"] != run.name]
        curves = pd.concat([curves, run_curves], ignore_index=True)
        write_text_atomic(curves_file, curves.to_csv(index=False, lineterminator="\n"))
    # curves.csv keeps runs of earlier settings too; the report covers this call's runs only
    curves = curves[curves["run"].isin({run.name for run in runs})]
    tables = {"lr_bn": curves_table(curves, "lr_bn"),
              "batch_lr": curves_table(curves, "batch_lr"),
              "options": score_options(models, runs, scale, manifest, data.data_root,
                                       ensemble_size, tv_weight, classifier_path)}
    figures = [curves_figure(curves, "lr_bn", "learning_rate", "batch_norm", out),
               curves_figure(curves, "batch_lr", "learning_rate", "batch_size", out)]
    settings = {"scale": dataclasses.asdict(scale), "epochs_lr_bn": epochs_lr_bn,
                "epochs_batch": epochs_batch, "epochs_options": epochs_options,
                "ensemble_size": ensemble_size, "tv_weight": tv_weight, "seed": data.seed,
                "train_seconds_total": round(float(curves.groupby("run")["run_seconds"]
                                                   .first().sum()), 1)}
    write_report(tables, figures, settings, out)
    return tables


def write_report(tables: dict[str, pd.DataFrame], figures: list[str], settings: dict,
                 out: Path) -> None:
    titles = {"lr_bn": "Learning rate x batch normalisation",
              "batch_lr": "Batch size x learning rate",
              "options": "Next steps on val (per-patient Dice at 256x256; the shipped "
                         "classifier gates the pipeline column)"}
    for name, table in tables.items():
        write_text_atomic(out / f"{name}.csv", table.to_csv(index=False, lineterminator="\n",
                                                             float_format="%.5g"))
    write_text_atomic(out / "settings.json", json.dumps(settings, indent=2) + "\n")
    write_summary(out / "summary.md", "bt_pipeline experiments",
                  [f"Settings: `{json.dumps(settings, sort_keys=True)}`"], tables, figures, titles)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--out", default="reports/experiments")
    parser.add_argument("--image-size", type=int, default=Scale.image_size)
    parser.add_argument("--base-filters", type=int, default=Scale.base_filters)
    parser.add_argument("--depth", type=int, default=Scale.depth)
    parser.add_argument("--epochs-lr-bn", type=int, default=100, help="reference: 100")
    parser.add_argument("--epochs-batch", type=int, default=30, help="reference: 30")
    parser.add_argument("--epochs-options", type=int, default=30)
    parser.add_argument("--ensemble-size", type=int, default=3)
    parser.add_argument("--tv-weight", type=float, default=0.1)


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    # Nearest-neighbour masks: the committed reports/experiments tables were measured so.
    data = DataConfig(data_root=args.data_dir, manifest=args.manifest, seed=args.seed,
                      context_slices=args.context_slices, mask_resize="nearest")
    scale = Scale(args.image_size, args.depth, args.base_filters)
    tables = run_experiments(data, scale, Path(args.out), args.epochs_lr_bn,
                             args.epochs_batch, args.epochs_options, args.ensemble_size,
                             args.tv_weight, keras_verbosity())
    for name, table in tables.items():
        print(f"\n{name}\n" + table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\nreport: {Path(args.out) / 'summary.md'}")
    return 0
