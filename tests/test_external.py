"""``bt external``: labelled BraTS-style cases scored in 3D, with every sequence and FLAIR
alone."""

from __future__ import annotations

import numpy as np
import pandas as pd
import SimpleITK as sitk

from bt_pipeline.cli import main
from bt_pipeline.evaluation.external import labelled_cases


def _case(root, name, seed):
    rng = np.random.default_rng(seed)
    folder = root / name
    folder.mkdir(parents=True)
    flair = rng.integers(0, 100, (8, 48, 48)).astype(np.float32)
    flair[3:6, 15:30, 15:30] += 150
    seg = np.zeros(flair.shape, np.uint8)
    seg[3:6, 15:30, 15:30] = 2  # any label > 0 is whole tumour
    for suffix, array in (("flair", flair), ("t1ce", flair * 0.5), ("seg", seg)):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((1.0, 1.0, 1.0))
        sitk.WriteImage(image, str(folder / f"{name}_{suffix}.nii.gz"))
    return folder


def test_labelled_cases_finds_brats_named_folders(tmp_path):
    _case(tmp_path, "BraTS_001", 0)
    (tmp_path / "unlabelled").mkdir()
    sitk.WriteImage(sitk.Image(8, 8, 8, sitk.sitkUInt8),
                    str(tmp_path / "unlabelled" / "unlabelled_flair.nii.gz"))
    cases = labelled_cases(tmp_path)
    assert list(cases) == ["BraTS_001"]
    assert set(cases["BraTS_001"]) == {"flair", "post", "seg"}


def test_external_scores_every_case_with_all_sequences_and_flair_alone(tiny_models, tmp_path):
    for k in range(2):
        _case(tmp_path / "cases", f"BraTS_00{k}", k)
    classifier, unet = tiny_models
    assert main(["external", str(tmp_path / "cases"), "--out", str(tmp_path / "reports"),
                 "--classifier", str(classifier), "--unet", str(unet),
                 "--precision", "float32"]) == 0
    report = tmp_path / "reports" / "cases" / "shipped"
    table = pd.read_csv(report / "cases.csv")
    assert len(table) == 4
    assert set(table["input"]) == {"all sequences", "FLAIR alone"}
    assert table["dice"].between(0, 1).all()
    assert (table.loc[table["input"] == "FLAIR alone", "sequences"] == "flair").all()
    assert np.allclose(table["truth_ml"], 3 * 15 * 15 / 1000, atol=0.01)  # 1 mm voxels
    assert (report / "summary.md").is_file()
