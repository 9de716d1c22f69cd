"""NIfTI and DICOM cases into the model's domain, and masks back onto the input's grid.

The models were trained on the dataset's slices: axial, radiological (anterior at the top, the
patient's right on the image's left), square, 256x256 for the whole field of view, 8-bit, with
pre-contrast T1, FLAIR and post-contrast T1 as the three channels. A case read here is brought
into that domain in world coordinates, with SimpleITK (the image I/O library nnU-Net uses):

1. FLAIR is the reference. It is reoriented (``DICOMOrient`` "LPS": columns run towards the
   patient's left, rows towards posterior, slices towards superior, which is how the dataset's
   slices are stored) and its axial field of view is resampled to a square 256x256 grid with
   square pixels, centred where the FLAIR's was; the slice spacing is kept.
2. The other sequences are resampled onto that grid through their own geometry (scans of one
   visit: no registration). A sequence that covers under half of the grid is refused.
3. Intensities: each volume is mapped linearly from its minimum (background) to its maximum
   onto 0..255, which is how the dataset's volumes were scaled (every sequence's maximum is
   226-255, below 255 only where resizing smoothed it). A high percentile instead of the
   maximum was tried and rejected: the dataset's brightest 0.001 % of voxels span 218-255 on
   one FLAIR, so any percentile darkens the image against what the models trained on. The rule
   is blind to any linear rescaling of the stored values (int16, float, a slope).
4. A missing pre- or post-contrast sequence is replaced by FLAIR, as the dataset itself does.

:func:`mask_on_input_grid` takes the masks predicted on that grid back to the FLAIR as it was
read (linear interpolation of the binary mask, then 0.5), so the written mask has the input's
exact size, spacing, origin and direction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bt_pipeline.data.formats import NIFTI, volume_format
from bt_pipeline.data.layout import ROLE_NAMES, ROLES, VolumeScan, printable

#: In-plane size of the model grid: the dataset's slices are 256x256.
GRID_SIDE = 256
#: Smallest share of the FLAIR volume another sequence must cover.
MIN_OVERLAP = 0.5
#: Share of the FLAIR volume under which another sequence's coverage gets a note.
FULL_OVERLAP = 0.98
#: Largest accepted volume side in voxels (a larger header is refused before decoding).
MAX_VOXELS_PER_SIDE = 2048
#: Largest accepted volume in voxels, from the header before any decode: 512 x 512 x 1000 (a
#: tiny compressed file may declare gigabytes).
MAX_VOXELS = 512 * 512 * 1000
#: Axial pixel side (mm) above which a case gets a note: a FLAIR acquired as thick sagittal or
#: coronal slices becomes axial slices that are blurred along one axis.
COARSE_AXIAL_MM = 2.0

DICOM_DESCRIPTION_TAG = "0008|103e"
#: Words of a DICOM series description that give its role; "post" is checked first.
_POST_WORDS = ("POST", "GD", "GAD", "+C", "C+", "T1C", "CONTRAST", "MPRAGE+")
_FLAIR_WORDS = ("FLAIR",)
_PRE_WORDS = ("T1",)


class VolumeReadError(ValueError):
    """A volume or series that cannot be used; the message names the file or folder."""

    def __init__(self, path: str | Path, reason: str):
        self.path = printable(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass
class CaseVolume:
    """One case on the model grid, and what is needed to send masks back."""

    images: list[np.ndarray]  # uint8 RGB (256, 256, 3) slices, inferior to superior
    flair: object  # SimpleITK image: the FLAIR as read, whose grid the mask is written on
    grid: object  # SimpleITK image: the model grid (geometry only)
    sources: dict[str, str] = field(default_factory=dict)  # role -> file or folder used
    replaced: list[str] = field(default_factory=list)  # roles filled with FLAIR
    flair_file: Path | None = None  # the FLAIR's file (not a DICOM series): outputs take its format
    notes: list[str] = field(default_factory=list)  # what the user should know (stderr)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """The input FLAIR's voxel size in mm."""
        return tuple(float(s) for s in self.flair.GetSpacing())

    @property
    def sequences(self) -> str:
        return "+".join(role for role in ROLES if role not in self.replaced)


def read_case(scan: VolumeScan, series_roles: dict[str, str] | None = None) -> CaseVolume:
    """Read ``scan`` onto the model grid. ``series_roles`` (role -> text) picks DICOM series by
    a case-insensitive piece of their description, before the built-in words.

    Raises:
        VolumeReadError: naming the file or folder that cannot be used.
    """
    sources = scan.nifti if scan.nifti else _dicom_roles(scan, series_roles or {})
    volumes = {role: read_volume(path) for role, path in sources.items()}
    flair = sources["flair"]
    return case_on_model_grid(volumes, sources, None if flair.is_dir() else flair)


def case_on_model_grid(volumes: dict, sources: dict[str, str | Path],
                       flair_file: Path | None = None) -> CaseVolume:
    """Volumes already read (role -> SimpleITK image; FLAIR required) onto the model grid.
    ``sources`` names each volume in messages; ``flair_file`` is the FLAIR's file, whose format
    (and for NIfTI, header) the written outputs take.

    Raises:
        VolumeReadError: naming the volume that cannot be used.
    """
    try:
        return _on_model_grid(volumes, sources, flair_file)
    except RuntimeError as exc:  # SimpleITK refusing a geometry it cannot resample
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise VolumeReadError(sources["flair"], f"cannot be resampled ({reason})") from exc


def _on_model_grid(volumes: dict, sources: dict[str, str | Path],
                   flair_file: Path | None) -> CaseVolume:
    import SimpleITK as sitk

    flair = volumes["flair"]
    oriented = sitk.DICOMOrient(flair, "LPS")
    grid = model_grid(oriented)
    channels, replaced, notes = {}, [], coarse_axial_notes(oriented.GetSpacing())
    in_flair = _inside_on(flair, grid)
    for role in ROLES:
        if role not in volumes:
            replaced.append(role)
            continue
        if role != "flair":
            covered = float(_inside_on(volumes[role], grid)[in_flair].mean())
            if covered < MIN_OVERLAP:
                raise VolumeReadError(sources[role], f"covers under {MIN_OVERLAP:.0%} of the "
                                      f"FLAIR volume ({printable(sources['flair'])}); sequences "
                                      "of one case must overlap in world coordinates")
            if covered < FULL_OVERLAP:
                notes.append(f"the {ROLE_NAMES[role]} ({printable(sources[role])}) covers "
                             f"{covered:.0%} of the FLAIR volume; outside it that channel is "
                             "blank, which the models never saw")
        channels[role] = _windowed_on(volumes[role], grid)
    for role in replaced:
        channels[role] = channels["flair"]
    stack = np.stack([channels[role] for role in ROLES], axis=-1)  # (k, row, column, 3)
    return CaseVolume([np.ascontiguousarray(s) for s in stack], flair, grid,
                      {role: printable(path) for role, path in sources.items()}, replaced,
                      flair_file, notes)


def coarse_axial_notes(spacing) -> list[str]:
    """A note when the LPS-oriented FLAIR's axial pixels (``spacing``'s first two) exceed
    :data:`COARSE_AXIAL_MM` along an axis."""
    column, row = spacing[0], spacing[1]
    coarse = [name for name, size in (("left-right", column), ("front-back", row))
              if size > COARSE_AXIAL_MM]
    if not coarse:
        return []
    return [f"the FLAIR's axial pixels are {column:.1f} x {row:.1f} mm (left-right x "
            f"front-back), over {COARSE_AXIAL_MM:.0f} mm {' and '.join(coarse)}: acquired in "
            "another plane or at low resolution, so outlines along that axis are no finer than "
            "its pixels"]


def model_grid(oriented):
    """The model's grid for an LPS-oriented volume: GRID_SIDE x GRID_SIDE square pixels over
    its larger in-plane extent, centred on its field of view, its own slices."""
    import SimpleITK as sitk

    size, spacing = oriented.GetSize(), oriented.GetSpacing()
    pixel = max(size[0] * spacing[0], size[1] * spacing[1]) / GRID_SIDE
    direction = np.asarray(oriented.GetDirection()).reshape(3, 3)
    centre = np.asarray(oriented.TransformContinuousIndexToPhysicalPoint(
        ((size[0] - 1) / 2, (size[1] - 1) / 2, 0.0)))
    half = (GRID_SIDE - 1) / 2 * pixel
    grid = sitk.Image(GRID_SIDE, GRID_SIDE, size[2], sitk.sitkUInt8)
    grid.SetSpacing((pixel, pixel, spacing[2]))
    grid.SetDirection(oriented.GetDirection())
    grid.SetOrigin(tuple(centre - direction @ np.array([half, half, 0.0])))
    return grid


def window(values: np.ndarray) -> tuple[float, float]:
    """(low, high) of a volume's intensities for the 0..255 mapping (module docstring)."""
    values = values[np.isfinite(values)]
    if not values.size:
        return 0.0, 1.0
    low, high = float(values.min()), float(values.max())
    return low, high if high > low else low + 1.0


def _windowed_on(volume, grid) -> np.ndarray:
    """``volume`` mapped to 0..255 by its own window and resampled onto ``grid``: uint8
    (slices, rows, columns)."""
    import SimpleITK as sitk

    values = sitk.GetArrayViewFromImage(volume).astype(np.float32)
    low, high = window(values)
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    scaled = sitk.GetImageFromArray((values - low) * np.float32(255.0 / (high - low)))
    scaled.CopyInformation(volume)
    resampled = sitk.Resample(scaled, grid, sitk.Transform(), sitk.sitkLinear, 0.0,
                              sitk.sitkFloat32)
    return np.clip(np.rint(sitk.GetArrayViewFromImage(resampled)), 0, 255).astype(np.uint8)


def _inside_on(volume, grid) -> np.ndarray:
    """Which of ``grid``'s voxels lie inside ``volume``: bool (slices, rows, columns)."""
    import SimpleITK as sitk

    inside = sitk.Image(volume.GetSize(), sitk.sitkUInt8) + 1
    inside.CopyInformation(volume)
    on_grid = sitk.Resample(inside, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayViewFromImage(on_grid).astype(bool)


def mask_on_input_grid(masks: list[np.ndarray], case: CaseVolume):
    """The {0, 1} masks predicted on the model grid as a uint8 SimpleITK image on the input
    FLAIR's grid (its exact size, spacing, origin and direction)."""
    import SimpleITK as sitk

    back = probability_on_input_grid(masks, case)
    mask = sitk.Cast(sitk.BinaryThreshold(back, 0.5, 2.0, 1, 0), sitk.sitkUInt8)
    mask.CopyInformation(case.flair)
    return mask


def probability_on_input_grid(maps: list[np.ndarray], case: CaseVolume):
    """Values in [0, 1] on the model grid (probabilities, or a mask) resampled linearly onto
    the input FLAIR's grid: a float32 SimpleITK image, 0 outside the model grid."""
    import SimpleITK as sitk

    on_grid = sitk.GetImageFromArray(np.stack(maps).astype(np.float32))
    on_grid.CopyInformation(case.grid)
    back = sitk.Resample(on_grid, case.flair, sitk.Transform(), sitk.sitkLinear, 0.0,
                         sitk.sitkFloat32)
    back.CopyInformation(case.flair)
    return back


def tumour_label(path: Path, reference, values: tuple[int, ...] | None = None
                 ) -> tuple[np.ndarray, bool]:
    """A label volume as whole tumour on ``reference``'s grid: bool (slices, rows, columns),
    True where the label is > 0 (or one of ``values``), and whether it had to be resampled
    (nearest neighbour) because its grid differs from ``reference``'s.

    Raises:
        VolumeReadError: the label cannot be read.
    """
    import SimpleITK as sitk

    label = read_volume(path)
    same = (label.GetSize() == reference.GetSize()
            and np.allclose(label.GetSpacing(), reference.GetSpacing(), atol=1e-4)
            and np.allclose(label.GetOrigin(), reference.GetOrigin(), atol=1e-3)
            and np.allclose(label.GetDirection(), reference.GetDirection(), atol=1e-4))
    if not same:
        label = sitk.Resample(label, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    array = sitk.GetArrayViewFromImage(label)
    truth = array > 0 if values is None else np.isin(np.rint(array), values)
    return truth, not same


def read_volume(path: Path):
    """One 3D scalar volume, from a NIfTI file or a DICOM series folder; the header is checked
    before any voxel is decoded."""
    import SimpleITK as sitk

    if path.is_dir():
        files = _series_files(path)
        reader = sitk.ImageFileReader()
        reader.SetFileName(files[0])
    else:
        files = None
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise VolumeReadError(path, "not a readable NIfTI or DICOM image") from exc
    size = reader.GetSize()
    if files is None:
        _check_header(path, reader.GetDimension(), size, reader.GetNumberOfComponents())
        if volume_format(path) is NIFTI and not _nifti_complete(path):
            # SimpleITK would fill the missing voxels with 0 and say nothing
            raise VolumeReadError(path, "truncated: holds fewer voxels than its header "
                                  "declares")
    else:  # a series: the first file's plane times the file count, before decoding
        _check_header(path, 3, (*size[:2], len(files)), reader.GetNumberOfComponents())
    try:
        if files is None:
            image = reader.Execute()
        else:
            series = sitk.ImageSeriesReader()
            series.SetFileNames(files)
            series.MetaDataDictionaryArrayUpdateOn()
            image = series.Execute()
    except RuntimeError as exc:
        odd = _odd_slice(files, size) if files else None
        raise VolumeReadError(path, odd or "image data cannot be read (truncated or "
                              "corrupt)") from exc
    _check_header(path, image.GetDimension(), image.GetSize(),
                  image.GetNumberOfComponentsPerPixel())
    if files is not None:
        image = _series_on_its_own_grid(path, image, series, reader)
    return image


#: Largest departure of a DICOM series' slice step from its median step, as a share of it
#: (the position tags are written with a few decimals).
SLICE_STEP_TOLERANCE = 0.1


def _series_on_its_own_grid(folder: Path, image, series, first):
    """``image`` read from the DICOM series in ``folder`` on the grid its files' positions
    give. ITK spaces the slices evenly from the first to the last position and only warns when
    they are not; a series whose slice steps differ (a slice missing, a position repeated) is
    refused instead. A one-file series takes its slice thickness from its own tags (ITK would
    say 1 mm)."""
    files = series.GetFileNames()
    if len(files) == 1:
        # the slice's own thickness measures its volume; there is no neighbour to step to
        thickness = _dicom_float(first, "0018|0050") or _dicom_float(first, "0018|0088")
        if thickness:
            image.SetSpacing((*image.GetSpacing()[:2], thickness))
        return image
    normal = np.asarray(image.GetDirection()).reshape(3, 3)[:, 2]
    try:
        positions = np.array([[float(v) for v in series.GetMetaData(k, "0020|0032").split("\\")]
                              for k in range(len(files))])
    except (RuntimeError, ValueError):  # no position tags: ITK's even spacing is all there is
        return image
    steps = np.diff(positions @ normal)
    median = float(np.median(np.abs(steps)))
    if median == 0 or np.any(np.abs(steps) < SLICE_STEP_TOLERANCE * median):
        raise VolumeReadError(folder, "two files lie at one slice position (a slice repeated "
                              "or two series mixed); one file per position is expected")
    if np.any(np.abs(np.abs(steps) - median) > SLICE_STEP_TOLERANCE * median):
        raise VolumeReadError(folder, f"slices are not evenly spaced (steps from "
                              f"{np.abs(steps).min():.2f} to {np.abs(steps).max():.2f} mm): a "
                              "slice is missing or the series mixes acquisitions")
    return image


def _dicom_float(reader, tag: str) -> float | None:
    """A positive number from a DICOM tag of ``reader``'s file, else None."""
    try:
        value = float(reader.GetMetaData(tag).split("\\")[0])
    except (RuntimeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def _odd_slice(files: list[str], size) -> str | None:
    """What makes a series unreadable when one of its files differs from the first in plane
    size: that file and both sizes (ITK's own message says only that reading failed)."""
    import SimpleITK as sitk

    for name in files[1:]:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            return f"{printable(Path(name).name)} cannot be read (truncated or corrupt)"
        if tuple(reader.GetSize()[:2]) != tuple(size[:2]):
            return (f"{printable(Path(name).name)} is {'x'.join(map(str, reader.GetSize()[:2]))}"
                    f" while the series' first file is {'x'.join(map(str, size[:2]))}; the "
                    "files of one series share one plane size")
    return None


def _nifti_complete(path: Path) -> bool:
    """Whether a NIfTI file holds every byte its header declares. A .nii.gz is judged by its
    gzip trailer (the uncompressed size) and decompressed in full only when that disagrees."""
    import gzip
    import zlib

    import nibabel as nib

    try:
        header = nib.load(str(path)).header
        expected = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * \
            header.get_data_dtype().itemsize
    except Exception:  # noqa: BLE001 - nibabel cannot parse it: SimpleITK's reading decides
        return True
    if not path.name.lower().endswith(".gz"):
        return path.stat().st_size >= expected
    with open(path, "rb") as handle:
        handle.seek(-4, os.SEEK_END)
        if int.from_bytes(handle.read(4), "little") == expected % 2**32:
            return True
    total = 0  # several gzip members, or truncated: count what decompresses
    try:
        with gzip.open(path) as stream:
            while chunk := stream.read(1 << 20):
                total += len(chunk)
    except (EOFError, OSError, zlib.error):
        return False
    return total >= expected


def check_image(name: str | Path, image) -> None:
    """Refuse an image already in memory as :func:`read_volume` refuses a file: not 3D, not
    scalar, or a side over the limit; ``name`` names it in the message."""
    _check_header(name, image.GetDimension(), image.GetSize(),
                  image.GetNumberOfComponentsPerPixel())


def _check_header(path: str | Path, dimension: int, size, components: int) -> None:
    if dimension != 3:
        raise VolumeReadError(path, f"{dimension}D image {'x'.join(map(str, size))}; one 3D "
                              "volume per sequence is expected")
    if components != 1:
        raise VolumeReadError(path, f"{components} values per voxel; one (a scalar volume) is "
                              "expected")
    if max(size) > MAX_VOXELS_PER_SIDE:
        raise VolumeReadError(path, f"size {'x'.join(map(str, size))} over the "
                              f"{MAX_VOXELS_PER_SIDE}-voxel limit (not decoded)")
    if int(np.prod([int(v) for v in size])) > MAX_VOXELS:
        raise VolumeReadError(path, f"size {'x'.join(map(str, size))} over the limit of "
                              f"{MAX_VOXELS:,} voxels in all (not decoded)")


def _series_files(folder: Path) -> list[str]:
    """The files of the one DICOM series in ``folder``, in slice order."""
    import SimpleITK as sitk

    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise VolumeReadError(folder, "no readable DICOM series")
    if len(ids) > 1:
        raise VolumeReadError(folder, f"mixes {len(ids)} DICOM series; put each series in a "
                              "folder of its own")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0]))


def series_description(folder: Path) -> str:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(_series_files(folder)[0])
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise VolumeReadError(folder, "its first DICOM file cannot be read") from exc
    return reader.GetMetaData(DICOM_DESCRIPTION_TAG).strip() \
        if reader.HasMetaDataKey(DICOM_DESCRIPTION_TAG) else ""


def series_role(description: str) -> str | None:
    """The role a series description's built-in words give: FLAIR; T1 with a contrast word is
    post-contrast, T1 alone pre-contrast."""
    text = description.upper()
    if any(word in text for word in _FLAIR_WORDS):
        return "flair"
    if any(word in text for word in _PRE_WORDS):
        return "post" if any(word in text for word in _POST_WORDS) else "pre"
    return None


def _dicom_roles(scan: VolumeScan, chosen: dict[str, str]) -> dict[str, Path]:
    """Role -> series folder of a DICOM case. One series alone is FLAIR. ``chosen`` (role ->
    text) names a series by its folder's name or a piece of its description, before the
    built-in words; two series of one description can only be told apart by folder."""
    if len(scan.dicom_series) == 1:
        _series_files(scan.dicom_series[0])  # refuses a folder mixing series
        return {"flair": scan.dicom_series[0]}
    described = {folder: series_description(folder) for folder in scan.dicom_series}
    roles: dict[str, Path] = {}
    for role, piece in chosen.items():
        matches = [f for f in described if f.name.upper() == piece.upper()] or \
            [f for f, text in described.items() if piece.upper() in text.upper()]
        if len(matches) > 1:
            names = ", ".join(printable(f.name) for f in matches)
            raise VolumeReadError(scan.folder, f"--series {role}={piece} fits {len(matches)} "
                                  f"series ({names}); give one series folder's name: --series "
                                  f"{role}=FOLDER")
        if matches:
            roles[role] = matches[0]
    for folder, description in described.items():
        role = series_role(description)
        if folder in roles.values() or role is None or role in chosen and role in roles:
            continue
        if role in roles:
            raise VolumeReadError(folder, f"a second {role} series ({description!r}; the first "
                                  f"is {printable(roles[role].name)}); choose one with --series "
                                  f"{role}=FOLDER (a series folder's name) or =TEXT (a piece of "
                                  "its description)")
        roles[role] = folder
    if "flair" not in roles:
        raise VolumeReadError(scan.folder, "no FLAIR series among "
                              f"{len(scan.dicom_series)} (descriptions name none; choose one with "
                              "--series flair=FOLDER or =TEXT)")
    return roles
