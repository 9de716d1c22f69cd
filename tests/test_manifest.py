from pathlib import Path

import pandas as pd
import pytest

from bt_pipeline.data.manifest import (
    COLUMNS,
    build_manifest,
    read_manifest,
    scan_slices,
    split_patients,
    write_manifest,
)

REPO = Path(__file__).resolve().parents[1]


def test_synthetic_manifest_rows(synthetic_root):
    table = build_manifest(synthetic_root, 0.25, 0.25, seed=0)
    assert list(table.columns) == COLUMNS
    assert len(table) == 8 * 9
    assert table["patient_id"].nunique() == 8
    assert (table["n_slices"] == 9).all()
    first = table[table["patient_id"] == table["patient_id"].iloc[0]]
    assert list(first["slice"]) == list(range(1, 10))  # numeric, not lexical order
    assert set(table["institution"]) == {"CS", "DU", "FG", "HT"}
    assert (table["has_tumor"] == (table["tumor_pixels"] > 0)).all()
    assert table["has_tumor"].sum() > 0 and (table["has_tumor"] == 0).sum() > 0


def test_no_patient_in_two_splits(synthetic_root):
    table = build_manifest(synthetic_root, 0.25, 0.25, seed=0)
    assert (table.groupby("patient_id")["split"].nunique() == 1).all()
    assert set(table["split"]) == {"train", "val", "test"}


def test_split_is_deterministic_and_seed_dependent():
    institutions = ["CS", "DU", "HT"]
    patients = {f"TCGA_{institutions[i % 3]}_{i:04d}": institutions[i % 3] for i in range(60)}
    first = split_patients(patients, 0.15, 0.15, seed=7)
    assert first == split_patients(patients, 0.15, 0.15, seed=7)
    assert first != split_patients(patients, 0.15, 0.15, seed=8)
    counts = pd.Series(first).value_counts()
    assert counts["train"] == 42 and counts["val"] == 9 and counts["test"] == 9
    for inst in ("CS", "DU", "HT"):  # stratified: every institution in every split
        splits = {split for patient, split in first.items() if patients[patient] == inst}
        assert splits == {"train", "val", "test"}


def test_bad_fractions_rejected():
    with pytest.raises(ValueError, match="fraction"):
        split_patients({"a": "CS"}, 0.6, 0.5, seed=0)


def test_stray_files_are_ignored(synthetic_root, tmp_path):
    import shutil

    root = tmp_path / "kaggle_3m"
    shutil.copytree(synthetic_root, root)
    (root / "notes.txt").write_text("not a patient")
    patient = next(p for p in root.iterdir() if p.is_dir())
    (patient / "Thumbs.db").write_bytes(b"\0")
    (patient / "readme.md").write_text("x")
    assert len(scan_slices(root)) == 8 * 9


def test_missing_mask_named(synthetic_root, tmp_path):
    import shutil

    root = tmp_path / "kaggle_3m"
    shutil.copytree(synthetic_root, root)
    victim = sorted(root.glob("*/*_3_mask.tif"))[0]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        scan_slices(root)


def test_empty_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no <patient>"):
        scan_slices(tmp_path)


def test_manifest_round_trip(synthetic_root, tmp_path):
    table = build_manifest(synthetic_root, 0.25, 0.25, seed=0)
    write_manifest(table, tmp_path / "m.csv")
    again = read_manifest(tmp_path / "m.csv")
    pd.testing.assert_frame_equal(again[COLUMNS], table.reset_index(drop=True), check_dtype=False)


def test_leaky_manifest_rejected(synthetic_root, tmp_path):
    table = build_manifest(synthetic_root, 0.25, 0.25, seed=0)
    table.loc[0, "split"] = "test" if table.loc[0, "split"] != "test" else "train"
    write_manifest(table, tmp_path / "m.csv")
    with pytest.raises(ValueError, match="several splits"):
        read_manifest(tmp_path / "m.csv")


def test_real_data_counts_and_committed_manifest(real_root, tmp_path):
    from bt_pipeline.config import DataConfig

    config = DataConfig()
    table = build_manifest(real_root, config.val_fraction, config.test_fraction, config.seed)
    assert table["patient_id"].nunique() == 100
    assert len(table) == 3618
    assert int(table["has_tumor"].sum()) == 1251
    assert (table.groupby("patient_id")["split"].nunique() == 1).all()
    per_split = table.groupby("split")["patient_id"].nunique()
    assert 65 <= per_split["train"] <= 75 and 12 <= per_split["val"] <= 18
    assert 12 <= per_split["test"] <= 18
    write_manifest(table, tmp_path / "m.csv")
    assert (tmp_path / "m.csv").read_bytes() == (REPO / "data_manifest.csv").read_bytes()


def test_folds_are_patient_level_stratified_balanced_and_stable():
    from collections import Counter

    from bt_pipeline.data.manifest import assign_folds

    institutions = ["CS", "DU", "HT", "FG"]
    patients = {f"TCGA_{institutions[i % 4]}_{i:04d}": institutions[i % 4] for i in range(43)}
    folds = assign_folds(patients, 5, seed=3)
    assert set(folds) == set(patients) and set(folds.values()) == set(range(5))
    sizes = Counter(folds.values())
    assert max(sizes.values()) - min(sizes.values()) <= 1
    for institution in institutions:
        per_fold = Counter(f for p, f in folds.items() if patients[p] == institution)
        counts = [per_fold.get(k, 0) for k in range(5)]
        assert max(counts) - min(counts) <= 1, institution
    shuffled = dict(sorted(patients.items(), reverse=True))
    assert assign_folds(shuffled, 5, seed=3) == folds  # the input order does not matter
    assert assign_folds(patients, 5, seed=4) != folds
    with pytest.raises(ValueError, match="at least 2 folds"):
        assign_folds(patients, 1, seed=3)


def test_manifest_gives_test_patients_no_fold(synthetic_root, tmp_path):
    from bt_pipeline.data.manifest import NO_FOLD

    table = build_manifest(synthetic_root, 0.25, 0.25, seed=0)
    per_patient = table.drop_duplicates("patient_id")
    assert ((per_patient["split"] == "test") == (per_patient["fold"] == NO_FOLD)).all()
    assert (table.groupby("patient_id")["fold"].nunique() == 1).all()
    broken = table.copy()
    broken.loc[broken["split"] == "test", "fold"] = 0
    write_manifest(broken, tmp_path / "broken.csv")
    with pytest.raises(ValueError, match="fold must be -1 exactly for test patients"):
        read_manifest(tmp_path / "broken.csv")
