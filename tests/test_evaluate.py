import pandas as pd
import pytest

from bt_pipeline.config import DataConfig
from bt_pipeline.evaluate import run_evaluation
from bt_pipeline.predict import TwoStagePredictor


def test_evaluation_report_on_synthetic_patients(tiny_models, synthetic_root, synthetic_manifest,
                                                 tmp_path):
    predictor = TwoStagePredictor.load(*tiny_models)
    data = DataConfig(data_root=str(synthetic_root), manifest=str(synthetic_manifest))
    out = tmp_path / "report"
    tables = run_evaluation(predictor, data, ["val", "test"], out)
    for name in ("summary.md", "patients.csv", "slices.csv", "classifier_roc.png",
                 "classifier_confusion.png", "dice_per_patient.png", "best_worst_slices.png",
                 "threshold_sweep.csv", "threshold_sweep.png"):
        assert (out / name).stat().st_size > 0, name
    assert list(tables["classifier"]["split"]) == ["val", "test"]
    segmentation = tables["segmentation"]
    assert segmentation["dice_pipeline_mean"].between(0, 1).all()
    patients = pd.read_csv(out / "patients.csv")
    assert len(patients) == patients["patient_id"].nunique() == 4
    summary = (out / "summary.md").read_text()
    assert "| split |" in summary and "dice_unet_mean" in summary
    assert set(tables["by_institution"]["institution"]) <= {"CS", "DU", "FG", "HT"}
    assert set(tables["by_slice_level"]["level"]) <= {"lower third", "middle third",
                                                      "upper third"}


def test_postprocessing_is_adopted_only_when_it_helps_on_val():
    from bt_pipeline.evaluate import choose_postprocessing

    def sweep(dice_by_pixels):
        return pd.DataFrame([{"mask_threshold": 0.5, "classifier_threshold": 0.3,
                              "min_component_pixels": px, "dice_pipeline_mean": d}
                             for px, d in dice_by_pixels.items()])

    chosen = choose_postprocessing(sweep({0: 0.80, 50: 0.83, 100: 0.82}), 0.3)
    assert chosen == (50, pytest.approx(0.03))
    assert choose_postprocessing(sweep({0: 0.80, 50: 0.802}), 0.3)[0] == 0
    assert choose_postprocessing(sweep({0: 0.80, 50: 0.70}), 0.3)[0] == 0


def test_small_components_are_removed():
    import numpy as np

    from bt_pipeline.predict import remove_small_components

    mask = np.zeros((20, 20), np.uint8)
    mask[2:4, 2:4] = 1  # 4 px
    mask[10:16, 10:16] = 1  # 36 px
    kept = remove_small_components(mask, 10)
    assert kept.sum() == 36 and kept[2, 2] == 0
    assert remove_small_components(mask, 0).sum() == 40
