"""The held-out against trained-on comparison (bt fit-gap) on hand-made tables."""

import numpy as np
import pandas as pd
import pytest

from bt_pipeline.studies.fit_gap import paired, summary_table, worst_table


def _tables():
    cv = pd.DataFrame({"split": ["fold0", "fold1", "fold2"], "patient_id": ["a", "b", "c"],
                       "institution": ["CS", "DU", "DU"], "dice_unet": [0.9, 0.5, 0.8],
                       "dice_pipeline": [0.8, 0.4, 0.8]})
    shipped = pd.DataFrame({"split": ["train", "val", "train"], "patient_id": ["c", "a", "b"],
                            "dice_unet": [0.9, 1.0, 0.6], "dice_pipeline": [0.9, 1.0, 0.5]})
    return cv, shipped


def test_each_patient_is_paired_with_itself_and_the_gaps_add_up():
    both = paired(*_tables())
    assert list(both["patient_id"]) == ["b", "a", "c"]  # lowest held-out pipeline Dice first
    assert np.allclose(both["dice_pipeline_gap"], [0.1, 0.2, 0.1])
    assert np.allclose(both["dice_unet_gap"], [0.1, 0.1, 0.1])
    table = summary_table(both).set_index("score")
    row = table.loc["dice_pipeline"]
    assert row["held_out_mean"] == pytest.approx(2.0 / 3)
    assert row["trained_on_mean"] == pytest.approx(0.8)
    assert row["gap_mean"] == pytest.approx(0.4 / 3)
    assert row["gap_sem"] == pytest.approx(np.std([0.1, 0.2, 0.1], ddof=1) / np.sqrt(3))
    assert row["share_of_held_out_shortfall"] == pytest.approx((0.4 / 3) / (1 / 3))
    assert table.loc["dice_unet", "gap_sem"] == pytest.approx(0.0, abs=1e-12)


def test_worst_patients_say_whether_the_shipped_models_fit_them():
    worst = worst_table(paired(*_tables()), count=2)
    assert list(worst["patient_id"]) == ["b", "a"]
    assert list(worst["fitted_when_seen"]) == [False, True]


def test_a_patient_scored_on_one_side_only_is_an_error_not_a_silent_drop():
    cv, shipped = _tables()
    with pytest.raises(ValueError, match="one side only"):
        paired(cv, shipped.iloc[1:])
    with pytest.raises(pd.errors.MergeError):
        paired(cv, pd.concat([shipped, shipped.iloc[:1]]))


def test_reports_are_filed_by_the_intensity_rule_they_were_scored_under():
    from pathlib import Path

    from bt_pipeline.evaluation.cv_report import report_dir

    assert report_dir(Path("r"), "four_cycles", "raw") == Path("r/four_cycles")
    assert report_dir(Path("r"), "four_cycles", "volume_p99") == Path(
        "r/four_cycles/intensity_volume_p99")
