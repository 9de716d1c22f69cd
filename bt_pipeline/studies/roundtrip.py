"""Format round trip (``bt roundtrip``, ``make roundtrip``): each patient of a split is written
as NIfTI and as DICOM with a geometry unlike the dataset's, run through ``bt infer`` in every
form, and its masks compared in world coordinates with the slice-folder run's.

The volumes are made from the dataset's own slices: stored right-to-left and
anterior-to-posterior (the NIfTI habit, the reverse of the slices), rotated obliquely, with
0.9 x 0.9 x 3.3 mm voxels, an origin off the centre, and int16 intensities on another scale
(``value * 9.7 - 1000``). A pipeline that reads geometry and intensity correctly gives the same
masks; the written mask must carry the input's size, spacing, origin and direction.
"""

from __future__ import annotations

import argparse
import json
import locale
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from bt_pipeline.atomic import write_text_atomic
from bt_pipeline.config import DataConfig
from bt_pipeline.data.layout import ROLES
from bt_pipeline.data.manifest import read_manifest
from bt_pipeline.data.preprocess import read_image
from bt_pipeline.data.volumes import read_volume
from bt_pipeline.evaluation.metrics import dice_score
from bt_pipeline.reports import write_summary

SPACING = (0.9, 0.9, 3.3)
ORIGIN = (-96.0, 121.5, -37.0)
INTENSITY = (9.7, -1000.0)  # stored = value * slope + offset
#: File names per role: nnU-Net's channel codes and the DICOM series descriptions.
NNUNET_CODES = {"pre": "0000", "flair": "0001", "post": "0002"}
DESCRIPTIONS = {"pre": "AX T1 PRE", "flair": "AX T2 FLAIR", "post": "AX T1 POST GD"}


def oblique_direction(degrees: tuple[float, float] = (12.0, 7.0)) -> np.ndarray:
    """Direction (LPS, columns = voxel axes) of a volume stored right-to-left,
    anterior-to-posterior, inferior-to-superior, tilted by rotations about z and x."""
    z, x = np.radians(degrees)
    about_z = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    return about_z @ about_x @ np.diag([-1.0, -1.0, 1.0])


def slices_to_sitk(stack: np.ndarray, direction: np.ndarray = None, spacing=SPACING,
                   origin=ORIGIN, intensity=INTENSITY):
    """One channel of a slice stack (k, row, column; the dataset's orientation: columns to the
    patient's left, rows to posterior, slices to superior) as an int16 SimpleITK volume stored
    right-to-left and anterior-to-posterior with ``direction`` (default
    :func:`oblique_direction`)."""
    import SimpleITK as sitk

    direction = oblique_direction() if direction is None else np.asarray(direction)
    stored = stack[:, ::-1, ::-1].astype(np.float64) * intensity[0] + intensity[1]
    image = sitk.GetImageFromArray(np.rint(stored).astype(np.int16))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    return image


def write_nifti_case(images: np.ndarray, folder: Path, case: str, **geometry) -> dict[str, Path]:
    """(k, row, column, 3) RGB slices as nnU-Net-named NIfTI files; returns role -> file."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    # the channels' names, as nnU-Net's dataset.json gives them
    names = {"pre": "T1", "flair": "FLAIR", "post": "T1ce"}
    write_text_atomic(folder / "dataset.json", json.dumps({"channel_names": {
        str(int(NNUNET_CODES[role])): names[role] for role in ROLES}}) + "\n")
    files = {}
    for channel, role in enumerate(ROLES):
        files[role] = folder / f"{case}_{NNUNET_CODES[role]}.nii.gz"
        sitk.WriteImage(slices_to_sitk(images[..., channel], **geometry), str(files[role]))
    return files


def write_dicom_series(volume, folder: Path, description: str, series_number: int) -> None:
    """A 3D SimpleITK volume as a DICOM MR series, one file per slice, its geometry in the
    position and orientation tags (SimpleITK's DicomSeriesFromArray recipe)."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    # GDCM's writer sets the process locale to "C", which would make every later text file
    # opened without an explicit encoding ASCII; the caller's locale is put back.
    previous = locale.setlocale(locale.LC_ALL)
    try:
        _write_slices(volume, folder, writer, description, series_number)
    finally:
        locale.setlocale(locale.LC_ALL, previous)


def _write_slices(volume, folder: Path, writer, description: str, series_number: int) -> None:
    direction = np.asarray(volume.GetDirection()).reshape(3, 3)
    uid = f"1.2.826.0.1.3680043.2.1125.{series_number}.{zlib.crc32(str(folder).encode())}"
    orientation = "\\".join(f"{v:.10f}" for v in (*direction[:, 0], *direction[:, 1]))
    for k in range(volume.GetDepth()):
        plane = volume[:, :, k]
        position = volume.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "MR", "0008|103e": description, "0020|000d": uid + ".1",
            "0020|000e": uid + ".2", "0020|0011": str(series_number),
            "0008|0018": f"{uid}.3.{k + 1}", "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.10f}" for v in position),
            "0020|0037": orientation,
            "0018|0050": f"{volume.GetSpacing()[2]:.6f}",
            "0028|0030": f"{volume.GetSpacing()[1]:.6f}\\{volume.GetSpacing()[0]:.6f}",
        }
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:04d}.dcm"))
        writer.Execute(plane)


def write_dicom_case(images: np.ndarray, folder: Path, **geometry) -> None:
    """(k, row, column, 3) RGB slices as a DICOM case: one series folder per sequence."""
    for number, (channel, role) in enumerate(enumerate(ROLES), start=1):
        write_dicom_series(slices_to_sitk(images[..., channel], **geometry),
                           folder / role, DESCRIPTIONS[role], number)


def patient_slices(folder: Path) -> np.ndarray:
    """A patient folder's RGB slices in slice order: (k, row, column, 3)."""
    from bt_pipeline.data.layout import scan_inputs

    (scan,), _ = scan_inputs([folder])
    return np.stack([read_image(path) for _, path, _ in scan.slices])


def oriented_mask(path: Path) -> np.ndarray:
    """A written mask as a (k, row, column) array in the slices' orientation, whatever the
    grid it was written on."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS"))


def geometry(image) -> tuple:
    return (image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def geometry_difference(a, b) -> float:
    """Largest difference between two images' spacing, origin and direction values; inf when
    their sizes differ."""
    if a.GetSize() != b.GetSize():
        return float("inf")
    pairs = [(a.GetSpacing(), b.GetSpacing()), (a.GetOrigin(), b.GetOrigin()),
             (a.GetDirection(), b.GetDirection())]
    return float(max(np.max(np.abs(np.subtract(x, y))) for x, y in pairs))


def round_trip(patient_folders: list[Path], predictor, work: Path) -> pd.DataFrame:
    """Per patient: Dice of the NIfTI and DICOM runs' masks against the slice run's, and how
    far each written mask's geometry is from its input's."""
    import SimpleITK as sitk

    from bt_pipeline.inference.pipeline import run_inference

    slices_in, nifti_in, dicom_in = work / "slices", work / "nifti", work / "dicom"
    for folder in patient_folders:
        images = patient_slices(folder)
        (slices_in / folder.name).mkdir(parents=True, exist_ok=True)
        for path in folder.iterdir():
            if not path.stem.endswith("_mask"):
                (slices_in / folder.name / path.name).symlink_to(path.resolve())
        write_nifti_case(images, nifti_in / folder.name, folder.name)
        write_dicom_case(images, dicom_in / folder.name)
    runs = {}
    for name, inputs in (("slices", slices_in), ("nifti", nifti_in), ("dicom", dicom_in)):
        runs[name] = work / f"out_{name}"
        run_inference([inputs], runs[name], predictor, progress=False, report=lambda _: None)
    rows = []
    for folder in patient_folders:
        patient = folder.name
        reference = oriented_mask(runs["slices"] / patient / "mask.nii.gz")
        row = {"patient_id": patient, "slices": len(reference),
               "tumour_voxels_slices": int(reference.sum())}
        inputs = {"nifti": read_volume(nifti_in / patient / f"{patient}_0001.nii.gz"),
                  "dicom": read_volume(dicom_in / patient / "flair")}
        for name in ("nifti", "dicom"):
            written = runs[name] / patient / "mask.nii.gz"
            row[f"dice_{name}"] = dice_score(reference, oriented_mask(written))
            row[f"geometry_{name}_max_difference"] = geometry_difference(
                sitk.ReadImage(str(written)), inputs[name])
            row[f"geometry_{name}_exact"] = geometry(sitk.ReadImage(str(written))) == \
                geometry(inputs[name])
        rows.append(row)
    return pd.DataFrame(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=DataConfig.data_root)
    parser.add_argument("--manifest", default=DataConfig.manifest)
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", type=Path, default=Path("reports/roundtrip"))


def run(args: argparse.Namespace) -> int:
    from bt_pipeline.runtime import quiet_tensorflow

    quiet_tensorflow()
    from bt_pipeline.inference.predictor import TwoStagePredictor

    manifest = read_manifest(args.manifest)
    patients = sorted(manifest.loc[manifest["split"] == args.split, "patient_id"].unique())
    if not patients:
        raise ValueError(f"{args.manifest}: no patient in split {args.split!r}")
    folders = [Path(args.data_dir) / patient for patient in patients]
    with tempfile.TemporaryDirectory(prefix="bt-roundtrip-") as work:
        table = round_trip(folders, TwoStagePredictor.load(), Path(work))
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "patients.csv", table.to_csv(index=False, lineterminator="\n"))
    summary = pd.DataFrame([{
        "patients": len(table),
        "dice_nifti_min": table["dice_nifti"].min(), "dice_nifti_mean": table["dice_nifti"].mean(),
        "dice_dicom_min": table["dice_dicom"].min(), "dice_dicom_mean": table["dice_dicom"].mean(),
        "nifti_geometry_exact": int(table["geometry_nifti_exact"].sum()),
        "dicom_geometry_max_difference": table["geometry_dicom_max_difference"].max(),
    }])
    voxels = " x ".join(map(str, SPACING))
    intro = [f"The {args.split} split's {len(table)} patients, each written as NIfTI (nnU-Net "
             "names) and as a DICOM case (one series per sequence) with an oblique, flipped "
             f"geometry ({voxels} mm voxels) and int16 intensities (value x {INTENSITY[0]} "
             f"{INTENSITY[1]:+}), then run through `bt infer` with the shipped models. Dice: each "
             "run's mask against the slice-folder run's, compared in world orientation. "
             "Geometry: the written mask's size, spacing, origin and direction against the "
             "input FLAIR's as SimpleITK reads them (a DICOM case's mask is NIfTI, whose header "
             "holds float32)."]
    shown = {name: frame.assign(**{column: frame[column].map(lambda v: f"{v:.1e}")
                                   for column in frame if "difference" in column})
             for name, frame in (("summary", summary), ("patients", table))}
    write_summary(args.out / "summary.md", "Format round trip", intro, shown, [])
    print(summary.to_string(index=False))
    return 0
