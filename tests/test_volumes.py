"""NIfTI and DICOM input: discovery, geometry, orientation, FLAIR-only, bad volumes."""

import numpy as np
import pandas as pd
import pytest

sitk = pytest.importorskip("SimpleITK")

from bt_pipeline.data.layout import scan_inputs  # noqa: E402
from bt_pipeline.data.synthetic import make_synthetic_dataset  # noqa: E402
from bt_pipeline.studies.roundtrip import (  # noqa: E402
    geometry,
    geometry_difference,
    oblique_direction,
    patient_slices,
    round_trip,
    slices_to_sitk,
    write_dicom_case,
    write_dicom_series,
    write_nifti_case,
)


@pytest.fixture(scope="module")
def patient_256(tmp_path_factory):
    """One synthetic patient at the dataset's 256x256, 6 slices."""
    root = make_synthetic_dataset(tmp_path_factory.mktemp("p256"), n_patients=1, n_slices=6,
                                  size=256, seed=3)
    return next(p for p in root.iterdir() if p.is_dir())


def _flair_over(level):
    """A stand-in for both stages: tumour wherever the FLAIR channel exceeds ``level``, so
    that what is tested is geometry and intensity handling, not a tiny model's guesses."""
    def predict(self, images):
        return (np.ones(len(images)),
                [(image[..., 1] > level).astype(np.uint8) for image in images])
    return predict


def test_nifti_and_dicom_cases_give_the_slice_runs_masks_on_the_input_grid(
        tiny_models, patient_256, tmp_path, monkeypatch):
    """Round trip: the same slices as oblique, flipped int16 NIfTI and as DICOM give the slice
    run's masks, and each mask carries its input's geometry (NIfTI: to the last bit)."""
    from bt_pipeline.inference.predictor import TwoStagePredictor

    monkeypatch.setattr(TwoStagePredictor, "predict", _flair_over(150))
    table = round_trip([patient_256], TwoStagePredictor.load(*tiny_models), tmp_path)
    row = table.iloc[0]
    assert row["tumour_voxels_slices"] > 0  # the comparison is not between two empty masks
    assert row["dice_nifti"] >= 0.97 and row["dice_dicom"] >= 0.97
    assert bool(row["geometry_nifti_exact"])
    assert row["geometry_dicom_max_difference"] < 1e-4  # NIfTI's float32 header


def _blob_volume(direction, size=(40, 48, 12)):
    """An LPS volume (SimpleITK axis order i, j, k) whose only bright voxels sit in the
    patient's left-anterior-superior corner, stored with ``direction``; returns the image and
    the world centre."""
    image = sitk.Image(size, sitk.sitkInt16)
    image.SetSpacing((1.2, 1.0, 4.0))
    image.SetDirection(tuple(np.asarray(direction, float).ravel()))
    image.SetOrigin((10.0, -20.0, 30.0))
    values = np.full(size[::-1], 100, np.int16)  # (k, j, i)
    world = np.array([[image.TransformIndexToPhysicalPoint((i, j, k)) for i in (0, size[0] - 1)
                       for j in (0, size[1] - 1) for k in (0, size[2] - 1)]])[0]
    centre = world.mean(axis=0)
    for k in range(size[2]):
        for j in range(size[1]):
            for i in range(size[0]):
                x, y, z = image.TransformIndexToPhysicalPoint((i, j, k))
                if x > centre[0] + 4 and y < centre[1] - 4 and z > centre[2] + 8:
                    values[k, j, i] = 900
    stored = sitk.GetImageFromArray(values)
    stored.CopyInformation(image)
    return stored, centre


@pytest.mark.parametrize("storage", ["RAS", "LPI", "sagittal"])
@pytest.mark.parametrize("form", ["nifti", "dicom"])
def test_mask_lands_in_the_anatomical_corner_of_the_input(run_infer, tmp_path, monkeypatch,
                                                          storage, form):
    """A bright blob in the patient's left-anterior-superior corner, stored in three different
    voxel orders: the model sees it top-right (anterior, patient's left) in the upper slices,
    and the written mask's voxels lie in that corner in world coordinates."""
    from bt_pipeline.inference.predictor import TwoStagePredictor

    directions = {"RAS": np.diag([-1.0, -1.0, 1.0]), "LPI": np.diag([1.0, 1.0, -1.0]),
                  "sagittal": np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], float)}
    volume, centre = _blob_volume(directions[storage])
    if form == "nifti":
        scan = tmp_path / "case_flair.nii.gz"
        sitk.WriteImage(volume, str(scan))
    else:
        scan = tmp_path / "case"
        write_dicom_series(volume, scan, "AX FLAIR", 1)
    seen = []
    predict = _flair_over(200)

    def bright_is_tumour(self, images):
        seen.extend(images)
        return predict(self, images)

    monkeypatch.setattr(TwoStagePredictor, "predict", bright_is_tumour)
    out = tmp_path / "out"
    assert run_infer(scan, "--out", out) == 0
    model_view = np.stack(seen)[..., 1] > 200  # (slice, row, column)
    k, row, column = np.argwhere(model_view).T
    assert k.min() > len(seen) / 2  # superior: the upper slices
    assert row.max() < 128 and column.min() > 128  # anterior at the top, patient left on the right
    (case,) = [p for p in out.iterdir() if p.is_dir()]
    mask = sitk.ReadImage(str(case / "mask.nii.gz"))
    if form == "dicom":  # DICOM stores slices right-handed: LPI comes back as LPS, reordered
        volume = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(scan)))
    assert mask.GetSize() == volume.GetSize() and mask.GetDirection() == pytest.approx(
        volume.GetDirection(), abs=1e-6)
    voxels = np.argwhere(sitk.GetArrayFromImage(mask) > 0)[:, ::-1]  # (i, j, k)
    assert len(voxels) == int((sitk.GetArrayFromImage(volume) > 500).sum())
    world = np.array([mask.TransformIndexToPhysicalPoint(tuple(int(v) for v in voxel))
                      for voxel in voxels])
    assert (world[:, 0] > centre[0]).all()  # LPS +x: the patient's left
    assert (world[:, 1] < centre[1]).all()  # -y: anterior
    assert (world[:, 2] > centre[2]).all()  # +z: superior


def test_tumour_volume_of_a_nifti_case_uses_its_header_spacing(run_infer, patient_256,
                                                                tmp_path):
    images = patient_slices(patient_256)
    write_nifti_case(images, tmp_path / "cases" / "c1", "c1", spacing=(0.7, 0.6, 2.5))
    out = tmp_path / "out"
    assert run_infer(tmp_path / "cases", "--out", out) == 0
    patients = pd.read_csv(out / "patients.csv")
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "c1" / "mask.nii.gz")))
    assert patients.loc[0, "tumor_pixels"] == int(mask.sum())
    assert patients.loc[0, "tumor_volume_ml"] == pytest.approx(
        mask.sum() * 0.7 * 0.6 * 2.5 / 1000, abs=0.0051)  # rounded to 0.01 mL
    assert patients.loc[0, "sequences"] == "pre+flair+post"


def test_flair_alone_in_every_form_is_processed_and_said(run_infer, patient_256, tmp_path,
                                                         capsys):
    """A single NIfTI file, a single DICOM series and single-channel slices are FLAIR-only
    cases: processed, marked ``sequences`` = flair, with a note saying how far to trust it."""
    import cv2

    images = patient_slices(patient_256)
    flair = slices_to_sitk(images[..., 1])
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    sitk.WriteImage(flair, str(inputs / "scan.nii.gz"))
    write_dicom_series(flair, inputs / "dicom_case", "FLAIR", 1)
    gray = inputs / "gray" / "TCGA_CS_0001_20000101"
    gray.mkdir(parents=True)
    for n, image in enumerate(images, start=1):
        cv2.imwrite(str(gray / f"TCGA_CS_0001_20000101_{n}.tif"), image[..., 1])
    out = tmp_path / "out"
    assert run_infer(inputs / "scan.nii.gz", inputs / "dicom_case", gray,
                "--out", out) == 0
    patients = pd.read_csv(out / "patients.csv")
    assert sorted(patients["patient_id"]) == ["TCGA_CS_0001_20000101", "dicom_case", "scan"]
    assert set(patients["sequences"]) == {"flair"}
    notes = [line for line in capsys.readouterr().err.splitlines()
             if line.startswith("note: ") and "sequences" in line]
    assert len(notes) == 3 and all("did not train with missing sequences" in n for n in notes)


def test_bad_volumes_get_one_line_naming_the_file_and_good_cases_still_run(
        run_infer, patient_256, tmp_path, capsys):
    images = patient_slices(patient_256)
    root = tmp_path / "cases"
    write_nifti_case(images, root / "good", "good")
    four_d = root / "fourd"
    four_d.mkdir()
    sitk.WriteImage(sitk.JoinSeries([slices_to_sitk(images[..., 1])] * 2),
                    str(four_d / "fourd_flair.nii.gz"))
    fake = root / "fake"
    fake.mkdir()
    (fake / "fake_flair.nii.gz").write_bytes(b"not an image at all" * 40)
    flat = root / "flat"
    flat.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(images[0, ..., 1]), str(flat / "flat_flair.nii"))
    apart = root / "apart"
    files = write_nifti_case(images, apart, "apart")
    moved = sitk.ReadImage(str(files["post"]))
    moved.SetOrigin((500.0, 500.0, 500.0))
    sitk.WriteImage(moved, str(files["post"]))
    mixed = tmp_path / "mixed_series"
    write_dicom_case(images[:3], tmp_path / "dicom_tmp")
    mixed.mkdir()
    for role in ("flair", "post"):
        for path in (tmp_path / "dicom_tmp" / role).iterdir():
            path.rename(mixed / f"{role}_{path.name}")
    before = sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*"))
    out = tmp_path / "out"
    assert run_infer(root, mixed, "--out", out) == 1
    assert sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*")) == before
    assert list(pd.read_csv(out / "patients.csv")["patient_id"]) == ["good"]
    stderr = capsys.readouterr().err.splitlines()
    for bad, words in ((four_d / "fourd_flair.nii.gz", "4D"),
                       (fake / "fake_flair.nii.gz", "not a readable"),
                       (flat / "flat_flair.nii", "2D"),
                       (files["post"], "overlap"),
                       (mixed, "mixes 2 DICOM series")):
        lines = [line for line in stderr if line.startswith(f"skipped: {bad}:")]
        assert len(lines) == 1 and words in lines[0], (bad, stderr)
    errors = pd.read_csv(out / "errors.csv")
    assert len(errors) == 5


def test_case_names_nnunet_brats_and_dicom_series_roles(tmp_path):
    from bt_pipeline.data.volumes import series_role

    for name in ("a_0000.nii.gz", "a_0001.nii.gz", "a_0002.nii.gz", "b_t1.nii", "b_flair.nii",
                 "b_t1ce.nii", "b_t2.nii", "notes.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "dataset.json").write_text(
        '{"channel_names": {"0": "T1", "1": "FLAIR", "2": "T1ce"}}', encoding="utf-8")
    found, problems = scan_inputs([tmp_path])
    cases = {case.patient_id: case.nifti for case in found}
    assert {k: sorted(v) for k, v in cases.items()} == {"a": ["flair", "post", "pre"],
                                                       "b": ["flair", "post", "pre"]}
    assert cases["b"]["post"].name == "b_t1ce.nii"
    assert {p.path.rsplit("/", 1)[-1] for p in problems} == {"b_t2.nii", "notes.nii.gz"}
    assert not any(p.skipped for p in problems)  # not inputs: the exit status is unaffected
    alone, problems = scan_inputs([tmp_path / "b_t1.nii"])
    assert not alone and "another sequence" in problems[0].problem and problems[0].skipped
    assert series_role("AX T2 FLAIR") == "flair"
    assert series_role("T1 AX POST GD") == "post"
    assert series_role("SAG T1 SE") == "pre"
    assert series_role("DWI") is None


def test_oblique_direction_is_a_rotation():
    direction = oblique_direction()
    np.testing.assert_allclose(direction @ direction.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(direction) == pytest.approx(1.0)


def test_a_flair_acquired_in_another_plane_gets_a_note(tiny_models, run_infer, tmp_path, capsys):
    """Thick sagittal slices become axial pixels 4 mm wide left-right: the run says so (and
    still segments); axial storage of the same voxels says nothing."""
    from bt_pipeline.inference.predictor import TwoStagePredictor
    from bt_pipeline.inference.segment import segment

    sagittal, _ = _blob_volume(np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], float))
    axial, _ = _blob_volume(np.diag([-1.0, -1.0, 1.0]))
    sitk.WriteImage(sagittal, str(tmp_path / "sag_flair.nii.gz"))
    sitk.WriteImage(axial, str(tmp_path / "ax_flair.nii.gz"))
    out = tmp_path / "out"
    assert run_infer(tmp_path / "sag_flair.nii.gz", tmp_path / "ax_flair.nii.gz",
                "--out", out) == 0
    notes = [line for line in capsys.readouterr().err.splitlines()
             if line.startswith("note: ") and "axial pixels" in line]
    assert notes == ["note: sag: the FLAIR's axial pixels are 4.0 x 1.2 mm (left-right x "
                     "front-back), over 2 mm left-right: acquired in another plane or at low "
                     "resolution, so outlines along that axis are no finer than its pixels"]
    assert len(pd.read_csv(out / "patients.csv")) == 2
    predictor = TwoStagePredictor.load(*tiny_models)
    assert segment(sagittal, predictor=predictor).notes == (notes[0].removeprefix("note: sag: "),)
    assert segment(axial, predictor=predictor).notes == ()


def test_save_probabilities_on_a_volume_lands_on_the_masks_grid(run_infer, patient_256,
                                                               tmp_path, monkeypatch):
    """An oblique NIfTI case: probability.nii.gz has the mask's header to the last bit, and the
    resampled probabilities cut at 0.5 give the written mask (the stand-in's maps are its
    masks)."""
    import nibabel as nib

    from bt_pipeline.inference.predictor import TwoStagePredictor

    rule = _flair_over(150)

    def with_maps(self, images, with_maps=False):
        probabilities, masks = rule(self, images)
        return (probabilities, masks, [m.astype(np.float32) for m in masks]) if with_maps \
            else (probabilities, masks)

    monkeypatch.setattr(TwoStagePredictor, "predict", with_maps)
    write_nifti_case(patient_slices(patient_256), tmp_path / "cases" / "c1", "c1")
    out = tmp_path / "out"
    assert run_infer(tmp_path / "cases", "--out", out, "--save-probabilities") == 0
    mask = nib.load(out / "c1" / "mask.nii.gz")
    probability = nib.load(out / "c1" / "probability.nii.gz")
    assert probability.get_data_dtype() == np.float32
    assert np.array_equal(probability.affine, mask.affine)
    assert probability.header.get_zooms() == mask.header.get_zooms()
    final = mask.get_fdata() > 0
    assert final.any()
    np.testing.assert_array_equal(probability.get_fdata() >= 0.5, final)


def test_a_negative_pixdim_header_is_kept_so_input_and_mask_agree(run_infer, tmp_path):
    """nibabel turns a negative pixdim positive when it loads a header, and ITK then reads
    another direction: the outputs keep the input's header field for field."""
    import nibabel as nib

    values = np.random.default_rng(0).integers(0, 200, (64, 64, 6)).astype(np.int16)
    flair = nib.Nifti1Image(values, np.diag([0.9, 0.9, 3.0, 1.0]))
    flair.header["pixdim"][1] = -0.9
    case = tmp_path / "scans" / "flipped_flair.nii.gz"
    case.parent.mkdir()
    nib.save(flair, case)
    out = tmp_path / "out"
    assert run_infer(case, "--out", out) == 0
    written = out / "flipped"
    for name in ("mask.nii.gz", "image.nii.gz"):
        assert geometry(sitk.ReadImage(str(written / name))) == geometry(
            sitk.ReadImage(str(case)))
        assert _stored_pixdim(written / name)[1] == pytest.approx(-0.9)


def _stored_pixdim(path):
    import gzip

    import nibabel as nib

    with gzip.open(path) as handle:
        return nib.Nifti1Header.from_fileobj(handle, check=False)["pixdim"]


# --- numbered channels mean what their data set says -----------------------------------------

MSD = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}  # the Decathlon's BrainTumour order


def _numbered_case(folder, codes=("0000", "0001", "0002", "0003")):
    folder.mkdir(parents=True)
    for code in codes:
        (folder / f"BRATS_001_{code}.nii.gz").write_bytes(b"")
    return folder


@pytest.mark.parametrize("key", ["modality", "channel_names"])
def test_channels_follow_the_dataset_json_above_the_images(tmp_path, key):
    import json

    images = _numbered_case(tmp_path / "Task01_BrainTumour" / "imagesTr")
    (tmp_path / "Task01_BrainTumour" / "dataset.json").write_text(json.dumps({key: MSD}))
    (case,), problems = scan_inputs([images])
    assert {role: path.name for role, path in case.nifti.items()} == {
        "flair": "BRATS_001_0000.nii.gz", "pre": "BRATS_001_0001.nii.gz",
        "post": "BRATS_001_0002.nii.gz"}
    assert [p.path.rsplit("/", 1)[-1] for p in problems] == ["BRATS_001_0003.nii.gz"]


def test_numbered_channels_without_names_are_refused_saying_how_to_name_them(tmp_path):
    from bt_pipeline.data.layout import channels_named

    images = _numbered_case(tmp_path / "imagesTr")
    found, problems = scan_inputs([images])
    assert found == []
    assert problems[0].skipped and "channels 0000, 0001, 0002, 0003 have no names" in \
        problems[0].problem and "--channels" in problems[0].problem
    (case,), _ = scan_inputs([images], channels_named("0000=flair,0001=t1,0002=t1ce,0003=t2"))
    assert case.nifti["flair"].name == "BRATS_001_0000.nii.gz"
    (alone,), _ = scan_inputs([_numbered_case(tmp_path / "one", ("0000",))])
    assert list(alone.nifti) == ["flair"]  # one volume alone is FLAIR, as a single file is


def test_an_msd_ordered_case_is_segmented_from_its_flair(run_infer, tmp_path, capsys):
    """The Decathlon's 0000 is FLAIR: read by the README's old fixed order it was the T1 and
    the answer a confident wrong one; with dataset.json the mask is the FLAIR run's."""
    import json

    rng = np.random.default_rng(0)
    flair = rng.integers(0, 200, (6, 64, 64)).astype(np.int16)
    root = tmp_path / "Task01"
    (root / "imagesTr").mkdir(parents=True)
    for code, volume in (("0000", flair), ("0001", flair // 3), ("0002", flair // 2),
                         ("0003", flair[::-1])):
        image = sitk.GetImageFromArray(volume)
        sitk.WriteImage(image, str(root / "imagesTr" / f"BRATS_001_{code}.nii.gz"))
    assert run_infer(root / "imagesTr", "--out", tmp_path / "refused") == 2
    (root / "dataset.json").write_text(json.dumps({"modality": MSD}))
    assert run_infer(root / "imagesTr", "--out", tmp_path / "out") == 0
    patients = pd.read_csv(tmp_path / "out" / "patients.csv")
    assert patients["sequences"].tolist() == ["pre+flair+post"]
    # the case's FLAIR, whose grid the mask is on, is channel 0000
    assert (tmp_path / "out" / "BRATS_001" / "image.nii.gz").read_bytes() == \
        (root / "imagesTr" / "BRATS_001_0000.nii.gz").read_bytes()


# --- labelled volumes get their Dice --------------------------------------------------------

def _labelled(folder, case="BraTS_7", seg_name=None):
    rng = np.random.default_rng(1)
    flair = rng.integers(0, 200, (6, 64, 64)).astype(np.int16)
    seg = np.zeros((6, 64, 64), np.uint8)
    seg[2:5, 20:40, 20:40] = 2
    seg[3, 25:30, 25:30] = 4
    folder.mkdir(parents=True, exist_ok=True)
    for name, volume in ((f"{case}_flair.nii.gz", flair),
                         (seg_name or f"{case}_seg.nii.gz", seg)):
        image = sitk.GetImageFromArray(volume)
        image.SetSpacing((0.9, 0.9, 3.0))
        sitk.WriteImage(image, str(folder / name))
    return folder / (seg_name or f"{case}_seg.nii.gz")


def _dice_of(out, case, seg, values=None):
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / case / "mask.nii.gz"))) > 0
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(seg)))
    truth = labels > 0 if values is None else np.isin(labels, values)
    return 2 * (mask & truth).sum() / max(int(mask.sum() + truth.sum()), 1)


def test_a_brats_case_with_its_seg_gets_its_dice(run_infer, tmp_path):
    seg = _labelled(tmp_path / "scans" / "BraTS_7")
    out = tmp_path / "out"
    assert run_infer(tmp_path / "scans", "--out", out) == 0
    row = pd.read_csv(out / "patients.csv").iloc[0]
    assert row["dice"] == pytest.approx(_dice_of(out, "BraTS_7", seg), abs=1e-4)
    assert row["dice_note"] == "3D against BraTS_7_seg.nii.gz (label > 0)"
    assert run_infer(tmp_path / "scans", "--out", out, "--label-values", "4") == 0
    row = pd.read_csv(out / "patients.csv").iloc[0]
    assert row["dice"] == pytest.approx(_dice_of(out, "BraTS_7", seg, [4]), abs=1e-4)


def test_labels_beside_images_or_in_a_folder_given(run_infer, tmp_path):
    import json

    root = tmp_path / "Dataset001"
    seg = _labelled(root / "labelsTr", case="case1", seg_name="case1.nii.gz")
    (root / "labelsTr" / "case1_flair.nii.gz").rename(root / "case1_0000.nii.gz")
    (root / "imagesTr").mkdir()
    (root / "case1_0000.nii.gz").rename(root / "imagesTr" / "case1_0000.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "FLAIR"}}))
    out = tmp_path / "out"
    assert run_infer(root / "imagesTr", "--out", out) == 0
    assert pd.read_csv(out / "patients.csv")["dice"].iloc[0] == pytest.approx(
        _dice_of(out, "case1", seg), abs=1e-4)
    elsewhere = tmp_path / "truth"
    elsewhere.mkdir()
    seg.rename(elsewhere / "case1.nii.gz")
    assert run_infer(root / "imagesTr", "--out", out) == 0
    assert pd.read_csv(out / "patients.csv")["dice"].isna().all()
    assert run_infer(root / "imagesTr", "--out", out, "--labels", elsewhere) == 0
    assert pd.read_csv(out / "patients.csv")["dice"].notna().all()


# --- NRRD and MetaImage: one registry entry each, the mask back in the input's format ---------

@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_nrrd_and_metaimage_cases_round_trip_on_their_own_grid(run_infer, patient_256, tmp_path,
                                                               suffix):
    images = patient_slices(patient_256)  # (k, 256, 256, 3) uint8
    geometry_kw = dict(spacing=(0.8, 0.9, 3.5), origin=(-90.0, 110.0, -40.0),
                       direction=oblique_direction())
    cases = {}
    for kind in (".nii.gz", suffix):
        folder = tmp_path / kind.strip(".").replace(".", "_") / "case1"
        folder.mkdir(parents=True)
        for channel, role in enumerate(("t1", "flair", "t1ce")):
            sitk.WriteImage(slices_to_sitk(images[..., channel], **geometry_kw),
                            str(folder / f"case1_{role}{kind}"))
        cases[kind] = folder
    outs = {}
    for kind, folder in cases.items():
        outs[kind] = tmp_path / f"out_{kind.strip('.')}"
        assert run_infer(folder, "--out", outs[kind]) == 0
    mask = sitk.ReadImage(str(outs[suffix] / "case1" / f"mask{suffix}"))
    flair = sitk.ReadImage(str(cases[suffix] / f"case1_flair{suffix}"))
    # the input's exact grid, in its own format (NRRD stores spacing x direction: 1e-15 apart)
    assert geometry_difference(mask, flair) < 1e-9
    assert (outs[suffix] / "case1" / f"image{suffix}").is_file()
    reference = sitk.ReadImage(str(outs[".nii.gz"] / "case1" / "mask.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask),
                                  sitk.GetArrayFromImage(reference))
