"""Promise: no user file is lost or overwritten. A name read from the input never becomes a
path outside its case folder, OUT is replaced only when it is an earlier run's (by the marker
only bt writes), clean-up matches exact names, and the final swap cannot be split by a
signal. Each test failed against the code before these promises were kept."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from bt_pipeline.inference import output_folder
from bt_pipeline.inference.output_folder import (
    RUN_MARKER,
    OutputFolder,
    name_problem,
    output_file_name,
)


def _flair(path: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    volume = rng.integers(0, 200, (6, 64, 64)).astype(np.int16)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((0.9, 0.9, 3.0))
    sitk.WriteImage(image, str(path))


@pytest.fixture
def good_case(tmp_path):
    case = tmp_path / "scans" / "good"
    case.mkdir(parents=True)
    _flair(case / "good_flair.nii.gz")
    return case


# --- names from the input stay inside OUT --------------------------------------------------

@pytest.mark.parametrize("name, given_alone", [("..-flair.nii.gz", False),
                                               (".._0001.nii.gz", False),
                                               ("...nii.gz", True), (".nii.gz", True)])
def test_a_case_named_like_a_path_component_never_writes_outside_its_folder(
        run_infer, good_case, tmp_path, name, given_alone, capsys):
    scans = good_case.parent
    bad = (tmp_path / "single" if given_alone else scans) / name
    bad.parent.mkdir(exist_ok=True)
    _flair(bad, seed=1)
    bystander = tmp_path / "results" / "thesis.txt"
    bystander.parent.mkdir()
    bystander.write_text("mine")
    out = tmp_path / "results" / "run"
    code = run_infer(scans, *([bad] if given_alone else []), "--out", out)
    assert code == 1  # the good case done, the other skipped
    assert bystander.read_text() == "mine"
    assert sorted(p.name for p in bystander.parent.iterdir()) == ["run", "thesis.txt"]
    assert _patients(out) == ["good"]
    assert "rename it" in capsys.readouterr().err
    errors = pd.read_csv(out / "errors.csv")
    assert errors["problem"].str.contains("case not processed").any()
    assert errors["skipped"].tolist() == [1] * len(errors)  # 1/0, not True/False


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\0b", "patients.csv", "RUN.JSON",
                                  "x" * 201])
def test_name_problem_refuses_every_name_that_is_not_one_plain_name(name):
    assert name_problem(name)


@pytest.mark.parametrize("name", ["TCGA_CS_4941_19960909", "BraTS-0042", "case 7", "x" * 200,
                                  "TCGA_CS_\\xff01"])
def test_name_problem_accepts_plain_names(name):
    assert name_problem(name) is None


def test_a_long_slice_name_gets_a_unique_short_output_name():
    long_a, long_b = "a" * 240 + "_1", "a" * 240 + "_2"
    name_a, name_b = output_file_name(long_a, "_mask.png"), output_file_name(long_b, "_mask.png")
    assert name_a != name_b
    assert len(name_a.encode()) <= 200 and name_a.endswith("_mask.png")
    assert output_file_name("short", "_mask.png") == "short_mask.png"


def test_a_case_named_like_an_output_table_is_skipped_not_the_batch(run_infer, good_case,
                                                                    tmp_path):
    table = good_case.parent / "patients.csv"
    table.mkdir()
    _flair(table / "flair.nii.gz", seed=2)
    out = tmp_path / "out"
    assert run_infer(good_case.parent, "--out", out) == 1
    assert _patients(out) == ["good"]
    assert (out / "patients.csv").is_file()


def _patients(out: Path) -> list[str]:
    return sorted(pd.read_csv(out / "patients.csv")["patient_id"])


# --- OUT is an earlier run's only by bt's own marker ----------------------------------------

@pytest.mark.parametrize("table", ["slices.csv", "run.json"])
def test_a_folder_with_a_table_named_file_is_not_taken_for_an_earlier_run(
        run_infer, good_case, tmp_path, table, capsys):
    out = tmp_path / "thesis"
    (out / "chapters").mkdir(parents=True)
    (out / "chapters" / "one.tex").write_text("years of work")
    (out / table).write_text("{}\n" if table == "run.json" else "a,b\n")
    assert run_infer(good_case.parent, "--out", out) == 2
    assert "holds files that bt did not write" in capsys.readouterr().err
    assert (out / "chapters" / "one.tex").read_text() == "years of work"


def test_an_earlier_run_is_replaced_and_carries_the_marker(run_infer, good_case, tmp_path):
    out = tmp_path / "out"
    assert run_infer(good_case.parent, "--out", out) == 0
    marker = json.loads((out / RUN_MARKER).read_text())
    assert marker["tool"] == "bt_pipeline" and marker["run_id"]
    assert run_infer(good_case.parent, "--out", out) == 0
    assert json.loads((out / RUN_MARKER).read_text())["run_id"] != marker["run_id"]


def test_a_run_written_before_the_marker_existed_is_still_recognised(run_infer, good_case,
                                                                     tmp_path):
    out = tmp_path / "out"
    assert run_infer(good_case.parent, "--out", out) == 0
    (out / RUN_MARKER).unlink()  # as an older version left it: run.json names the tool
    assert run_infer(good_case.parent, "--out", out) == 0


# --- clean-up matches exact names -----------------------------------------------------------

@pytest.mark.parametrize("name", ["results[1]", "*", "?"])
def test_clean_up_never_touches_another_outs_staging(tmp_path, name):
    other = tmp_path / ".results1.bt-partial-99999"
    other.mkdir()
    (other / "patient.nii.gz").write_text("another run's work")
    also = tmp_path / ".x.bt-partial-1"
    also.mkdir()
    with OutputFolder(tmp_path / name) as folder:
        (folder.staging / "a").write_text("new")
        folder.commit({"status": "complete"})
    assert (other / "patient.nii.gz").is_file() and also.is_dir()
    assert (tmp_path / name / "a").is_file()


def test_own_leftover_staging_is_removed(tmp_path):
    leftover = tmp_path / ".out.bt-partial-12345"
    leftover.mkdir()
    with OutputFolder(tmp_path / "out") as folder:
        folder.commit({"status": "complete"})
    assert not leftover.exists()


# --- the swap is one step -----------------------------------------------------------------

def _earlier(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    with OutputFolder(out) as folder:
        (folder.staging / "old.txt").write_text("old run")
        folder.commit({"status": "complete"})
    return out


def test_swap_is_a_rename_exchange_where_the_os_has_one(tmp_path, monkeypatch):
    probe_a, probe_b = tmp_path / "probe_a", tmp_path / "probe_b"
    probe_a.mkdir()
    probe_b.mkdir()
    (probe_a / "x").touch()
    if not output_folder.exchange(probe_a, probe_b):
        pytest.skip("this OS or file system has no rename-exchange")
    assert (probe_b / "x").exists() and not (probe_a / "x").exists()
    out = _earlier(tmp_path)
    calls = []
    monkeypatch.setattr(output_folder.os, "replace",
                        lambda *a: calls.append(a) or shutil.move(*a))
    with OutputFolder(out) as folder:
        (folder.staging / "new.txt").write_text("new run")
        folder.commit({"status": "complete"})
    assert (out / "new.txt").is_file() and not (out / "old.txt").exists()
    swaps = [c for c in calls if Path(c[1]) == out]
    assert not swaps, "OUT was replaced by renames, not one exchange"


def test_a_signal_during_a_two_rename_swap_leaves_a_complete_out(tmp_path, monkeypatch):
    """Where no exchange exists: SIGTERM arriving between the two renames is held back until
    OUT is in place."""
    out = _earlier(tmp_path)
    monkeypatch.setattr(output_folder, "exchange", lambda a, b: False)
    real_replace, seen = os.replace, []

    def replace_then_signal(a, b):
        real_replace(a, b)
        if not seen:
            seen.append(b)
            os.kill(os.getpid(), signal.SIGTERM)  # between the first and the second rename

    received = []
    previous = signal.signal(signal.SIGTERM, lambda *a: received.append(1))
    try:
        monkeypatch.setattr(output_folder.os, "replace", replace_then_signal)
        with OutputFolder(out) as folder:
            (folder.staging / "new.txt").write_text("new run")
            folder.commit({"status": "complete"})
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert received == [1]  # acted on, after the swap
    assert (out / "new.txt").is_file()


# --- every argument is checked before any work --------------------------------------------

@pytest.mark.parametrize("spacing", [["nan", "1", "1"], ["inf", "1", "1"], ["1", "1", "0"]])
def test_a_bad_spacing_is_refused_before_work(run_infer, good_case, tmp_path, spacing, capsys):
    out = tmp_path / "out"
    assert run_infer(good_case.parent, "--out", out, "--spacing", *spacing) == 2
    assert "--spacing" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("where", ["folder", "under_a_file"])
def test_a_bad_timing_path_is_refused_before_work(run_infer, good_case, tmp_path, where,
                                                  capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    timing = tmp_path if where == "folder" else blocker / "t.json"
    out = tmp_path / "out"
    assert run_infer(good_case.parent, "--out", out, "--timing", timing) == 2
    assert "--timing" in capsys.readouterr().err
    assert not out.exists()


def test_an_empty_scan_dir_is_refused_not_the_working_folder(run_infer, tmp_path, capsys):
    assert run_infer("", "--out", tmp_path / "out") == 2
    assert "SCAN_DIR is empty" in capsys.readouterr().err


def test_a_tiny_file_declaring_a_huge_volume_is_refused_from_its_header(tmp_path):
    import gzip

    import nibabel as nib

    from bt_pipeline.data.volumes import MAX_VOXELS, VolumeReadError, read_volume

    header = nib.Nifti1Header()  # 400 M voxels declared, each side within its limit
    header.set_data_shape((2000, 2000, 100))
    header.set_data_dtype(np.uint8)
    path = tmp_path / "huge_flair.nii.gz"
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4))  # a 100-byte file
    assert 2000 * 2000 * 100 > MAX_VOXELS
    with pytest.raises(VolumeReadError, match="voxels in all"):
        read_volume(path)


# --- a symlink loop is one input problem, not the end of the batch ---------------------------

def test_a_symlink_loop_beside_good_input_is_skipped(run_infer, good_case, tmp_path, capsys):
    loop_a, loop_b = tmp_path / "loop_a", tmp_path / "loop_b"
    loop_a.symlink_to(loop_b)
    loop_b.symlink_to(loop_a)
    out = tmp_path / "out"
    assert run_infer(loop_a, good_case.parent, "--out", out) == 1
    assert _patients(out) == ["good"]
    assert "symlink loop" in capsys.readouterr().err


def test_a_symlink_loop_as_out_is_refused(run_infer, good_case, tmp_path, capsys):
    loop_a, loop_b = tmp_path / "loop_a", tmp_path / "loop_b"
    loop_a.symlink_to(loop_b)
    loop_b.symlink_to(loop_a)
    assert run_infer(good_case.parent, "--out", loop_a) == 2
    assert "symlink loop" in capsys.readouterr().err


def test_sigterm_while_the_tables_are_written_keeps_every_finished_patient(
        run_infer, good_case, tmp_path, monkeypatch):
    from bt_pipeline.inference import pipeline

    real = pipeline._write_tables

    def write_then_signal(out, result, manifest=None):
        os.kill(os.getpid(), signal.SIGTERM)
        real(out, result, manifest)

    monkeypatch.setattr(pipeline, "_write_tables", write_then_signal)
    out = tmp_path / "out"
    assert run_infer(good_case.parent, "--out", out) == 130
    assert _patients(out) == ["good"]
    assert (out / "report.html").is_file()


# --- no patient vanishes unreported --------------------------------------------------------

def test_slice_patients_beside_a_volume_case_are_processed(run_infer, good_case, tmp_path,
                                                           synthetic_root):
    patient = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
    shutil.copytree(patient, good_case.parent / patient.name)
    out = tmp_path / "out"
    assert run_infer(good_case.parent, "--out", out) == 0
    assert _patients(out) == sorted(["good", patient.name])


def test_a_case_nested_too_deep_is_reported_not_dropped(run_infer, good_case, tmp_path,
                                                        capsys):
    deep = good_case.parent / "site" / "deep"  # cases are looked for one level down
    deep.mkdir(parents=True)
    _flair(deep / "deep_flair.nii.gz")
    out = tmp_path / "out"
    assert run_infer(good_case.parent, "--out", out) == 1
    assert "not searched" in capsys.readouterr().err
    errors = pd.read_csv(out / "errors.csv")
    assert errors["path"].str.endswith("deep").any()


def test_an_extra_folder_without_images_does_not_split_a_dicom_case(tmp_path):
    from bt_pipeline.data.layout import scan_inputs
    from bt_pipeline.studies.roundtrip import write_dicom_series

    volume = sitk.GetImageFromArray(np.random.default_rng(0).integers(
        0, 200, (4, 32, 32)).astype(np.int16))
    case = tmp_path / "case7"
    write_dicom_series(volume, case / "s1", "AX FLAIR", 1)
    write_dicom_series(volume, case / "s2", "T1 POST GD", 2)
    (case / "notes").mkdir()
    (case / "notes" / "readme.txt").write_text("export notes")
    patients, problems = scan_inputs([case])
    assert [p.patient_id for p in patients] == ["case7"]
    assert len(patients[0].dicom_series) == 2
    assert any("holds no DICOM" in p.problem and not p.skipped for p in problems)


def test_nothing_is_left_beside_out(run_infer, synthetic_root, tmp_path):
    """No lock file, staging folder or old copy stays in OUT's parent after a run, a rerun, or
    a refused call."""
    runs = tmp_path / "runs"
    runs.mkdir()
    out = runs / "out"
    assert run_infer(synthetic_root, "--out", out) == 0
    assert run_infer(synthetic_root, "--out", out) == 0  # replaces the earlier run
    assert run_infer(tmp_path / "missing", "--out", out) == 2
    assert sorted(p.name for p in runs.iterdir()) == ["out"]
