"""Slow: the shipped models on the real test patients reproduce the README's figures."""

import pytest

pytestmark = pytest.mark.slow


def test_shipped_models_reproduce_the_documented_test_figures(real_root):
    from bt_pipeline.config import DataConfig
    from bt_pipeline.data.manifest import read_manifest
    from bt_pipeline.evaluation.metrics import classification_metrics
    from bt_pipeline.evaluation.scoring import evaluate_split, summarise
    from bt_pipeline.inference.predictor import TwoStagePredictor

    predictor = TwoStagePredictor.load()
    manifest = read_manifest(DataConfig.manifest)
    patients, slices = evaluate_split(predictor, manifest, "test", real_root)
    summary = summarise(patients, slices).iloc[0]
    assert summary["dice_unet_mean"] == pytest.approx(0.901, abs=0.002)
    assert summary["dice_pipeline_mean"] == pytest.approx(0.900, abs=0.002)
    metrics = classification_metrics(slices["has_tumor"], slices["classifier_probability"],
                                     predictor.classifier_config.threshold)
    assert metrics["auc"] == pytest.approx(0.987, abs=0.002)
