"""A training run killed with SIGKILL part way resumes from its last completed epoch."""

import csv
import os
import signal
import subprocess
import sys
import time

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def _epochs_logged(run_dir):
    log = run_dir / "log.csv"
    if not log.is_file():
        return []
    with open(log) as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


def test_train_unet_resumes_after_sigkill(synthetic_root, synthetic_manifest, tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "bt_pipeline.train_unet",
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
