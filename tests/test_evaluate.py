import pandas as pd
import pytest

from bt_pipeline.config import DataConfig
from bt_pipeline.evaluation.evaluate import run_evaluation
from bt_pipeline.inference.predictor import TwoStagePredictor


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
    ceiling = tables["input_size_ceiling"]
    assert list(ceiling["split"]) == ["val", "test"] and "input_size_ceiling" in (
        out / "summary.md").read_text()
    assert ceiling[["iou_pooled_area_masks", "iou_pooled_nearest_masks"]].stack().between(
        0.5, 1.0).all()
    segmentation = tables["segmentation"]
    assert segmentation["dice_pipeline_mean"].between(0, 1).all()
    patients = pd.read_csv(out / "patients.csv")
    assert len(patients) == patients["patient_id"].nunique() == 4
    summary = (out / "summary.md").read_text()
    assert "| split |" in summary and "dice_unet_mean" in summary
    detection = tables["pipeline_slice_detection"].set_index("split")
    slices = pd.read_csv(out / "slices.csv")
    for split, group in slices.groupby("split"):
        drawn, truth = group["pipeline_pixels"] > 0, group["has_tumor"] == 1
        assert detection.loc[split, "tp"] == int((drawn & truth).sum())
        assert detection.loc[split, "fp"] == int((drawn & ~truth).sum())
        assert detection.loc[split, "accuracy"] == pytest.approx(float((drawn == truth).mean()))
    assert set(tables["by_institution"]["institution"]) <= {"CS", "DU", "FG", "HT"}
    assert set(tables["by_slice_level"]["level"]) <= {"lower third", "middle third",
                                                      "upper third"}


def test_input_size_ceiling_scores_the_truth_after_the_trip_to_the_unet_size_and_back():
    import numpy as np

    from bt_pipeline.evaluation.scoring import PatientPrediction, input_size_ceiling

    yy, xx = np.mgrid[:256, :256]
    disc = (yy - 100.4) ** 2 + (xx - 140.6) ** 2 < 20.5 ** 2
    patient = PatientPrediction(rows=pd.DataFrame(), truths=[np.zeros_like(disc), disc],
                                probabilities=np.zeros(2), maps=[None, None])
    assert input_size_ceiling([patient], 256) == {"area": 1.0, "nearest": 1.0}
    shrunk = input_size_ceiling([patient], 128)
    assert 0.98 < shrunk["area"] < 1.0
    assert shrunk["nearest"] < shrunk["area"] - 0.02
    assert input_size_ceiling([patient], 32)["area"] < shrunk["area"]


def test_a_patient_is_scored_with_a_perfect_gate_with_its_stage_1_and_with_none(tiny_models):
    import numpy as np

    from bt_pipeline.evaluation.scoring import PatientPrediction, score_patient
    from bt_pipeline.inference.predictor import TwoStagePredictor

    predictor = TwoStagePredictor.load(*tiny_models)
    truths = [np.zeros((16, 16), bool) for _ in range(3)]
    truths[0][2:6, 2:6] = True
    truths[1][2:4, 2:6] = True
    maps = [np.zeros((16, 16), np.float32) for _ in range(3)]
    maps[0][2:6, 2:6] = 0.9  # found
    maps[1][2:4, 2:6] = 0.9  # found, if the gate lets the slice through
    maps[2][8:12, 8:12] = 0.9  # a false alarm on a tumour-free slice
    threshold = predictor.classifier_config.threshold
    rows = pd.DataFrame({"patient_id": ["p"] * 3, "institution": ["CS"] * 3,
                         "slice": [1, 2, 3], "n_slices": [3] * 3})
    prediction = PatientPrediction(rows=rows, truths=truths, maps=maps,
                                   probabilities=np.array([1.0, 0.0, 1.0]) * (threshold + 1))
    patient, _ = score_patient(predictor, prediction)
    assert not predictor.unet_config.keep_largest_3d  # every component counts
    assert patient["dice_unet"] == 1.0
    assert patient["dice_pipeline"] == pytest.approx(2 * 16 / (24 + 32))  # slice 2 gated away
    assert patient["dice_no_gate"] == pytest.approx(2 * 24 / (24 + 40))  # the false alarm kept
