"""Train the U-Net on the manifest's train split, select on val, ship it with its config
(``bt train-unet``). Re-running the same command after a kill resumes from the last completed
epoch."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import keras
import numpy as np

from bt_pipeline.config import (
    SHIPPED_UNET,
    DataConfig,
    UNetConfig,
    check_preprocessing,
    save_json,
)
from bt_pipeline.data.loader import load_patients, load_split, unet_dataset
from bt_pipeline.data.manifest import read_manifest
from bt_pipeline.data.preprocess import MASK_RESIZE
from bt_pipeline.models.losses import LOSSES
from bt_pipeline.models.precision import TRAINING_PRECISIONS, resolve_precision, with_dtype_policy
from bt_pipeline.models.unet import build_unet_from_config, compile_unet
from bt_pipeline.runtime import add_common_arguments, apply_threads, keras_verbosity
from bt_pipeline.training.callbacks import (
    logged_values,
    make_strategy,
    ship_model,
    stopped_early,
    training_callbacks,
)


def train_unet(data_config: DataConfig, unet_config: UNetConfig, run_dir: Path,
               ship_to: Path | None = None, max_minutes: float | None = None,
               verbose: int | str = "auto", patients: tuple[list[str], list[str]] | None = None
               ) -> keras.Model:
    """Fit the U-Net and ship it to ``ship_to``: the best epoch on val (schedule "plateau") or
    the last epoch (schedule "cosine"). Returns the shipped model.

    ``patients`` = (train ids, val ids) overrides the manifest's train and val splits (a
    cross-validation fold trains on its own patients); no val ids: no validation set, which
    only a fixed schedule can do without.
    """
    check_preprocessing(data_config, unet_config)
    fixed = _check_schedule(unet_config, patients)
    keras.utils.set_random_seed(unet_config.seed)
    manifest = read_manifest(data_config.manifest)
    if patients is None:
        train_arrays = load_split(manifest, "train", data_config)
        val_arrays = load_split(manifest, "val", data_config)
    else:
        train_arrays = load_patients(manifest, patients[0], data_config)
        val_arrays = load_patients(manifest, patients[1], data_config) if patients[1] else None
    train = unet_dataset(train_arrays, data_config, training=True)
    val = None if val_arrays is None else unet_dataset(
        val_arrays, dataclasses.replace(data_config, augment=False), training=False)
    save_json(unet_config, run_dir / "config.json", extra={"data": dataclasses.asdict(data_config)})
    with make_strategy(unet_config.distribution).scope():
        model = build_unet_from_config(unet_config)
        if unet_config.init_from:
            _start_from(model, Path(unet_config.init_from))
        model = with_dtype_policy(model, unet_config.precision)
        rate = unet_config.learning_rate
        if fixed:
            steps = unet_config.epochs * steps_per_epoch(train_arrays.labels, data_config)
            rate = keras.optimizers.schedules.CosineDecay(rate, decay_steps=steps)
        compile_unet(model, rate, unet_config.loss, unet_config.weight_ema)
    started = time.monotonic()
    log_csv, monitor = run_dir / "log.csv", "val_dice_metric"
    epochs_run = 0
    if not fixed and stopped_early(log_csv, monitor, "max", unet_config.patience):
        print(f"{run_dir}: early stopping already ended this run; shipping its best model")
    else:
        callbacks = training_callbacks(run_dir, monitor, "max", unet_config.patience,
                                       max_minutes, weight_ema=unet_config.weight_ema > 0,
                                       fixed_schedule=fixed)
        history = model.fit(train, validation_data=val, epochs=unet_config.epochs,
                            callbacks=callbacks, verbose=verbose)
        epochs_run = len(history.history.get("loss", []))
    shipped = model if fixed else keras.saving.load_model(run_dir / "best.keras")
    if ship_to is not None:
        facts = {
            "data": dataclasses.asdict(data_config),
            "parameters": int(shipped.count_params()),
            "epochs_run_this_call": epochs_run,
            "wall_seconds_this_call": round(time.monotonic() - started, 1),
            "epochs_logged": len(logged_values(log_csv, "loss")),
            # inference tells a user when a score is on a patient the model learnt from
            "trained_on_patients": _trained_on(train_arrays, unet_config.init_from),
        }
        if logged_values(log_csv, monitor):
            facts["best_val_dice"] = max(logged_values(log_csv, monitor))
        ship_model(shipped, ship_to, unet_config, facts)
    return shipped


def _check_schedule(config: UNetConfig, patients) -> bool:
    """True for the fixed (cosine) schedule; ValueError for a schedule that cannot run."""
    if config.schedule not in ("plateau", "cosine"):
        raise ValueError(f"unknown schedule {config.schedule!r}: plateau or cosine")
    if config.schedule == "plateau" and patients is not None and not patients[1]:
        raise ValueError("the plateau schedule needs validation patients")
    return config.schedule == "cosine"


def steps_per_epoch(labels: np.ndarray, config: DataConfig) -> int:
    """Batches per epoch of :func:`unet_dataset` in training: every tumour slice plus
    ``negative_share`` as many tumour-free ones."""
    positive = int((labels > 0).sum())
    negative = min(int((labels == 0).sum()), int(round(config.negative_share * positive)))
    return max(1, math.ceil((positive + negative) / config.batch_size))


def _trained_on(train_arrays, init_from: str) -> list[str]:
    """The patients whose slices these weights learnt from: this run's and, for a run started
    from another model, those its JSON lists."""
    patients = set(train_arrays.rows["patient_id"])
    if init_from:
        source = Path(init_from).with_suffix(".json")
        if source.is_file():
            extra = json.loads(source.read_text(encoding="utf-8")).get("extra", {})
            patients |= set(extra.get("trained_on_patients", []))
    return sorted(patients)


def _start_from(model: keras.Model, path: Path) -> None:
    """Copy the weights of the saved U-Net at ``path`` into ``model`` (same design)."""
    source = keras.saving.load_model(path, compile=False)
    if [w.shape for w in source.weights] != [w.shape for w in model.weights]:
        raise ValueError(f"{path}: its layers differ from the U-Net being trained "
                         "(depth, base width, batch norm, input size and channels must match)")
    model.set_weights(source.get_weights())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--run-dir", default="runs/unet")
    parser.add_argument("--epochs", type=int, default=UNetConfig.epochs)
    parser.add_argument("--image-size", type=int, default=UNetConfig.image_size)
    parser.add_argument("--base-filters", type=int, default=UNetConfig.base_filters)
    parser.add_argument("--depth", type=int, default=UNetConfig.depth)
    parser.add_argument("--no-batch-norm", action="store_true")
    parser.add_argument("--loss", default=UNetConfig.loss, choices=sorted(LOSSES))
    parser.add_argument("--mask-resize", default=DataConfig.mask_resize,
                        choices=sorted(MASK_RESIZE),
                        help="how masks are shrunk to the input size: binary nearest-neighbour "
                             "or soft area fractions (see DataConfig.mask_resize)")
    parser.add_argument("--max-rotation-deg", type=float, default=DataConfig.max_rotation_deg,
                        help="augmentation: largest rotation either way")
    parser.add_argument("--max-scale", type=float, default=DataConfig.max_scale,
                        help="augmentation: largest relative zoom in or out")
    parser.add_argument("--init-from", default="", metavar="KERAS",
                        help="start from this U-Net's weights (fine-tuning) instead of random")
    parser.add_argument("--learning-rate", type=float, default=UNetConfig.learning_rate)
    parser.add_argument("--schedule", default=UNetConfig.schedule, choices=["plateau", "cosine"],
                        help="plateau: halve on a stalled val Dice, early stopping, best epoch "
                             "ships; cosine: fixed decay over --epochs, last epoch ships")
    parser.add_argument("--weight-ema", type=float, default=UNetConfig.weight_ema,
                        metavar="MOMENTUM",
                        help="validate, checkpoint and ship a moving average of the weights "
                             "with this momentum (e.g. 0.99); 0 = off")
    parser.add_argument("--batch-size", type=int, default=DataConfig.batch_size)
    parser.add_argument("--distribution", default="default",
                        choices=["default", "mirrored", "multi_worker"])
    parser.add_argument("--patience", type=int, default=UNetConfig.patience,
                        help="early-stopping patience (epochs without a better val Dice)")
    parser.add_argument("--precision", default="float32",
                        choices=TRAINING_PRECISIONS,
                        help="training compute; auto = mixed_bfloat16 where the CPU multiplies "
                             "bfloat16 natively (AVX512-BF16 or AMX)")
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--ship-to", default=None, metavar="KERAS",
                        help="where the trained U-Net and its JSON go (default: "
                             "<run-dir>/unet.keras; the shipped one, "
                             f"{SHIPPED_UNET}, only when named here)")


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    data_config = DataConfig(data_root=args.data_dir, manifest=args.manifest,
                             image_size=args.image_size, batch_size=args.batch_size,
                             seed=args.seed, context_slices=args.context_slices,
                             mask_resize=args.mask_resize,
                             max_rotation_deg=args.max_rotation_deg, max_scale=args.max_scale)
    unet_config = UNetConfig(image_size=args.image_size, depth=args.depth,
                             base_filters=args.base_filters, batch_norm=not args.no_batch_norm,
                             loss=args.loss, init_from=args.init_from,
                             learning_rate=args.learning_rate, schedule=args.schedule,
                             weight_ema=args.weight_ema,
                             epochs=args.epochs,
                             patience=args.patience,
                             distribution=args.distribution,
                             precision=resolve_precision(args.precision),
                             context_slices=args.context_slices, seed=args.seed)
    target = Path(args.ship_to) if args.ship_to else Path(args.run_dir) / "unet.keras"
    train_unet(data_config, unet_config, Path(args.run_dir), target, args.max_minutes,
               keras_verbosity())
    print(f"trained U-Net: {target}" + ("" if args.ship_to else
                                        f" (the shipped {SHIPPED_UNET} is unchanged)"))
    return 0
