"""The per-case quality estimate: its features, its fit, and what infer writes with and without
it (synthetic, fast)."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from bt_pipeline.config import SHIPPED_UNET
from bt_pipeline.inference.quality import (
    FEATURES,
    QUALITY_FILE,
    QualityModel,
    case_features,
    fit_quality,
)


def _blob(centre: tuple[int, int], size: int = 64, radius: int = 8) -> np.ndarray:
    rows, columns = np.mgrid[:size, :size]
    inside = (rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 <= radius ** 2
    return np.where(inside, 0.95, 0.02).astype(np.float32)


def _features(mirror_centre: tuple[int, int]) -> dict[str, float]:
    """Six slices, stage 1 passing the middle four; the mirrored run finds the blob at
    ``mirror_centre``."""
    maps = [None, _blob((30, 20)), _blob((30, 20)), _blob((30, 20)), _blob((30, 20)), None]
    mirrored = [None if m is None else _blob(mirror_centre) for m in maps]
    masks = [np.zeros((64, 64), np.uint8) if m is None else (m > 0.5).astype(np.uint8)
             for m in maps]
    return case_features(maps, mirrored, masks, 0.5, stripped=False, flair_only=False)


def test_a_mask_that_disagrees_with_its_mirror_gets_a_lower_estimate():
    agrees, disagrees = _features((30, 20)), _features((30, 44))
    assert agrees["mirror_dice"] == pytest.approx(1.0) and disagrees["mirror_dice"] == 0.0
    shipped = QualityModel.load(SHIPPED_UNET.with_name(QUALITY_FILE))
    assert shipped.estimate(disagrees)[0] < shipped.estimate(agrees)[0]


def _table(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    table = pd.DataFrame({name: rng.random(120) for name in FEATURES})
    table["dice"] = np.clip(0.2 + 0.8 * table["mirror_dice"] + rng.normal(0, 0.05, 120), 0, 1)
    table["fold"] = np.arange(120) % 5
    return table


def test_the_estimate_is_deterministic_and_learns_what_predicts_dice():
    first, again = fit_quality(_table(), "synthetic"), fit_quality(_table(), "synthetic")
    assert first == again
    assert _features((30, 44)) == _features((30, 44))
    mirror = first.features.index("mirror_dice")
    assert first.coef[mirror] < 0  # more self-agreement, less chance of a poor mask
    dice, review = first.estimate(_features((30, 44)))
    assert 0 <= dice <= 1 and review in (0, 1)


def test_the_estimate_round_trips_through_its_file(tmp_path):
    model = fit_quality(_table(), "synthetic")
    model.save(tmp_path / QUALITY_FILE)
    assert QualityModel.load(tmp_path / QUALITY_FILE) == model


def test_a_bundle_without_an_estimate_runs_with_empty_columns_and_a_note(
        run_infer, synthetic_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_infer(synthetic_root, "--out", out) == 0
    patients = pd.read_csv(out / "patients.csv")
    assert patients[["predicted_dice", "review"]].isna().all().all()
    assert "note: no quality estimate ships with this U-Net" in capsys.readouterr().err


def test_with_an_estimate_every_case_gets_a_predicted_dice_and_flags_come_first(
        tiny_models, synthetic_root, tmp_path, capsys):
    from bt_pipeline.infer import main

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for model in tiny_models:
        for suffix in (".keras", ".json"):
            shutil.copyfile(model.with_suffix(suffix), bundle / model.with_suffix(suffix).name)
    fitted = fit_quality(_table(), "synthetic")
    # every case flagged: whatever the tiny models' features, the flag must reach each output
    QualityModel(**{**fitted.__dict__, "review_threshold": 0.0}).save(bundle / QUALITY_FILE)
    out = tmp_path / "out"
    assert main([str(synthetic_root), "--out", str(out), "--quiet",
                 "--classifier", str(bundle / tiny_models[0].name),
                 "--unet", str(bundle / tiny_models[1].name)]) == 0
    patients = pd.read_csv(out / "patients.csv")
    assert patients["predicted_dice"].between(0, 1).all() and (patients["review"] == 1).all()
    printed = capsys.readouterr().out
    assert printed.count("; check: predicted Dice") == len(patients)
    assert "CHECK" in (out / "report.html").read_text(encoding="utf-8")
    viewer = (out / patients["patient_id"][0] / "viewer.html").read_text(encoding="utf-8")
    assert '"review": 1' in viewer
