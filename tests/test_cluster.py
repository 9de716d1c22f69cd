"""``bt infer --ray local`` and ``--resume``: the same outputs as in-process, a killed worker's
case retried, a killed driver's run resumed with only the unfinished cases (a local Ray
runtime with 2 actors)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("ray")

from bt_pipeline.inference.cluster import EXIT_ONCE_ENV  # noqa: E402
from bt_pipeline.inference.pipeline import CASE_RECORD  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def _infer(tiny_models, *args, env=None, wait=True):
    command = [sys.executable, "-m", "bt_pipeline.infer", *map(str, args), "--quiet",
               "--classifier", str(tiny_models[0]), "--unet", str(tiny_models[1])]
    if not wait:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def _three_cases(synthetic_root: Path, tmp_path: Path) -> Path:
    scans = tmp_path / "scans"
    scans.mkdir()
    for patient in sorted(p for p in synthetic_root.iterdir() if p.is_dir())[:3]:
        (scans / patient.name).symlink_to(patient, target_is_directory=True)
    return scans


def _outputs(out: Path) -> dict[str, bytes]:
    """Every case file (masks, volumes, rows), without what names the run (time, paths)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.suffix in (".png", ".gz", ".csv") and p.name != "report.html"}


def test_ray_gives_the_in_process_outputs_and_retries_a_killed_worker(
        tiny_models, synthetic_root, tmp_path):
    scans = _three_cases(synthetic_root, tmp_path)
    plain = _infer(tiny_models, scans, "--out", tmp_path / "plain", "--precision", "float32")
    assert plain.returncode == 0, plain.stderr
    marker = tmp_path / "worker-exited"
    victim = sorted(p.name for p in scans.iterdir())[1]
    env = {**os.environ, EXIT_ONCE_ENV: f"{victim}:{marker}"}
    started = time.monotonic()
    ray = _infer(tiny_models, scans, "--out", tmp_path / "ray", "--precision", "float32",
                 "--ray", "local", "--workers", "2", env=env)
    assert ray.returncode == 0, ray.stderr
    assert time.monotonic() - started < 180
    assert marker.exists()  # the worker holding the victim's case died, and the case ran again
    assert _outputs(tmp_path / "ray") == _outputs(tmp_path / "plain")
    run = json.loads((tmp_path / "ray" / "run.json").read_text(encoding="utf-8"))
    assert run["options"]["ray"] == "local" and run["patients"] == 3


def test_resume_after_the_driver_is_killed_runs_only_the_unfinished_cases(
        tiny_models, synthetic_root, tmp_path):
    scans = tmp_path / "scans"  # 24 cases: the driver is killed with most still to do
    scans.mkdir()
    for copy in "abc":
        for patient in (p for p in synthetic_root.iterdir() if p.is_dir()):
            (scans / f"{copy}_{patient.name}").symlink_to(patient, target_is_directory=True)
    out = tmp_path / "out"
    driver = _infer(tiny_models, scans, "--out", out, "--ray", "local", "--workers", "1",
                    wait=False)
    deadline = time.monotonic() + 150
    finished: list[Path] = []
    while time.monotonic() < deadline and not finished:
        finished = list(tmp_path.glob(f".out.bt-partial-*/*/{CASE_RECORD}"))
        time.sleep(0.2)
    assert finished, "no case finished in time"
    os.killpg(driver.pid, signal.SIGKILL)  # the driver, and the Ray runtime it started with it
    driver.wait()
    time.sleep(1)  # nothing of that run writes any more
    kept = {p.parent.name for p in tmp_path.glob(f".out.bt-partial-*/*/{CASE_RECORD}")}
    resumed = _infer(tiny_models, scans, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert set(run["resumed_patients"]) == kept and 0 < len(kept) < 24
    patients = pd.read_csv(out / "patients.csv")
    assert len(patients) == 24 and list(patients["patient_id"]) == sorted(patients["patient_id"])
    assert not list(tmp_path.glob(".out.bt-partial-*"))


def test_models_the_workers_cannot_load_are_one_line_not_a_failure_per_case(
        tiny_models, synthetic_root, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for model in tiny_models:
        for suffix in (".keras", ".json"):
            (broken / model.with_suffix(suffix).name).write_bytes(
                model.with_suffix(suffix).read_bytes())
    (broken / tiny_models[1].name).write_bytes(b"not a keras file")
    result = subprocess.run(
        [sys.executable, "-m", "bt_pipeline.infer", str(_three_cases(synthetic_root, tmp_path)),
         "--out", str(tmp_path / "out"), "--quiet", "--ray", "local", "--workers", "1",
         "--classifier", str(broken / tiny_models[0].name),
         "--unet", str(broken / tiny_models[1].name)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "the workers cannot load the models" in result.stderr
    assert not (tmp_path / "out").exists()
