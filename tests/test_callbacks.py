"""A training run killed with SIGKILL part way resumes from its last completed epoch."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def _epochs_logged(run_dir):
    log = run_dir / "log.csv"
    if not log.is_file():
        return []
    with open(log) as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


@pytest.mark.integration
def test_train_unet_resumes_after_sigkill(synthetic_root, synthetic_manifest, tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "bt_pipeline", "train-unet",
               "--data-dir", str(synthetic_root), "--manifest", str(synthetic_manifest),
               "--run-dir", str(run_dir), "--epochs", "12", "--patience", "100",
               "--image-size", "32", "--depth", "2", "--base-filters", "4", "--batch-size", "4",
               "--ship-to", str(tmp_path / "unet.keras"), "--threads", "1"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    first = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(_epochs_logged(run_dir)) < 2 and time.monotonic() < deadline:
        if first.poll() is not None:
            break
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    done_before = _epochs_logged(run_dir)
    assert 2 <= len(done_before) < 12, done_before  # killed part way
    second = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    epochs = _epochs_logged(run_dir)
    assert epochs == sorted(set(epochs)) and epochs[-1] == 11  # no epoch twice, finished
    assert epochs[:len(done_before)] == done_before  # continued, did not start over
    assert (tmp_path / "unet.keras").is_file() and (tmp_path / "unet.json").is_file()


def _tiny_model():
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    return model


def test_backup_survives_a_kill_in_the_middle_of_a_save(tmp_path):
    import json

    import pytest

    from bt_pipeline.training.callbacks import AtomicBackupAndRestore

    callback = AtomicBackupAndRestore(str(tmp_path / "backup"))
    model = _tiny_model()
    callback.set_model(model)
    callback.on_epoch_end(0)
    weights = tmp_path / "backup" / "latest.weights.h5"
    good = weights.read_bytes()

    def dies_half_way(path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(good[: len(good) // 2])
        raise KeyboardInterrupt  # stands for SIGKILL

    object.__setattr__(model, "save_weights", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        callback.on_epoch_end(1)
    assert weights.read_bytes() == good
    metadata = json.loads((tmp_path / "backup" / "training_metadata.json").read_text())
    assert metadata["epoch"] == 1
    assert not [p for p in (tmp_path / "backup").iterdir() if ".tmp" in p.name]


def test_best_checkpoint_is_not_replaced_by_a_worse_epoch_after_a_restart(tmp_path):
    from bt_pipeline.training.callbacks import BestCheckpoint

    log = tmp_path / "log.csv"
    log.write_text("epoch,val_dice_metric\n0,0.5\n1,0.8\n")
    best = tmp_path / "best.keras"
    best.write_bytes(b"model of epoch 1")
    callback = BestCheckpoint(best, "val_dice_metric", "max", log)
    callback.set_model(_tiny_model())
    callback.on_train_begin()
    callback.on_epoch_end(2, {"val_dice_metric": 0.7})
    assert best.read_bytes() == b"model of epoch 1"
    callback.on_epoch_end(3, {"val_dice_metric": 0.9})
    assert best.read_bytes() != b"model of epoch 1" and best.stat().st_size > 100


def test_early_stopping_patience_carries_over_a_restart(tmp_path):
    """A run killed 3 epochs after its best, patience 4: one more worse epoch ends it, not 4;
    and a run that early stopping already ended is recognised as finished."""
    from bt_pipeline.training.callbacks import ResumableEarlyStopping, stopped_early

    log = tmp_path / "log.csv"
    log.write_text("epoch,val_dice_metric\n0,0.5\n1,0.8\n2,0.7\n3,0.75\n4,0.79\n")
    model = _tiny_model()
    callback = ResumableEarlyStopping(log, monitor="val_dice_metric", mode="max", patience=4)
    callback.set_model(model)
    callback.on_train_begin()
    assert (callback.best, callback.wait) == (0.8, 3)
    callback.on_epoch_end(5, {"val_dice_metric": 0.78})
    assert model.stop_training
    assert not stopped_early(log, "val_dice_metric", "max", 4)
    with open(log, "a") as handle:
        handle.write("5,0.78\n")
    assert stopped_early(log, "val_dice_metric", "max", 4)
    assert not stopped_early(tmp_path / "no_log.csv", "val_dice_metric", "max", 4)
    fresh = ResumableEarlyStopping(tmp_path / "no_log.csv", monitor="val_dice_metric",
                                   mode="max", patience=4)
    fresh.set_model(_tiny_model())
    fresh.on_train_begin()
    assert fresh.wait == 0 and fresh.best is None


def test_learning_rate_plateau_counter_carries_over_a_restart(tmp_path):
    """Replaying the CSV log leaves the resumed callback in the state an unbroken run's would be
    in, so the next worse epoch halves the learning rate; a stock callback would wait again."""
    import keras

    from bt_pipeline.training.callbacks import ResumableReduceLROnPlateau

    log = tmp_path / "log.csv"
    epochs = [(0.5, 1e-3), (0.8, 1e-3), (0.7, 1e-3), (0.75, 1e-3), (0.79, 5e-4)]
    log.write_text("epoch,learning_rate,val_dice_metric\n" + "".join(
        f"{i},{rate},{value}\n" for i, (value, rate) in enumerate(epochs)))
    settings = dict(monitor="val_dice_metric", mode="max", factor=0.5, patience=2, min_lr=1e-5)

    unbroken_model = _tiny_model()
    unbroken = keras.callbacks.ReduceLROnPlateau(**settings)
    unbroken.set_model(unbroken_model)
    unbroken.on_train_begin()
    for epoch, (value, _) in enumerate(epochs):
        unbroken.on_epoch_end(epoch, {"val_dice_metric": value})
    assert float(unbroken_model.optimizer.learning_rate) == pytest.approx(5e-4)  # cut after epoch 3

    model = _tiny_model()
    model.optimizer.learning_rate = 5e-4  # as BackupAndRestore brings it back
    resumed = ResumableReduceLROnPlateau(log, **settings)
    resumed.set_model(model)
    resumed.on_train_begin()
    assert (resumed.best, resumed.wait, resumed.cooldown_counter) == (
        unbroken.best, unbroken.wait, unbroken.cooldown_counter) == (0.8, 1, 0)
    resumed.on_epoch_end(5, {"val_dice_metric": 0.78})
    assert float(model.optimizer.learning_rate) == pytest.approx(2.5e-4)


@pytest.mark.integration
def test_tuning_resumes_after_sigkill_without_recording_a_trial_twice(
        synthetic_root, synthetic_manifest, tmp_path):
    import json

    import pandas as pd

    work = tmp_path / "work"
    command = [sys.executable, "-m", "bt_pipeline", "tune", "--data-dir", str(synthetic_root),
               "--manifest", str(synthetic_manifest), "--trials", "4", "--epochs", "3",
               "--executions", "1", "--retrain-epochs", "1", "--image-size", "32",
               "--out-dir", str(tmp_path / "tuning"), "--work-dir", str(work),
               "--ship-to", str(tmp_path / "clf.keras"), "--threads", "1"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}

    def completed():
        states = []
        for path in work.glob("classifier/trial_*/trial.json"):
            try:  # Keras Tuner rewrites trial.json in place: it may be caught half-written
                states.append(json.loads(path.read_text()).get("status"))
            except json.JSONDecodeError:
                continue
        return states.count("COMPLETED")

    first = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while completed() < 1 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    assert 1 <= completed() < 4, "killed too late to test a resume"
    second = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    trials = pd.read_csv(tmp_path / "tuning" / "trials.csv", dtype={"trial_id": str})
    assert len(trials) == 4 and trials["trial_id"].is_unique
    assert (trials["status"] == "COMPLETED").all()


def _ema_fit(run_dir, epochs):
    """A tiny regression fitted with weight averaging and the project's callbacks."""
    import keras
    import numpy as np

    from bt_pipeline.training.callbacks import training_callbacks

    keras.utils.set_random_seed(7)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = x @ np.array([[1.0], [-2.0], [0.5], [3.0]], "float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(0.05, use_ema=True, ema_momentum=0.8), loss="mse")
    callbacks = training_callbacks(run_dir, "val_loss", "min", patience=100, weight_ema=True)
    model.fit(x, y, validation_data=(x[:16], y[:16]), epochs=epochs, batch_size=8,
              shuffle=False, callbacks=callbacks, verbose=0)
    return x[:16], y[:16]


def _logged(run_dir, column):
    with open(run_dir / "log.csv") as handle:
        return [float(row[column]) for row in csv.DictReader(handle)]


def test_weight_averaging_checkpoints_what_val_scored_and_resumes_the_raw_weights(tmp_path):
    """With weight_ema the best checkpoint holds the averaged weights val scored (not the raw
    ones), and a run stopped after 2 epochs then resumed logs what an unbroken run logs (the
    backup keeps the raw weights and their average apart)."""
    import keras

    x_val, y_val = _ema_fit(tmp_path / "unbroken", 4)
    best = keras.saving.load_model(tmp_path / "unbroken" / "best.keras")
    val_losses = _logged(tmp_path / "unbroken", "val_loss")
    assert best.evaluate(x_val, y_val, verbose=0) == pytest.approx(min(val_losses), rel=1e-4)

    _ema_fit(tmp_path / "resumed", 2)
    _ema_fit(tmp_path / "resumed", 4)
    assert _logged(tmp_path / "resumed", "epoch") == [0, 1, 2, 3]
    assert _logged(tmp_path / "resumed", "val_loss") == pytest.approx(val_losses, rel=1e-4)
