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


def test_postprocessing_is_adopted_only_when_it_helps_on_val():
    from bt_pipeline.evaluate import choose_postprocessing

    def sweep(dice_by_setting):
        return pd.DataFrame([{"mask_threshold": 0.5, "classifier_threshold": 0.3,
                              "min_component_pixels": px, "keep_largest_3d": largest,
                              "dice_pipeline_mean": d}
                             for (px, largest), d in dice_by_setting.items()])

    chosen = choose_postprocessing(sweep({(0, False): 0.80, (50, False): 0.83,
                                          (100, False): 0.82, (0, True): 0.81}), 0.3)
    assert chosen == (50, False, pytest.approx(0.03))
    chosen = choose_postprocessing(sweep({(0, False): 0.80, (50, False): 0.81,
                                          (0, True): 0.82}), 0.3)
    assert chosen == (0, True, pytest.approx(0.02))
    assert choose_postprocessing(sweep({(0, False): 0.80, (50, False): 0.802,
                                        (0, True): 0.803}), 0.3)[:2] == (0, False)
    worse = sweep({(0, False): 0.80, (50, False): 0.70})
    assert choose_postprocessing(worse, 0.3)[:2] == (0, False)


def test_only_the_largest_3d_component_is_kept():
    import numpy as np

    from bt_pipeline.predict import keep_largest_component_3d

    volume = np.zeros((4, 10, 10), np.uint8)
    volume[0:2, 1:4, 1:4] = 1  # 18 voxels over two slices
    volume[2, 4, 4] = 1  # touches the block only diagonally across slices: 26-connected
    volume[3, 7:9, 7:9] = 1  # 4 voxels, apart
    kept = keep_largest_component_3d(volume)
    assert kept.dtype == np.uint8 and kept.sum() == 19 and kept[3].sum() == 0
    assert keep_largest_component_3d(np.zeros((2, 5, 5), bool)).sum() == 0
    single = np.zeros((1, 5, 5), bool)
    single[0, 1, 1] = True
    assert keep_largest_component_3d(single).sum() == 1


def test_largest_3d_component_rule_applies_to_gated_volumes(tiny_models):
    import dataclasses

    import numpy as np

    from bt_pipeline.predict import TwoStagePredictor

    predictor = TwoStagePredictor.load(*tiny_models)
    keep = dataclasses.replace(predictor, unet_config=dataclasses.replace(
        predictor.unet_config, keep_largest_3d=True))
    maps = [np.zeros((8, 8), np.float32) for _ in range(3)]
    maps[0][1:4, 1:4] = 0.9  # the big component
    maps[2][6:8, 6:8] = 0.9  # a small one, two slices away
    plain = predictor.volume_masks(maps)
    assert [int(m.sum()) for m in plain] == [9, 0, 4]
    assert [int(m.sum()) for m in keep.volume_masks(maps)] == [9, 0, 0]
    gated = keep.volume_masks([None, maps[1], maps[2]])  # slice 0 not let through
    assert gated[0] is None and int(gated[2].sum()) == 4


def test_small_components_are_removed():
    import numpy as np

    from bt_pipeline.predict import remove_small_components

    mask = np.zeros((20, 20), np.uint8)
    mask[2:4, 2:4] = 1  # 4 px
    mask[10:16, 10:16] = 1  # 36 px
    kept = remove_small_components(mask, 10)
    assert kept.sum() == 36 and kept[2, 2] == 0
    assert remove_small_components(mask, 0).sum() == 40


def test_input_size_ceiling_scores_the_truth_after_the_trip_to_the_unet_size_and_back():
    import numpy as np

    from bt_pipeline.segmentation_eval import PatientPrediction, input_size_ceiling

    yy, xx = np.mgrid[:256, :256]
    disc = (yy - 100.4) ** 2 + (xx - 140.6) ** 2 < 20.5 ** 2
    patient = PatientPrediction(rows=pd.DataFrame(), truths=[np.zeros_like(disc), disc],
                                probabilities=np.zeros(2), maps=[None, None])
    assert input_size_ceiling([patient], 256) == {"area": 1.0, "nearest": 1.0}
    shrunk = input_size_ceiling([patient], 128)
    assert 0.98 < shrunk["area"] < 1.0
    assert shrunk["nearest"] < shrunk["area"] - 0.02
    assert input_size_ceiling([patient], 32)["area"] < shrunk["area"]
