"""Shape features on synthetic shapes with known answers, the Fisher tests, and `bt
radiogenomics` end to end on synthetic patients with tiny models."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bt_pipeline.radiogenomics.association import (
    fisher_exact_k_by_2,
    fisher_test,
    read_subtypes,
    short_id,
)
from bt_pipeline.radiogenomics.shape import (
    angular_standard_deviation,
    bounding_ellipsoid_volume_ratio,
    margin_fluctuation,
    minimum_volume_ellipsoid,
    shape_features,
)

CUBE_BEVR = 2 / (math.pi * math.sqrt(3))  # a cube in its circumscribed sphere


def _disc(radius: float, size: int = 201) -> np.ndarray:
    y, x = np.mgrid[:size, :size] - size // 2
    return y ** 2 + x ** 2 <= radius ** 2


def _ellipse(a: float, b: float, size: int = 201) -> np.ndarray:
    y, x = np.mgrid[:size, :size] - size // 2
    return (y / a) ** 2 + (x / b) ** 2 <= 1


def _star(size: int = 201) -> np.ndarray:
    y, x = np.mgrid[:size, :size] - size // 2
    return np.hypot(y, x) <= 60 + 20 * np.cos(24 * np.arctan2(y, x))


def _ball(radius: int) -> np.ndarray:
    z, y, x = np.mgrid[:2 * radius + 3, :2 * radius + 3, :2 * radius + 3] - radius - 1
    return z ** 2 + y ** 2 + x ** 2 <= radius ** 2


def test_a_circle_has_no_angular_spread_and_no_margin_fluctuation():
    assert angular_standard_deviation(_disc(80)) < 0.01
    assert margin_fluctuation(_disc(80)) < 0.01


def test_an_ellipse_spreads_by_angle_but_its_margin_is_smooth():
    ellipse = _ellipse(90, 40)
    assert angular_standard_deviation(ellipse) > 10 * angular_standard_deviation(_disc(80))
    assert margin_fluctuation(ellipse) < 0.03
    # ratios of lengths: the same ellipse at half the size measures about the same
    assert angular_standard_deviation(_ellipse(45, 20)) == pytest.approx(
        angular_standard_deviation(ellipse), rel=0.1)


def test_a_spiky_margin_fluctuates():
    assert margin_fluctuation(_star()) > 5 * margin_fluctuation(_ellipse(90, 40))
    assert margin_fluctuation(_star()) > 0.1


def test_a_cube_fills_its_bounding_ellipsoid_by_two_over_pi_root_three():
    cube = np.zeros((24, 24, 24), bool)
    cube[2:22, 2:22, 2:22] = True
    assert bounding_ellipsoid_volume_ratio(cube) == pytest.approx(CUBE_BEVR, rel=1e-4)
    # voxel spacing cancels: the cube stretched threefold along the slices is a box, same ratio
    assert bounding_ellipsoid_volume_ratio(np.repeat(cube, 3, axis=0)) == pytest.approx(
        CUBE_BEVR, rel=1e-4)
    one_voxel = np.ones((1, 1, 1), bool)
    assert bounding_ellipsoid_volume_ratio(one_voxel) == pytest.approx(CUBE_BEVR, rel=1e-4)


def test_a_ball_nearly_fills_its_bounding_ellipsoid_and_more_so_when_finer():
    coarse, fine = (bounding_ellipsoid_volume_ratio(_ball(r)) for r in (8, 20))
    # the voxel cubes' corners stick out of the true sphere by up to half a voxel diagonal
    assert 0.7 < coarse < fine < 1.0
    assert fine > 0.85


def test_a_ball_with_spikes_fills_little_of_its_bounding_ellipsoid():
    spiky = _ball(8)
    spiky = np.pad(spiky, 20)
    middle = spiky.shape[0] // 2
    spiky[middle, middle, :] = spiky[middle, :, middle] = spiky[:, middle, middle] = True
    assert bounding_ellipsoid_volume_ratio(spiky) < 0.05


def test_the_minimum_ellipsoid_of_points_on_an_ellipsoid_is_that_ellipsoid():
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(400, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    axes, centre = np.array([3.0, 2.0, 1.0]), np.array([5.0, -1.0, 2.0])
    shape, found = minimum_volume_ellipsoid(directions * axes + centre, tolerance=1e-7)
    assert found == pytest.approx(centre, abs=1e-2)
    assert np.sort(1 / np.sqrt(np.linalg.eigvalsh(shape))) == pytest.approx([1, 2, 3], rel=1e-2)


def test_shape_features_of_an_empty_and_of_a_thin_mask():
    empty = shape_features(np.zeros((4, 8, 8)))
    assert empty["volume_voxels"] == 0 and empty["slice_extent"] == 0
    assert math.isnan(empty["bounding_ellipsoid_volume_ratio"])
    volume = np.zeros((6, 64, 64), bool)
    volume[2] = _disc(20, 64)
    volume[4, 30:34, 30:34] = True  # a gap slice in between still counts in the extent
    features = shape_features(volume)
    assert features["slice_extent"] == 3
    assert features["volume_voxels"] == volume.sum()
    assert features["angular_sd"] < 0.05  # measured on slice 2, the largest


def test_fisher_test_matches_scipy_on_the_median_split():
    feature = pd.Series([1, 2, 3, 4, 5, 6, 7, 8], index=list("abcdefgh"), dtype=float)
    subtype = pd.Series([1, 1, 1, 1, 2, 2, 2, np.nan], index=list("abcdefgh"))
    result = fisher_test(feature, subtype)
    # patients a-g; median 4: a-d not above (all cluster 1), e-g above (all cluster 2)
    assert result["n"] == 7 and result["clusters"] == 2
    assert result["p"] == pytest.approx(stats.fisher_exact([[4, 0], [0, 3]]).pvalue)
    one_cluster = fisher_test(feature, pd.Series(1, index=feature.index))
    assert math.isnan(one_cluster["p"])


@pytest.mark.parametrize("table", [[[6, 2], [1, 4]], [[4, 0], [0, 3]], [[10, 3], [2, 15]]])
def test_the_exact_test_is_scipys_on_two_by_two_tables(table):
    assert fisher_exact_k_by_2(np.array(table)) == pytest.approx(stats.fisher_exact(table).pvalue)


def test_the_exact_test_agrees_with_scipys_monte_carlo_on_larger_tables():
    table = np.array([[12, 8], [5, 15], [10, 10], [9, 11]])
    sampled = stats.fisher_exact(table, method=stats.MonteCarloMethod(
        n_resamples=50_000, rng=np.random.default_rng(0))).pvalue
    assert fisher_exact_k_by_2(table) == pytest.approx(sampled, abs=0.01)
    assert fisher_exact_k_by_2(np.array([[5, 5], [5, 5], [5, 5]])) == pytest.approx(1.0)


def test_data_csv_problems_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.csv"):
        read_subtypes(tmp_path / "data.csv")
    (tmp_path / "data.csv").write_text("Patient,RNASeqCluster\nTCGA_CS_1,1\n")
    with pytest.raises(ValueError, match="no column MethylationCluster"):
        read_subtypes(tmp_path / "data.csv")
    assert short_id("TCGA_CS_4941_19960909") == "TCGA_CS_4941"


def test_radiogenomics_end_to_end_with_held_out_masks_only(synthetic_root, synthetic_manifest,
                                                          tiny_models, tmp_path):
    from bt_pipeline.cli import main
    from bt_pipeline.data.manifest import NO_FOLD, read_manifest
    from bt_pipeline.training.cross_validation import fold_model

    manifest = read_manifest(synthetic_manifest)
    patients = manifest.drop_duplicates("patient_id").set_index("patient_id")["fold"]
    data = tmp_path / "kaggle_3m"
    shutil.copytree(synthetic_root, data)
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"Patient": [short_id(p) for p in patients.index]})
    for column in ("RNASeqCluster", "MethylationCluster", "miRNACluster", "CNCluster",
                   "RPPACluster", "OncosignCluster", "COCCluster"):
        table[column] = rng.integers(1, 3, len(table))
    table.to_csv(data / "data.csv", index=False)
    classifier, unet = tiny_models
    trained_fold = int(patients[patients != NO_FOLD].iloc[0])
    target = fold_model(tmp_path / "cv", "tiny", trained_fold)
    target.parent.mkdir(parents=True)
    for suffix in (".keras", ".json"):
        shutil.copyfile(unet.with_suffix(suffix), target.with_suffix(suffix))
    out = tmp_path / "report"
    code = main(["radiogenomics", "--data-dir", str(data), "--manifest", str(synthetic_manifest),
                 "--recipe", "tiny", "--cv-dir", str(tmp_path / "cv"), "--unet", str(unet),
                 "--classifier", str(classifier), "--out", str(out)])
    assert code == 0
    features = pd.read_csv(out / "features.csv")
    automatic = features[features["source"] == "automatic"].set_index("patient_id")
    expected = set(patients.index[patients.isin([trained_fold, NO_FOLD])])
    assert set(automatic.index) == expected  # no patient of an untrained fold, none seen
    assert automatic.loc[patients.index[patients == NO_FOLD], "model"].eq(str(unet)).all()
    assert len(features[features["source"] == "manual"]) == len(patients)
    tests = pd.read_csv(out / "associations.csv")
    assert set(tests["masks"]) == {"manual", "manual_paired", "automatic"}
    assert len(tests) == 3 * 7 * 5
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "agreement_manual_vs_automatic" in summary
    assert summary.count("| slice_extent |") >= 7  # untestable rows (p NaN) are still listed
    assert (out / "associations.png").is_file() and (out / "manual_vs_automatic.png").is_file()
