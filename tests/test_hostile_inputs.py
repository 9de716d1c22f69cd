"""Hostile inputs: random bytes, damaged model files, an output folder that cannot be written."""

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bt_pipeline.data.preprocess import SliceReadError, read_image

FUZZ = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]


@settings(max_examples=150, deadline=None, suppress_health_check=FUZZ)
@given(data=st.binary(max_size=4096), suffix=st.sampled_from([".tif", ".png", ".tiff"]))
def test_random_bytes_never_crash_the_reader(tmp_path, data, suffix):
    path = tmp_path / f"TCGA_CS_0001_20000101_1{suffix}"
    path.write_bytes(data)
    try:
        image = read_image(path)
    except SliceReadError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
    else:  # bytes that happen to decode must still give a proper RGB slice
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


@settings(max_examples=60, deadline=None, suppress_health_check=FUZZ)
@given(height=st.integers(1, 300), width=st.integers(1, 300),
       channels=st.sampled_from([1, 2, 3, 4]),
       dtype=st.sampled_from([np.uint8, np.uint16, np.float32]), cut=st.floats(0.05, 1.0))
def test_odd_shapes_dtypes_and_truncations_give_a_clear_error_or_a_slice(
        tmp_path, height, width, channels, dtype, cut):
    array = np.zeros((height, width, channels), dtype)
    path = tmp_path / "TCGA_CS_0001_20000101_1.tif"
    try:
        if not cv2.imwrite(str(path), array):
            return
    except cv2.error:
        return  # OpenCV cannot even write this combination
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * cut))])
    try:
        image = read_image(path)
    except SliceReadError as exc:
        assert str(exc).startswith(str(path))
    else:
        assert image.dtype == np.uint8 and image.shape[2] == 3
        assert 32 <= image.shape[0] <= 2048 and 32 <= image.shape[1] <= 2048


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_model_file_gives_a_clear_error(tiny_models, tmp_path, damage):
    from bt_pipeline.inference.predictor import ModelLoadError, load_model_file

    good = tiny_models[1].read_bytes()
    bad = tmp_path / "unet.keras"
    bad.write_bytes({"truncated": good[: len(good) // 2], "garbage": b"\x00junk" * 100,
                     "empty": b""}[damage])
    with pytest.raises(ModelLoadError, match="unet.keras"):
        load_model_file(bad)


def test_model_files_are_loaded_in_safe_mode(tmp_path):
    """A model file carrying a Python lambda is refused, not executed."""
    import keras

    from bt_pipeline.inference.predictor import ModelLoadError, load_model_file

    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(lambda x: x * 2)(inputs)
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(ModelLoadError, match="lambda.keras"):
        load_model_file(path)


def test_unwritable_output_is_a_clear_error_and_leaves_nothing(tiny_models, synthetic_root,
                                                               tmp_path, capsys):
    from bt_pipeline.infer import main

    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the output folder should go")
    code = main([str(synthetic_root), "--out", str(blocker / "out"), "--quiet",
                 "--classifier", str(tiny_models[0]), "--unet", str(tiny_models[1])])
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot write outputs" in err and "not_a_folder" in err
    assert blocker.read_text().startswith("a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_folder"]


@pytest.mark.parametrize("case", ["too_wide", "too_big_file"])
def test_oversized_inputs_are_refused_clearly(tmp_path, case):
    path = tmp_path / "TCGA_CS_0001_20000101_1.tif"
    if case == "too_wide":
        cv2.imwrite(str(path), np.zeros((40, 2100, 3), np.uint8))
        reason = "over the 2048 px limit"
    else:
        with open(path, "wb") as handle:  # sparse: costs no disk
            handle.truncate(65 * 1024 * 1024)
        reason = "too large"
    with pytest.raises(SliceReadError, match=reason) as info:
        read_image(path)
    assert str(info.value).startswith(str(path))


def test_disk_full_mid_run_is_a_clear_error_with_no_half_written_file(
        tiny_models, synthetic_root, tmp_path, monkeypatch, capsys):
    import errno

    from bt_pipeline.infer import main
    from bt_pipeline.inference import outputs as report

    real_imwrite, calls = report._imwrite, {"n": 0}

    def fills_the_disk(path, array):
        calls["n"] += 1
        if calls["n"] > 12:  # part way through the second patient
            with open(path, "wb") as handle:
                handle.write(b"\x89PNG half")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_imwrite(path, array)

    monkeypatch.setattr(report, "_imwrite", fills_the_disk)
    out = tmp_path / "out"
    code = main([str(synthetic_root), "--out", str(out), "--quiet",
                 "--classifier", str(tiny_models[0]), "--unet", str(tiny_models[1])])
    assert code == 2
    assert "No space left on device" in capsys.readouterr().err
    written = list(out.rglob("*"))
    assert not [p for p in written if ".tmp" in p.name]  # no temporary leftovers
    for png in (p for p in written if p.suffix == ".png"):
        assert cv2.imread(str(png), cv2.IMREAD_UNCHANGED) is not None  # every file whole
