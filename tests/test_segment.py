"""``segment``: one case in memory gives what ``infer`` writes for it."""

import numpy as np
import pandas as pd
import pytest

sitk = pytest.importorskip("SimpleITK")

from bt_pipeline.data.synthetic import make_synthetic_dataset  # noqa: E402
from bt_pipeline.data.volumes import VolumeReadError  # noqa: E402
from bt_pipeline.infer import main  # noqa: E402
from bt_pipeline.studies.roundtrip import (  # noqa: E402
    patient_slices,
    slices_to_sitk,
    write_dicom_series,
    write_nifti_case,
)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """One synthetic patient's slices as an oblique nnU-Net-named NIfTI case."""
    work = tmp_path_factory.mktemp("segment")
    root = make_synthetic_dataset(work / "slices", n_patients=1, n_slices=6, size=256, seed=5)
    images = patient_slices(next(p for p in root.iterdir() if p.is_dir()))
    return images, write_nifti_case(images, work / "cases" / "c1", "c1", spacing=(0.9, 0.8, 3.0))


@pytest.fixture(scope="module")
def predictor(tiny_models):
    from bt_pipeline.inference.predictor import TwoStagePredictor

    return TwoStagePredictor.load(*tiny_models)


def _flair_over(level):
    """Both stages replaced by a rule (tumour where FLAIR exceeds ``level``; the maps are the
    masks) so that the masks are not empty whatever a tiny model guesses."""
    def predict(self, images, with_maps=False):
        masks = [(image[..., 1] > level).astype(np.uint8) for image in images]
        found = (np.linspace(0, 1, len(images)), masks)
        return (*found, [m.astype(np.float32) for m in masks]) if with_maps else found
    return predict


def _infer(tiny_models, folder, out, *options):
    classifier, unet = tiny_models
    assert main([str(folder), "--out", str(out), "--classifier", str(classifier),
                 "--unet", str(unet), "--quiet", *options]) == 0


def test_segment_gives_infers_mask_and_probabilities(case, predictor, tiny_models, tmp_path,
                                                     monkeypatch):
    from bt_pipeline.inference.predictor import TwoStagePredictor
    from bt_pipeline.inference.segment import segment

    _, files = case
    found = segment(files["flair"], files["pre"], files["post"], predictor=predictor)
    _infer(tiny_models, files["flair"].parent, tmp_path / "plain")
    slices = pd.read_csv(tmp_path / "plain" / "slices.csv")
    np.testing.assert_allclose(found.slice_probabilities, slices["classifier_probability"],
                               atol=1e-6)
    assert found.sequences == "pre+flair+post"

    monkeypatch.setattr(TwoStagePredictor, "predict", _flair_over(150))
    found = segment(files["flair"], files["pre"], files["post"], predictor=predictor)
    _infer(tiny_models, files["flair"].parent, tmp_path / "rule", "--save-probabilities")
    written = sitk.ReadImage(str(tmp_path / "rule" / "c1" / "mask.nii.gz"))
    mask = sitk.GetArrayFromImage(found.mask)
    assert mask.sum() > 0  # not two empty masks compared
    np.testing.assert_array_equal(mask, sitk.GetArrayFromImage(written))
    flair = sitk.ReadImage(str(files["flair"]))
    assert found.mask.GetSize() == flair.GetSize()
    np.testing.assert_allclose(found.mask.GetSpacing(), flair.GetSpacing())
    np.testing.assert_allclose(found.mask.GetOrigin(), flair.GetOrigin())
    np.testing.assert_allclose(found.mask.GetDirection(), flair.GetDirection())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(found.probability) >= 0.5, mask)
    written = sitk.ReadImage(str(tmp_path / "rule" / "c1" / "probability.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(found.probability),
                                  sitk.GetArrayFromImage(written))
    patients = pd.read_csv(tmp_path / "rule" / "patients.csv")
    assert found.tumour_voxels == patients.loc[0, "tumor_pixels"]
    # the table rounds to 0.01 mL
    assert found.tumour_volume_ml == pytest.approx(patients.loc[0, "tumor_volume_ml"], abs=0.0051)


def test_images_in_memory_and_their_files_give_one_answer(case, predictor, tmp_path,
                                                          monkeypatch):
    from bt_pipeline.inference.predictor import TwoStagePredictor
    from bt_pipeline.inference.segment import segment

    images, files = case
    monkeypatch.setattr(TwoStagePredictor, "predict", _flair_over(150))
    from_files = segment(files["flair"], predictor=predictor)
    in_memory = segment(sitk.ReadImage(str(files["flair"])), predictor=predictor)
    assert from_files.sequences == in_memory.sequences == "flair"
    np.testing.assert_array_equal(sitk.GetArrayFromImage(from_files.mask),
                                  sitk.GetArrayFromImage(in_memory.mask))
    write_dicom_series(slices_to_sitk(images[..., 1]), tmp_path / "flair_dicom", "FLAIR", 1)
    from_dicom = segment(tmp_path / "flair_dicom", predictor=predictor)
    assert from_dicom.mask.GetSize() == from_files.mask.GetSize()
    assert from_dicom.tumour_voxels > 0


def test_bad_input_is_one_error_naming_it(case, predictor, tmp_path):
    from bt_pipeline.inference.segment import segment

    _, files = case
    flat = sitk.Image(64, 64, sitk.sitkInt16)
    with pytest.raises(VolumeReadError, match=r"<flair image>: 2D image 64x64"):
        segment(flat, predictor=predictor)
    with pytest.raises(VolumeReadError, match=r"missing\.nii\.gz: no such file"):
        segment(files["flair"], post=tmp_path / "missing.nii.gz", predictor=predictor)
    with pytest.raises(VolumeReadError, match=r"<pre>: a ndarray"):
        segment(files["flair"], pre=np.zeros((4, 4, 4)), predictor=predictor)
    far = sitk.ReadImage(str(files["pre"]))
    far.SetOrigin((5000.0, 5000.0, 5000.0))
    with pytest.raises(VolumeReadError, match=r"<pre image>: covers under 50%"):
        segment(files["flair"], pre=far, predictor=predictor)

