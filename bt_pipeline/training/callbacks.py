"""What every training run shares: callbacks, distribution strategy, shipping a model.

A run directory holds ``best.keras`` (best on val; never replaced by a worse epoch, even after a
restart), ``log.csv`` (one row per epoch),
``tensorboard/``, ``backup/`` (BackupAndRestore: a killed run resumes from its last completed
epoch) and ``config.json``.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from bt_pipeline.atomic import write_text_atomic, write_with
from bt_pipeline.config import save_json
from bt_pipeline.models.precision import with_dtype_policy


class TimeLimit(keras.callbacks.Callback):
    """Stop training cleanly once ``minutes`` of wall time have passed (checked per epoch)."""

    def __init__(self, minutes: float | None):
        super().__init__()
        self.minutes = minutes
        self.started = time.monotonic()
        self.stopped_early = False

    def on_epoch_end(self, epoch, logs=None):
        if self.minutes is not None and time.monotonic() - self.started > 60 * self.minutes:
            print(f"time limit of {self.minutes:g} min reached after epoch {epoch + 1}; stopping")
            self.stopped_early = True
            self.model.stop_training = True


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """BackupAndRestore whose files are replaced atomically, so a SIGKILL in the middle of a
    save leaves the previous epoch's complete backup instead of a truncated HDF5 file."""

    def _save_model(self):
        write_with(self._weights_path, lambda tmp: self.model.save_weights(str(tmp)),
                   suffix=".weights.h5")
        write_text_atomic(Path(self._training_metadata_path), json.dumps(
            {"epoch": self._current_epoch, "batch": self._last_batch_seen}))


def logged_values(log_csv: Path, monitor: str) -> list[float]:
    """``monitor``'s value per epoch in a run's CSV log (empty when there is no log yet)."""
    if not log_csv.is_file():
        return []
    with open(log_csv) as handle:
        return [float(row[monitor]) for row in csv.DictReader(handle)
                if row.get(monitor) not in (None, "", "NA")]


def best_of(values: list[float], mode: str) -> float:
    """The best logged value: the largest for ``mode`` "max", else the smallest."""
    return max(values) if mode == "max" else min(values)


def epochs_since_best(values: list[float], mode: str) -> int:
    """Epochs logged after the best one (0 when the last epoch is the best)."""
    best = best_of(values, mode)
    last_best = max(i for i, value in enumerate(values) if value == best)
    return len(values) - 1 - last_best


def stopped_early(log_csv: Path, monitor: str, mode: str, patience: int) -> bool:
    """True when a run's log already holds ``patience`` epochs without a better ``monitor``:
    early stopping ended it, and re-running the command has nothing left to train."""
    values = logged_values(log_csv, monitor)
    return bool(values) and epochs_since_best(values, mode) >= patience


class _RestoredFromLog:
    """Mixin for a monitoring callback whose state a resumed run rebuilds from its CSV log:
    ``restore(values)`` gets the monitor's logged values when training begins."""

    def __init__(self, log_csv: Path, **kwargs):
        super().__init__(**kwargs)
        self.log_csv = log_csv

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.restore(logged_values(self.log_csv, self.monitor))


class ResumableEarlyStopping(_RestoredFromLog, keras.callbacks.EarlyStopping):
    """EarlyStopping that, on a resumed run, starts from the best value and the epochs without
    improvement in the run's CSV log, so a restart does not grant a fresh ``patience``."""

    def restore(self, values: list[float]) -> None:
        if values:
            mode = "max" if self.mode == "max" else "min"
            self.best = best_of(values, mode)
            self.wait = epochs_since_best(values, mode)
            self.best_epoch = len(values) - 1 - self.wait


class ResumableReduceLROnPlateau(_RestoredFromLog, keras.callbacks.ReduceLROnPlateau):
    """ReduceLROnPlateau that, on a resumed run, replays the run's CSV log (monitor and the
    learning rate each epoch ran at) to restore its best value, plateau counter and cooldown.
    The learning rate itself comes back with the optimizer state from BackupAndRestore."""

    def restore(self, values: list[float]) -> None:
        rates = logged_values(self.log_csv, "learning_rate")
        if not values or len(values) != len(rates):
            return
        if self.monitor_op is None:
            self._set_monitor_op()
        for value, rate in zip(values, rates, strict=True):  # the same steps as on_epoch_end
            if self.in_cooldown():
                self.cooldown_counter -= 1
                self.wait = 0
            if self._is_improvement(value, self.best):
                self.best, self.wait = value, 0
            elif not self.in_cooldown():
                self.wait += 1
                if self.wait >= self.patience and rate > np.float32(self.min_lr):
                    self.cooldown_counter, self.wait = self.cooldown, 0


class BestCheckpoint(keras.callbacks.Callback):
    """Save the model whenever ``monitor`` improves, atomically. On a resumed run the best
    value so far is read back from the run's CSV log, so a worse epoch after a restart never
    replaces the better model saved before it."""

    def __init__(self, path: Path, monitor: str, mode: str, log_csv: Path):
        super().__init__()
        self.path, self.monitor, self.mode, self.log_csv = path, monitor, mode, log_csv
        self.better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
        self.best: float | None = None

    def on_train_begin(self, logs=None):
        values = logged_values(self.log_csv, self.monitor) if self.path.is_file() else []
        if values:
            self.best = best_of(values, self.mode)

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or (self.best is not None and not self.better(value, self.best)):
            return
        self.best = float(value)
        write_with(self.path, lambda tmp: self.model.save(tmp), suffix=".keras")


def training_callbacks(run_dir: Path, monitor: str, mode: str, patience: int,
                       max_minutes: float | None = None, weight_ema: bool = False,
                       fixed_schedule: bool = False) -> list[keras.callbacks.Callback]:
    """Best-on-val checkpoint, early stopping, LR schedule, CSV log, TensorBoard, resume.
    With ``fixed_schedule`` (the optimizer's own learning-rate schedule runs to the end) only
    resume, the logs and the time limit: nothing watches val.

    With ``weight_ema`` (the optimizer keeps a moving average of the weights) the averaged
    weights are swapped in for validation and, at each epoch's end, after the backup has
    saved the raw ones (so a resumed run goes on training the raw weights) and before the
    best checkpoint is written (so it holds the averaged weights that val scored).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    swap = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if weight_ema else []
    watch_val = [] if fixed_schedule else [
        BestCheckpoint(run_dir / "best.keras", monitor, mode, run_dir / "log.csv"),
        ResumableEarlyStopping(run_dir / "log.csv", monitor=monitor, mode=mode,
                               patience=patience),
        ResumableReduceLROnPlateau(run_dir / "log.csv", monitor=monitor, mode=mode, factor=0.5,
                                   patience=max(1, patience // 3), min_lr=1e-5),
    ]
    return [
        AtomicBackupAndRestore(str(run_dir / "backup"), delete_checkpoint=False),
        *swap,
        *watch_val,
        keras.callbacks.CSVLogger(str(run_dir / "log.csv"), append=True),
        keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), write_graph=False,
                                    profile_batch=0),
        TimeLimit(max_minutes),
    ]


def make_strategy(name: str) -> tf.distribute.Strategy:
    """``default``: one device; ``mirrored``: all local GPUs (or CPUs listed as logical devices);
    ``multi_worker``: several machines described by the ``TF_CONFIG`` environment variable."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"unknown distribution {name!r}: default, mirrored or multi_worker")


def ship_model(model: keras.Model, path: Path, config: Any, facts: dict[str, Any]) -> None:
    """Save ``model`` without optimizer state (small file) and its config beside it, atomically.

    A model trained in mixed bfloat16 ships as float32: its layers are rebuilt with the float32
    policy and the trained weights (float32 under either policy) copied in, so the file loads
    and runs in float32 everywhere."""
    float32 = with_dtype_policy(model, "float32")
    clone = keras.Model.from_config(float32.get_config())  # uncompiled: no optimizer slots
    clone.set_weights(float32.get_weights())
    write_with(path, lambda tmp: clone.save(tmp), suffix=".keras")
    save_json(config, path.with_suffix(".json"), extra=facts)

