"""The stage-1 comparison: a gate's pipeline Dice and the paired differences it reports."""

import dataclasses

import numpy as np
import pandas as pd
import pytest


def test_a_gate_that_stops_a_false_alarm_slice_scores_higher(tiny_models):
    from bt_pipeline.evaluation.scoring import PatientPrediction
    from bt_pipeline.inference.predictor import TwoStagePredictor
    from bt_pipeline.studies.stage1_choice import gated_dice

    predictor = TwoStagePredictor.load(*tiny_models)
    truths = [np.zeros((16, 16), bool) for _ in range(3)]
    truths[0][2:6, 2:6] = True
    maps = [np.zeros((16, 16), np.float32) for _ in range(3)]
    maps[0][2:6, 2:6] = 0.9  # the tumour found
    maps[2][8:12, 8:12] = 0.9  # a false alarm on a tumour-free slice
    prediction = PatientPrediction(rows=pd.DataFrame({"patient_id": ["p"] * 3}), truths=truths,
                                   probabilities=np.array([0.9, 0.1, 0.1]), maps=maps)
    everything = gated_dice(predictor, prediction, np.ones(3, bool))
    assert everything == pytest.approx(2 * 16 / (16 + 32))
    assert gated_dice(predictor, prediction, np.array([True, False, False])) == 1.0
    assert gated_dice(predictor, prediction, np.zeros(3, bool)) == 0.0


def test_sized_by_the_gate_the_component_it_is_sure_of_outweighs_a_larger_false_alarm(
        tiny_models):
    from bt_pipeline.evaluation.scoring import PatientPrediction
    from bt_pipeline.inference.predictor import TwoStagePredictor
    from bt_pipeline.studies.stage1_choice import gated_dice

    predictor = TwoStagePredictor.load(*tiny_models)
    truths = [np.zeros((16, 16), bool) for _ in range(3)]
    truths[0][2:6, 2:6] = True
    maps = [np.zeros((16, 16), np.float32) for _ in range(3)]
    maps[0][2:6, 2:6] = 0.9  # the tumour, 16 pixels, on a slice the gate is sure of
    maps[2][8:13, 8:13] = 0.9  # a false alarm, 25 pixels, on a slice it barely passes
    prediction = PatientPrediction(rows=pd.DataFrame({"patient_id": ["p"] * 3}), truths=truths,
                                   probabilities=np.array([0.9, 0.1, 0.1]), maps=maps)
    passed = np.ones(3, bool)
    for by, expected in (("voxels", 0.0), ("gate", 1.0)):
        predictor.unet_config = dataclasses.replace(predictor.unet_config, keep_largest_3d=True,
                                                    largest_3d_by=by)
        assert gated_dice(predictor, prediction, passed, prediction.probabilities) == expected
    # no stage 1, no probabilities: every voxel counts 1 whatever the rule says
    assert gated_dice(predictor, prediction, passed) == 0.0


def test_comparison_gives_means_and_paired_differences_with_their_standard_errors():
    from bt_pipeline.studies.stage1_choice import compare

    patients = pd.DataFrame({
        "patient_id": list("abcd"), "fold": [0, 0, 1, 1], "val_patient": [1, 1, 0, 1],
        "dice_no_gate": [0.8, 0.6, 0.9, 0.5], "dice_encoder_gate": [0.8, 0.7, 0.9, 0.7],
        "dice_other": [0.6, 0.7, np.nan, 0.5],
        **{f"{m}_{g}": [1.0] * 4 for m in ("sensitivity", "specificity")
           for g in ("no_gate", "encoder_gate", "other")}})
    table = compare(patients).set_index(["patients", "gate"])
    every = "every held-out patient"
    val = "val patients (the other model did not train on them)"
    assert table.loc[(every, "encoder_gate"), "dice_pipeline_mean"] == pytest.approx(0.775)
    assert table.loc[(every, "encoder_gate - no_gate"), "dice_pipeline_mean"] == \
        pytest.approx(0.075)
    assert table.loc[(every, "encoder_gate - no_gate"), "sem"] == \
        pytest.approx(np.std([0, 0.1, 0, 0.2], ddof=1) / 2)
    assert table.loc[(val, "other"), "n"] == 3
    assert table.loc[(val, "encoder_gate - other"), "dice_pipeline_mean"] == \
        pytest.approx(np.mean([0.2, 0.0, 0.2]))
