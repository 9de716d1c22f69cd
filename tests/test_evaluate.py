import pandas as pd

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
                 "classifier_confusion.png", "dice_per_patient.png", "best_worst_slices.png"):
        assert (out / name).stat().st_size > 0, name
    assert list(tables["classifier"]["split"]) == ["val", "test"]
    segmentation = tables["segmentation"]
    assert segmentation["dice_pipeline_mean"].between(0, 1).all()
    patients = pd.read_csv(out / "patients.csv")
    assert len(patients) == patients["patient_id"].nunique() == 4
    summary = (out / "summary.md").read_text()
    assert "| split |" in summary and "dice_unet_mean" in summary
    assert {"institution", "slice level"} <= set(tables["breakdown"]["by"])
