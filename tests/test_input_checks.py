"""Promise: no wrong answer with exit 0. An input with nothing to examine is skipped with one
line naming it, never answered "no tumour"; the other cases of the call are still processed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from bt_pipeline.data.volumes import VolumeReadError
from bt_pipeline.infer import main
from bt_pipeline.inference.segment import segment


def _write(path: Path, volume: np.ndarray) -> Path:
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((0.9, 0.9, 3.0))
    sitk.WriteImage(image, str(path))
    return path


BLANKS = {"zeros": np.zeros((6, 64, 64), np.float32),
          "constant": np.full((6, 64, 64), 7.0, np.float32),
          "nan": np.full((6, 64, 64), np.nan, np.float32)}


@pytest.mark.parametrize("kind", sorted(BLANKS))
def test_a_blank_volume_is_skipped_not_answered(run_infer, tmp_path, kind, capsys):
    scans = tmp_path / "scans"
    (scans / "good").mkdir(parents=True)
    (scans / "blank").mkdir()
    rng = np.random.default_rng(0)
    _write(scans / "good" / "good_flair.nii.gz", rng.integers(0, 200, (6, 64, 64)).astype(
        np.int16))
    _write(scans / "blank" / "blank_flair.nii.gz", BLANKS[kind])
    out = tmp_path / "out"
    assert run_infer(scans, "--out", out) == 1
    assert list(pd.read_csv(out / "patients.csv")["patient_id"]) == ["good"]
    err = capsys.readouterr().err
    assert "blank_flair.nii.gz: blank" in err
    errors = pd.read_csv(out / "errors.csv")
    assert (errors["patient_id"] == "blank").any()


def test_segment_refuses_a_blank_volume(tiny_models):
    from bt_pipeline.inference.predictor import TwoStagePredictor

    predictor = TwoStagePredictor.load(*tiny_models)
    image = sitk.GetImageFromArray(np.zeros((4, 32, 32), np.float32))
    with pytest.raises(VolumeReadError, match="blank"):
        segment(image, predictor=predictor)


# --- model configs are checked field by field ---------------------------------------------

@pytest.mark.parametrize("which, change, field", [
    ("classifier", {"threshold": 2.0}, "threshold"),
    ("classifier", {"threshold": float("nan")}, "threshold"),
    ("unet", {"min_component_pixels": 10**9}, "min_component_pixels"),
    ("unet", {"intensity": "sideways"}, "intensity"),
    ("unet", "empty", "type"),
    ("unet", "nested", "nested"),
])
def test_an_out_of_range_model_config_is_one_line_naming_file_and_field(
        tiny_models, tmp_path, which, change, field, capsys):
    import json
    import shutil

    classifier, unet = tiny_models
    paths = {"classifier": tmp_path / "classifier.keras", "unet": tmp_path / "unet.keras"}
    for name, source in (("classifier", classifier), ("unet", unet)):
        shutil.copy(source, paths[name])
        shutil.copy(source.with_suffix(".json"), paths[name].with_suffix(".json"))
    bad = paths[which].with_suffix(".json")
    config = json.loads(bad.read_text())
    if change == "empty":
        text = "{}"
    elif change == "nested":
        text = "[" * 100_000 + "]" * 100_000
    else:
        text = json.dumps({**config, **change})
    bad.write_text(text)
    scans = tmp_path / "scans"
    scans.mkdir()
    _write(scans / "one_flair.nii.gz", np.random.default_rng(0).integers(
        0, 200, (6, 64, 64)).astype(np.int16))
    code = main([str(scans), "--out", str(tmp_path / "out"), "--classifier",
                 str(paths["classifier"]), "--unet", str(paths["unet"]), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert str(bad) in err[0] and field in err[0], err


def test_a_gate_fine_tuning_more_blocks_than_the_trunk_has_is_refused():
    from bt_pipeline.config import GateConfig, from_dict, to_dict

    with pytest.raises(ValueError, match="GateConfig.fine_tune_blocks"):
        from_dict({**to_dict(GateConfig(image_size=160)), "fine_tune_blocks": 99})


def test_a_newline_in_a_file_name_cannot_forge_a_line(run_infer, synthetic_root, tmp_path,
                                                      capsys):
    import shutil

    patient = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
    scans = tmp_path / "scans"
    shutil.copytree(patient, scans / patient.name)
    (scans / patient.name / "notes\nskipped: forged.tif: fake").write_text("x")
    assert run_infer(scans, "--out", tmp_path / "out") == 0
    lines = capsys.readouterr().err.splitlines()
    assert not any(line.startswith("skipped: forged") for line in lines), lines
    assert any("notes\\nskipped: forged.tif" in line for line in lines), lines


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_truncated_nifti_is_skipped_and_the_batch_goes_on(run_infer, tmp_path, suffix,
                                                            capsys):
    scans = tmp_path / "scans"
    (scans / "good").mkdir(parents=True)
    (scans / "cut").mkdir()
    rng = np.random.default_rng(0)
    _write(scans / "good" / "good_flair.nii.gz",
           rng.integers(0, 200, (6, 64, 64)).astype(np.int16))
    cut = _write(scans / "cut" / f"cut_flair{suffix}",
                 rng.integers(0, 200, (20, 64, 64)).astype(np.int16))
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    out = tmp_path / "out"
    assert run_infer(scans, "--out", out) == 1
    assert list(pd.read_csv(out / "patients.csv")["patient_id"]) == ["good"]
    assert f"cut_flair{suffix}: truncated" in capsys.readouterr().err


def test_a_fifo_named_like_a_slice_is_said_to_be_one(tmp_path):
    import os

    from bt_pipeline.data.preprocess import SliceReadError, read_image

    fifo = tmp_path / "TCGA_CS_0001_20000101_1.tif"
    os.mkfifo(fifo)
    with pytest.raises(SliceReadError, match="not a regular file"):
        read_image(fifo)


# --- a DICOM series is read as its files say, or refused with the reason -------------------

def _series(folder: Path, depth: int = 8, side: int = 32, description: str = "AX FLAIR",
            number: int = 1) -> Path:
    from bt_pipeline.studies.roundtrip import write_dicom_series

    values = np.random.default_rng(number).integers(0, 1000, (depth, side, side))
    image = sitk.GetImageFromArray(values.astype(np.int16))
    image.SetSpacing((32 / side, 32 / side, 3.3))
    write_dicom_series(image, folder, description, number)
    return folder


@pytest.mark.parametrize("damage, reason", [("missing", "not evenly spaced"),
                                            ("repeated", "one slice position")])
def test_an_irregular_dicom_series_is_refused_not_spread_evenly(tmp_path, damage, reason):
    from bt_pipeline.data.volumes import read_volume

    series = _series(tmp_path / "flair")
    if damage == "missing":
        (series / "slice0004.dcm").unlink()
    else:
        (series / "slice0004b.dcm").write_bytes((series / "slice0004.dcm").read_bytes())
    with pytest.raises(VolumeReadError, match=reason):
        read_volume(series)
    (series / "slice0004b.dcm").unlink(missing_ok=True)
    if damage == "repeated":  # the intact series reads on its own 3.3 mm grid
        assert read_volume(series).GetSpacing()[2] == pytest.approx(3.3)


def test_a_one_file_series_keeps_its_slice_thickness(tmp_path):
    from bt_pipeline.data.volumes import read_volume

    image = read_volume(_series(tmp_path / "flair", depth=1))
    assert image.GetSpacing()[2] == pytest.approx(3.3)


def test_a_slice_of_another_size_is_named_with_both_sizes(tmp_path):
    from bt_pipeline.data.volumes import read_volume

    # one file of another plane size in the series (the UIDs come from the folder's path): an
    # export mixing matrices
    odd = _series(tmp_path / "flair", side=64) / "slice0003.dcm"
    kept = odd.read_bytes()
    series = _series(tmp_path / "flair")
    (series / "slice0003.dcm").write_bytes(kept)
    with pytest.raises(VolumeReadError, match=r"slice0003.dcm is 64x64 while the series' "
                                              r"first file is 32x32"):
        read_volume(series)


def test_a_dicom_file_or_dicomdir_beside_series_folders_is_not_the_case(tmp_path):
    from bt_pipeline.data.layout import scan_inputs

    case = tmp_path / "cases" / "case7"
    _series(case / "flair", description="AX FLAIR", number=1)
    _series(case / "t1", description="AX T1", number=2)
    (case / "DICOMDIR").write_bytes((case / "flair" / "slice0000.dcm").read_bytes())
    (case / "stray.dcm").write_bytes((case / "t1" / "slice0001.dcm").read_bytes())
    for scan_dir in (case, case.parent):
        found, problems = scan_inputs([scan_dir])
        assert [sorted(s.name for s in f.dicom_series) for f in found] == [["flair", "t1"]]
        lines = {p.path.rsplit("/", 1)[-1]: p for p in problems}
        assert not lines["DICOMDIR"].skipped and "DICOMDIR index" in lines["DICOMDIR"].problem
        assert lines["stray.dcm"].skipped and "beside the case's series" in \
            lines["stray.dcm"].problem


def test_two_series_of_one_description_are_told_apart_by_folder(tmp_path):
    from bt_pipeline.data.layout import scan_inputs
    from bt_pipeline.data.volumes import read_case

    case = tmp_path / "case7"
    _series(case / "flair_a", description="AX FLAIR", number=1)
    _series(case / "flair_b", description="AX FLAIR", number=2)
    _series(case / "t1", description="AX T1", number=3)
    (scan,), _ = scan_inputs([case])
    with pytest.raises(VolumeReadError, match="--series flair=FOLDER"):
        read_case(scan)
    with pytest.raises(VolumeReadError, match=r"fits 2 series \(flair_a, flair_b\)"):
        read_case(scan, {"flair": "AX FLAIR"})
    chosen = read_case(scan, {"flair": "FLAIR_B"})
    assert chosen.sources["flair"].endswith("flair_b")
    assert chosen.sequences == "pre+flair"


def test_a_sequence_covering_part_of_the_flair_gets_a_note():
    from bt_pipeline.data.volumes import case_on_model_grid

    rng = np.random.default_rng(0)
    flair = sitk.GetImageFromArray(rng.random((10, 64, 64)).astype(np.float32))
    flair.SetSpacing((1.0, 1.0, 3.0))
    sources = {"flair": "f.nii.gz", "pre": "t1.nii.gz"}
    whole = case_on_model_grid({"flair": flair, "pre": flair}, sources)
    assert whole.notes == []
    part = case_on_model_grid({"flair": flair, "pre": flair[:, :, :6]}, sources)
    assert part.sequences == "pre+flair"
    assert part.notes == ["the pre-contrast T1 (t1.nii.gz) covers 60% of the FLAIR volume; "
                          "outside it that channel is blank, which the models never saw"]


# --- library messages become the tool's one line --------------------------------------------

@pytest.mark.integration
def test_library_messages_never_reach_stderr_only_the_tools_lines(tiny_models, tmp_path):
    """ITK warns on an irregular series and nifticlib on a negative pixdim, straight to file
    descriptor 2; what the user sees is one line of the tool's per input."""
    import subprocess
    import sys

    import nibabel as nib

    scans = tmp_path / "scans"
    irregular = _series(scans / "irregular")
    (irregular / "slice0004.dcm").unlink()
    flipped = nib.Nifti1Image(np.random.default_rng(0).integers(0, 200, (64, 64, 6)).astype(
        np.int16), np.diag([0.9, 0.9, 3.0, 1.0]))
    flipped.header["pixdim"][1] = -0.9  # a header ITK reads with a warning
    (scans / "flipped").mkdir()
    nib.save(flipped, scans / "flipped" / "flipped_flair.nii.gz")
    result = subprocess.run(
        [sys.executable, "-m", "bt_pipeline.infer", str(scans), "--out", str(tmp_path / "out"),
         "--classifier", str(tiny_models[0]), "--unet", str(tiny_models[1]), "--quiet"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith(("skipped: ", "note: ", "ignored: ")) for line in lines), \
        lines
    assert any("irregular: slices are not evenly spaced" in line for line in lines)
