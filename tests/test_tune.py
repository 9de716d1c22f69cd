import dataclasses
import json
import os
import socket
import subprocess
import sys
import time

import keras
import keras_tuner
import pandas as pd
import pytest

from bt_pipeline.config import ClassifierConfig, DataConfig
from bt_pipeline.training.tune import ClassifierHyperModel, run_tuning

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_search_space_defaults_are_pinned():
    hp = keras_tuner.HyperParameters()
    ClassifierHyperModel(ClassifierConfig(image_size=32, filters=(4, 8, 16))).build(hp)
    assert hp.values == {
        "dropout_1": 0.15, "dropout_2": 0.15, "dropout_3": 0.15, "dropout_dense": 0.15,
        "dense_units": 128, "dense_activation": "relu", "conv_activation": "relu",
        "learning_rate": 1e-3,
    }
    spaces = {h.name: h for h in hp.space}
    for name in ("dropout_1", "dropout_2", "dropout_3", "dropout_dense"):
        assert (spaces[name].min_value, spaces[name].max_value, spaces[name].step) == (0, 0.5, 0.05)
    units = spaces["dense_units"]
    assert (units.min_value, units.max_value, units.step) == (64, 512, 32)
    rate = spaces["learning_rate"]
    assert (rate.min_value, rate.max_value, rate.sampling) == (1e-4, 1e-2, "log")
    assert set(spaces["dense_activation"].values) >= {"relu", "sigmoid"}
    assert "relu" in spaces["conv_activation"].values


def test_build_maps_hyperparameters_onto_the_training_builder():
    hp = keras_tuner.HyperParameters()
    hp.Fixed("dropout_1", 0.3)
    hp.Fixed("dense_units", 96)
    hp.Fixed("dense_activation", "sigmoid")
    hp.Fixed("learning_rate", 0.005)
    model = ClassifierHyperModel(ClassifierConfig(image_size=32, filters=(4, 8))).build(hp)
    assert [x.filters for x in model.layers if isinstance(x, keras.layers.Conv2D)] == [4, 8]
    assert model.get_layer("block1_dropout").rate == pytest.approx(0.3)
    assert model.get_layer("dense").units == 96
    assert model.get_layer("dense").activation.__name__ == "sigmoid"
    assert float(model.optimizer.learning_rate) == pytest.approx(0.005)
    assert model.loss == "binary_crossentropy"


def _tiny(synthetic_root, synthetic_manifest, tmp_path):
    data = DataConfig(data_root=str(synthetic_root), manifest=str(synthetic_manifest),
                      image_size=32, batch_size=8, cache_dir=str(tmp_path / "cache"))
    return data, ClassifierConfig(image_size=32, filters=(4, 8), block_dropouts=(0.1, 0.1),
                                  epochs=1)


@pytest.mark.integration
def test_tiny_random_search_writes_reports_and_ships(synthetic_root, synthetic_manifest,
                                                      tmp_path):
    data, base = _tiny(synthetic_root, synthetic_manifest, tmp_path)
    table = run_tuning(data, base, tmp_path / "tuning", tmp_path / "work", trials=2, epochs=1,
                       executions=1, ship_to=tmp_path / "clf.keras", verbose=0)
    trials = pd.read_csv(tmp_path / "tuning" / "trials.csv")
    assert len(trials) == 2 and (trials["status"] == "COMPLETED").all()
    for column in ("trial_id", "dropout_1", "dropout_2", "dropout_dense", "dense_units",
                   "dense_activation", "conv_activation", "learning_rate", "val_accuracy",
                   "val_loss", "seconds"):
        assert column in trials.columns
    assert trials["val_accuracy"].between(0, 1).all() and (trials["seconds"] > 0).all()
    best = json.loads((tmp_path / "tuning" / "best_hparams.json").read_text())
    assert set(best["hyperparameters"]) >= {"dropout_1", "learning_rate"}
    assert "| trial_id |" in (tmp_path / "tuning" / "top10.md").read_text()
    assert list(table["split"]) == ["train", "val", "test"]
    shipped = json.loads((tmp_path / "clf.json").read_text())
    assert 0 <= shipped["threshold"] <= 1 and shipped["type"] == "ClassifierConfig"
    # A second call resumes the finished search instead of running trials again.
    run_tuning(data, base, tmp_path / "tuning", tmp_path / "work", trials=2, epochs=1,
               executions=1, ship_to=None, verbose=0)
    assert len(pd.read_csv(tmp_path / "tuning" / "trials.csv")) == 2
    # Retrain only: the winner again with two convolutions per block, no search.
    wider = dataclasses.replace(base, convs_per_block=2)
    run_tuning(data, wider, tmp_path / "retrain", tmp_path / "work2", trials=2, epochs=1,
               executions=1, ship_to=tmp_path / "clf2.keras", verbose=0,
               hparams_file=tmp_path / "tuning" / "best_hparams.json")
    assert not (tmp_path / "work2" / "classifier").exists()  # no tuner was made
    assert not (tmp_path / "retrain" / "trials.csv").exists()
    retrained = json.loads((tmp_path / "clf2.json").read_text())
    assert retrained["convs_per_block"] == 2
    assert retrained["learning_rate"] == best["hyperparameters"]["learning_rate"]
    names = [layer.name for layer in keras.saving.load_model(tmp_path / "clf2.keras").layers]
    assert "block1_conv2" in names


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_distributed_search_chief_and_two_workers(synthetic_root, synthetic_manifest, tmp_path):
    args = [sys.executable, "-m", "bt_pipeline", "tune", "--data-dir", str(synthetic_root),
            "--manifest", str(synthetic_manifest), "--trials", "4", "--epochs", "1",
            "--executions", "1", "--retrain-epochs", "1", "--image-size", "32",
            "--out-dir", str(tmp_path / "tuning"), "--work-dir", str(tmp_path / "work"),
            "--ship-to", str(tmp_path / "clf.keras"), "--threads", "1"]
    env = {**os.environ, "KERASTUNER_ORACLE_IP": "127.0.0.1",
           "KERASTUNER_ORACLE_PORT": str(_free_port()), "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs = {}
    for tuner_id in ("chief", "tuner0", "tuner1"):
        procs[tuner_id] = subprocess.Popen(args, env={**env, "KERASTUNER_TUNER_ID": tuner_id},
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           text=True, cwd=REPO)
        if tuner_id == "chief":
            time.sleep(3)
    deadline = time.monotonic() + 420
    outputs = {}
    try:
        for tuner_id, proc in procs.items():
            outputs[tuner_id], _ = proc.communicate(timeout=max(1, deadline - time.monotonic()))
    finally:
        for proc in procs.values():
            proc.kill()
    for tuner_id, proc in procs.items():
        assert proc.returncode == 0, outputs[tuner_id][-3000:]
    ran = [line.split()[1] for tuner_id in ("tuner0", "tuner1")
           for line in outputs[tuner_id].splitlines() if line.startswith("trial ")]
    assert sorted(ran) == sorted(set(ran)) and len(ran) == 4  # every trial exactly once
    trials = pd.read_csv(tmp_path / "tuning" / "trials.csv")
    assert len(trials) == 4 and (trials["status"] == "COMPLETED").all()
    assert (tmp_path / "clf.keras").is_file()


def _pid_of_worker(tuner_id: str, port: str) -> int | None:
    from pathlib import Path

    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if (b"tune\x00" in cmdline
                and f"KERASTUNER_TUNER_ID={tuner_id}".encode() in environ
                and f"KERASTUNER_ORACLE_PORT={port}".encode() in environ):
            return int(proc.name)
    return None


@pytest.mark.integration
def test_lost_worker_is_restarted_and_its_trial_rerun(synthetic_root, synthetic_manifest,
                                                      tmp_path):
    import signal

    port = str(_free_port())
    logs = tmp_path / "logs"
    env = {**os.environ, "WORKERS": "2", "ORACLE_PORT": port, "PY": sys.executable,
           "LOG_DIR": str(logs), "TF_CPP_MIN_LOG_LEVEL": "3"}
    args = ["--data-dir", str(synthetic_root), "--manifest", str(synthetic_manifest),
            "--trials", "4", "--epochs", "3", "--executions", "1", "--retrain-epochs", "1",
            "--image-size", "32", "--out-dir", str(tmp_path / "tuning"),
            "--work-dir", str(tmp_path / "work"), "--ship-to", str(tmp_path / "clf.keras")]
    script = subprocess.Popen(["bash", "tuning/run_distributed.sh", *args], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        victim = None
        while victim is None and time.monotonic() < deadline:
            log = logs / "tuner0.log"
            if log.is_file() and "runs on tuner0" in log.read_text():
                victim = _pid_of_worker("tuner0", port)
            time.sleep(0.1)
        assert victim is not None, "worker tuner0 never started a trial"
        os.kill(victim, signal.SIGKILL)  # mid-trial
        output, _ = script.communicate(timeout=420)
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
    assert script.returncode == 0, output[-3000:]
    assert "restart 1/3 resumes its trial" in (logs / "tuner0.log").read_text()
    trials = pd.read_csv(tmp_path / "tuning" / "trials.csv", dtype={"trial_id": str})
    assert len(trials) == 4 and trials["trial_id"].is_unique
    assert (trials["status"] == "COMPLETED").all()
