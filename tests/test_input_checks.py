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
