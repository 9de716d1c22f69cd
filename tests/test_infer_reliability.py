"""`bt infer` never harms the user's data, never fails silently and leaves one consistent
output set: one test per case of the reliability issue, on synthetic patients in tmp_path."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from bt_pipeline.infer import main

REPO = Path(__file__).resolve().parents[1]


def _run(tiny_models, *args, cwd=None):
    classifier, unet = tiny_models
    argv = [*map(str, args), "--classifier", str(classifier), "--unet", str(unet), "--quiet"]
    if cwd is None:
        return main(argv)
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        return main(argv)
    finally:
        os.chdir(previous)


@pytest.fixture
def scans(synthetic_root, tmp_path):
    """A private copy of three synthetic patients (tests may damage or rename it)."""
    root = tmp_path / "scans"
    root.mkdir()
    for patient in sorted(p for p in synthetic_root.iterdir() if p.is_dir())[:3]:
        shutil.copytree(patient, root / patient.name)
    return root


def _patients(out):
    return sorted(pd.read_csv(out / "patients.csv")["patient_id"])


# --- OUT never overlaps an input --------------------------------------------------------

@pytest.mark.parametrize("where", ["same", "inside_input", "holds_input", "patient"])
def test_out_overlapping_an_input_is_refused(tiny_models, scans, tmp_path, where, capsys):
    patient = sorted(scans.iterdir())[0]
    out = {"same": scans, "inside_input": scans / "out", "holds_input": tmp_path,
           "patient": patient}[where]
    assert _run(tiny_models, scans, "--out", out) == 2
    assert "overlaps the input" in capsys.readouterr().err
    assert not (scans / "out").exists() and not (patient / "patients.csv").exists()


def test_out_inside_the_real_target_of_a_symlinked_patient_is_refused(tiny_models, scans,
                                                                      tmp_path, capsys):
    patient = sorted(scans.iterdir())[0]
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / patient.name).symlink_to(patient, target_is_directory=True)
    assert _run(tiny_models, linked, "--out", patient / "masks") == 2
    assert "overlaps the input" in capsys.readouterr().err
    assert not (patient / "masks").exists()


def test_empty_out_is_refused(tiny_models, scans, capsys):
    assert _run(tiny_models, scans, "--out", "") == 2
    assert "--out is empty" in capsys.readouterr().err


def test_out_full_of_other_files_is_refused_not_replaced(tiny_models, scans, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    assert _run(tiny_models, scans, "--out", out) == 2
    assert (out / "thesis.tex").read_text() == "precious"


# --- inputs the tool does not use are reported -----------------------------------------

def test_infer_dot_from_inside_a_patient_folder_names_the_patient(tiny_models, scans,
                                                                  tmp_path):
    patient = sorted(scans.iterdir())[0]
    assert _run(tiny_models, ".", "--out", tmp_path / "out", cwd=patient) == 0
    assert _patients(tmp_path / "out") == [patient.name]
    assert (tmp_path / "out" / patient.name / "mask.nii.gz").is_file()


def test_stray_image_at_the_top_is_reported_and_the_patients_processed(tiny_models, scans,
                                                                       tmp_path, capsys):
    first = sorted(scans.iterdir())[0]
    shutil.copy(next(first.glob("*_1.tif")), scans / "TCGA_XX_0000_20000101_1.tif")
    assert _run(tiny_models, scans, "--out", tmp_path / "out") == 1
    assert len(_patients(tmp_path / "out")) == 3
    errors = pd.read_csv(tmp_path / "out" / "errors.csv")
    assert errors["problem"].str.contains("top of a folder of patients").any()
    assert "TCGA_XX_0000_20000101_1.tif" in capsys.readouterr().err


def test_duplicate_slice_numbers_are_reported(tiny_models, scans, tmp_path):
    patient = sorted(scans.iterdir())[0]
    image = cv2.imread(str(patient / f"{patient.name}_2.tif"))
    cv2.imwrite(str(patient / f"{patient.name}_2.png"), image)
    assert _run(tiny_models, scans, "--out", tmp_path / "out") == 1
    errors = pd.read_csv(tmp_path / "out" / "errors.csv")
    assert errors["problem"].str.contains("duplicate slice number 2").sum() == 1
    slices = pd.read_csv(tmp_path / "out" / "slices.csv")
    assert (slices[slices["patient_id"] == patient.name]["slice"] == 2).sum() == 1


def test_multi_page_tiff_is_refused_by_name(tiny_models, scans, tmp_path):
    from PIL import Image

    patient = sorted(scans.iterdir())[0]
    page = Image.open(patient / f"{patient.name}_3.tif")
    page.save(patient / f"{patient.name}_3.tif", save_all=True, append_images=[page.copy()])
    assert _run(tiny_models, scans, "--out", tmp_path / "out") == 1
    errors = pd.read_csv(tmp_path / "out" / "errors.csv")
    assert errors["problem"].str.contains("multi-page image").any()


def test_names_that_are_not_utf8_are_processed_and_reported_printably(tiny_models, scans,
                                                                      tmp_path):
    patient = sorted(scans.iterdir())[0]
    odd = os.fsdecode(os.fsencode(str(scans)) + b"/TCGA_CS_\xff01_20000101")
    os.rename(patient, odd)
    stray = os.fsdecode(os.fsencode(odd) + b"/notes_\xfe.txt")
    Path(stray).write_text("x")
    assert _run(tiny_models, scans, "--out", tmp_path / "out") == 0
    patients = _patients(tmp_path / "out")
    assert "TCGA_CS_\\xff01_20000101" in patients and len(patients) == 3
    errors = pd.read_csv(tmp_path / "out" / "errors.csv")
    assert errors["path"].str.contains("notes_\\xfe.txt", regex=False).any()
    assert (tmp_path / "out" / "TCGA_CS_\\xff01_20000101" / "viewer.html").is_file()


def test_a_wrong_size_mask_spoils_only_its_own_patients_dice(tiny_models, scans, tmp_path):
    patient = sorted(scans.iterdir())[0]
    cv2.imwrite(str(patient / f"{patient.name}_4_mask.tif"), np.zeros((70, 70), np.uint8))
    assert _run(tiny_models, scans, "--out", tmp_path / "out") == 1
    table = pd.read_csv(tmp_path / "out" / "patients.csv").set_index("patient_id")
    assert np.isnan(table.loc[patient.name, "dice"])
    assert table.loc[patient.name, "dice_note"].startswith("unavailable")
    assert table.drop(patient.name)["dice"].notna().all()
    slices = pd.read_csv(tmp_path / "out" / "slices.csv")
    assert len(slices[slices["patient_id"] == patient.name]) == 9  # still segmented


# --- one run owns its OUT ---------------------------------------------------------------

def test_rerun_on_fewer_patients_leaves_no_older_outputs(tiny_models, scans, tmp_path):
    out = tmp_path / "out"
    assert _run(tiny_models, scans, "--out", out) == 0
    gone = sorted(scans.iterdir())[0]
    shutil.rmtree(gone)
    assert _run(tiny_models, scans, "--out", out) == 0
    assert gone.name not in _patients(out) and not (out / gone.name).exists()
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


def test_a_failed_call_leaves_earlier_results_untouched(tiny_models, scans, tmp_path):
    out = tmp_path / "out"
    assert _run(tiny_models, scans, "--out", out) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert _run(tiny_models, tmp_path / "typo", "--out", out) == 2
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_write_failing_behind_the_next_prediction_fails_the_call_cleanly(
        tiny_models, scans, tmp_path, monkeypatch, capsys):
    """Outputs are written on their own thread while the next patient is predicted: a write
    error there still ends the call with exit 2 and leaves the earlier run's outputs as they
    were, and a run that succeeds lists its patients in input order however slow a write."""
    import bt_pipeline.inference.pipeline as pipeline

    out = tmp_path / "out"
    write_viewer = pipeline.write_viewer
    calls = []

    def slow_first_write(path, *args, **kwargs):
        calls.append(Path(path).parent.name)
        if len(calls) == 1:
            time.sleep(1.0)  # the second patient is predicted meanwhile
        return write_viewer(path, *args, **kwargs)

    monkeypatch.setattr(pipeline, "write_viewer", slow_first_write)
    assert _run(tiny_models, scans, "--out", out) == 0
    names = sorted(p.name for p in scans.iterdir())
    assert calls == names
    assert list(pd.read_csv(out / "patients.csv")["patient_id"]) == names
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def disk_full_on_the_second(path, *args, **kwargs):
        calls.append(Path(path).parent.name)
        if len(calls) == len(names) + 2:
            raise OSError(28, "No space left on device")
        return write_viewer(path, *args, **kwargs)

    monkeypatch.setattr(pipeline, "write_viewer", disk_full_on_the_second)
    capsys.readouterr()
    assert _run(tiny_models, scans, "--out", out) == 2
    assert "cannot write outputs" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not list(tmp_path.glob(".out.bt-partial-*"))  # the unfinished run left nothing


def test_a_second_concurrent_run_is_refused(tiny_models, scans, tmp_path, capsys):
    from bt_pipeline.inference.output_folder import OutputFolder

    with OutputFolder(tmp_path / "out"):
        assert _run(tiny_models, scans, "--out", tmp_path / "out") == 2
    assert "another run is writing" in capsys.readouterr().err
    assert _run(tiny_models, scans, "--out", tmp_path / "out") == 0


@pytest.mark.integration
def test_kill_9_then_rerun_leaves_one_consistent_output_set(tiny_models, synthetic_root,
                                                            tmp_path):
    out = tmp_path / "out"
    few = tmp_path / "few"
    few.mkdir()
    first = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
    shutil.copytree(first, few / first.name)
    assert _run(tiny_models, few, "--out", out) == 0  # older results
    older = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    command = [sys.executable, "-m", "bt_pipeline.infer", str(synthetic_root), "--out", str(out),
               "--classifier", str(tiny_models[0]), "--unet", str(tiny_models[1]), "--quiet"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.bt-partial-*/TCGA_*/viewer.html")):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert list(tmp_path.glob(".out.bt-partial-*"))  # what the killed run left
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == older
    assert _run(tiny_models, synthetic_root, "--out", out) == 0
    assert not list(tmp_path.glob(".out.bt-*-*"))  # leftovers removed
    assert len(_patients(out)) == 8
    slices = pd.read_csv(out / "slices.csv")
    for row in slices.itertuples():
        mask = out / row.patient_id / f"{Path(row.image).stem}_mask.png"
        assert int((cv2.imread(str(mask), cv2.IMREAD_UNCHANGED) > 0).sum()) == row.mask_pixels


@pytest.mark.integration
def test_sigterm_keeps_the_finished_patients_marked_interrupted(tiny_models, synthetic_root,
                                                                tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "bt_pipeline.infer", str(synthetic_root), "--out", str(out),
               "--classifier", str(tiny_models[0]), "--unet", str(tiny_models[1]), "--quiet"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.bt-partial-*/TCGA_*/viewer.html")):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "interrupted" in err
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "interrupted" and 1 <= manifest["patients"] < 8
    assert len(_patients(out)) == manifest["patients"]


# --- model files ------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["malformed", "list", "unknown_field", "wrong_type",
                                    "swapped", "input_differs"])
def test_every_bad_model_config_is_one_line_naming_the_file(tiny_models, scans, tmp_path,
                                                            damage, capsys):
    classifier, unet = tiny_models
    bad = tmp_path / "unet.keras"
    shutil.copy(unet, bad)
    config = json.loads(unet.with_suffix(".json").read_text())
    text = {
        "malformed": "{not json",
        "list": json.dumps([config]),
        "unknown_field": json.dumps({**config, "colour": "red"}),
        "wrong_type": json.dumps({**config, "depth": "four"}),
        "swapped": classifier.with_suffix(".json").read_text(),
        "input_differs": json.dumps({**config, "image_size": 64}),
    }[damage]
    bad.with_suffix(".json").write_text(text)
    code = main([str(scans), "--out", str(tmp_path / "out"), "--classifier", str(classifier),
                 "--unet", str(bad), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(bad.with_suffix("")) in err[0], err


# --- memory, logs, version --------------------------------------------------------------

def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height (its pixel data is a few rows)."""
    import struct
    import zlib

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + 3 * width) * 4, 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows)
            + chunk(b"IEND", b""))


def test_a_small_file_declaring_huge_sides_is_refused_without_decoding(tmp_path):
    huge = tmp_path / "TCGA_CS_0001_20000101_1.png"
    huge.write_bytes(_png_declaring(20000, 20000))
    assert huge.stat().st_size < 1_000_000
    # VmHWM: this process's peak resident memory in kB (ru_maxrss would include the memory
    # of the pytest process it was forked from).
    probe = ("import sys\nfrom bt_pipeline.data.preprocess import read_image, SliceReadError\n"
             "try:\n    read_image(sys.argv[1])\nexcept SliceReadError as e:\n    print(e)\n"
             "status = open('/proc/self/status').read().split('VmHWM:')[1]\n"
             "print(int(status.split()[0]))")
    out = subprocess.run([sys.executable, "-c", probe, str(huge)], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert "too large to decode" in out[0] or "over the 2048 px limit" in out[0]
    assert int(out[1]) * 1024 < 1024**3  # peak memory under 1 GB
    medium = tmp_path / "TCGA_CS_0001_20000101_2.png"
    medium.write_bytes(_png_declaring(5000, 40))
    from bt_pipeline.data.preprocess import SliceReadError, read_image

    with pytest.raises(SliceReadError, match="declares size 5000x40"):
        read_image(medium)


@pytest.mark.integration
def test_a_normal_run_prints_no_tensorflow_log_lines(tiny_models, scans, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP")}
    result = subprocess.run(
        [sys.executable, "-m", "bt_pipeline.infer", str(scans), "--out", str(tmp_path / "out"),
         "--classifier", str(tiny_models[0]), "--unet", str(tiny_models[1]), "--quiet"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0
    noise = [line for line in result.stderr.splitlines()
             if any(word in line for word in ("tensorflow", "absl", "oneDNN", "I0000", "W0000",
                                              "E0000", "cuda"))]
    assert noise == []


def test_version_and_fast_help(capsys):
    from bt_pipeline import __version__

    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "bt_pipeline.infer", "--help"], cwd=REPO, check=True,
                   capture_output=True)
    assert time.monotonic() - started < 3  # < 1 s on an idle machine; slack for a busy CI


def test_a_missing_scan_dir_is_refused_at_once_without_tensorflow(tmp_path):
    probe = ("import sys, time; from bt_pipeline.infer import main; t = time.monotonic(); "
             "code = main(sys.argv[1:]); print(code, time.monotonic() - t, "
             "'tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "nowhere"), "--out",
                             str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True)
    code, seconds, loaded = result.stdout.split()
    assert (code, loaded) == ("2", "False")
    assert float(seconds) < 1.0
    assert result.stderr.strip() == f"error: SCAN_DIR not found: {tmp_path / 'nowhere'}"
    assert not (tmp_path / "out").exists()


def test_a_scan_dir_with_nothing_to_segment_is_refused_before_the_models_load(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here\n")
    probe = ("import sys; from bt_pipeline.infer import main; code = main(sys.argv[1:]); "
             "print(code, 'tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "notes"), "--out",
                             str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True)
    assert result.stdout.split() == ["2", "False"]
    assert "error: nothing to segment" in result.stderr
