"""The dataset's file layout: one filename grammar for slices and masks, and the scan of a
user's SCAN_DIR that finds patients and slices, noting every file that cannot be used.

Slices are ``<patient>_<n>.tif|.tiff|.png`` inside a folder per patient, each ground-truth mask
``<patient>_<n>_mask`` beside its slice; patient ids are ``TCGA_<institution>_<id>_<date>``.

SCAN_DIR is one patient folder (slices directly inside) or a folder of patient folders (the
Kaggle ``kaggle_3m`` layout); ``..._mask`` files are ground truth and never input. Files at the
top of a folder of patients that are not images (Kaggle's ``data.csv``, ``README.md``) are
passed over silently; images there are reported.

Volumes are found too (read by :mod:`bt_pipeline.data.volumes`): a NIfTI file (FLAIR alone),
a folder of NIfTI cases named nnU-Net style (``CASE_0000``, ``CASE_0001``, ...: each channel's
sequence named by a ``dataset.json`` at or above the folder, or by ``--channels``; one
numbered file alone is FLAIR) or BraTS style (``CASE_t1``, ``CASE_flair``,
``CASE_t1ce``; ``flair.nii.gz`` alone takes the folder's name), a DICOM series folder (FLAIR
alone), a folder of DICOM series folders (one case; each series' role read from its
description), and a folder of any of these cases.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from bt_pipeline.data.formats import is_volume_file, volume_stem

IMAGE_SUFFIXES = (".tif", ".tiff", ".png")
#: Sequence roles of a case, in the channel order of a slice (pre-contrast, FLAIR, post-contrast).
ROLES = ("pre", "flair", "post")
ROLE_NAMES = {"pre": "pre-contrast T1", "flair": "FLAIR", "post": "post-contrast T1"}
_NNUNET = re.compile(r"^(?P<case>.+)_(?P<code>\d{4})$")
#: The role of a numbered (nnU-Net) channel whose name no dataset.json or --channels gives:
#: channel numbers mean what each data set says (the Decathlon's 0000 is FLAIR, not T1).
UNNAMED = "unnamed"
#: How many folders above the numbered files a ``dataset.json`` is looked for (nnU-Net and
#: the Decathlon keep it beside ``imagesTr/``).
DATASET_JSON_LEVELS = 2
_BRATS = re.compile(r"^(?:(?P<case>.+?)[_-])?(?P<code>t1|t1ce|t1c|t1gd|t1post|flair|t2)$",
                    re.IGNORECASE)
_BRATS_ROLES = {"t1": "pre", "t1ce": "post", "t1c": "post", "t1gd": "post", "t1post": "post",
                "flair": "flair"}
_SLICE = re.compile(r"^(?P<stem>(?P<patient>.+)_(?P<number>\d+))(?P<mask>_mask)?$")
_INSTITUTION = re.compile(r"^TCGA_(?P<institution>[A-Za-z0-9]+)_")


@dataclass(frozen=True)
class SliceName:
    """What a slice or mask filename says: its patient, slice number and kind."""

    patient: str
    number: int
    stem: str  # the image's stem, shared by the slice and its mask
    is_mask: bool


def slice_name(path: Path) -> SliceName | None:
    """Parse ``<patient>_<n>[_mask].<image suffix>``; None for any other file."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return None
    match = _SLICE.match(path.stem)
    if match is None:
        return None
    return SliceName(match.group("patient"), int(match.group("number")), match.group("stem"),
                     match.group("mask") is not None)


def parse_slice_name(path: Path) -> tuple[str, int] | None:
    """``<patient>_<n>.tif`` -> (patient, n); None for masks and anything else."""
    name = slice_name(path)
    return None if name is None or name.is_mask else (name.patient, name.number)


def mask_path_for(image_path: Path) -> Path:
    """The ground-truth mask that belongs to an image slice."""
    return image_path.with_name(f"{image_path.stem}_mask{image_path.suffix}")


def institution_of(patient_id: str) -> str:
    """Institution code from ``TCGA_<inst>_<id>_<date>``; ``"unknown"`` otherwise."""
    match = _INSTITUTION.match(patient_id)
    return match.group("institution") if match else "unknown"


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def printable(path: str | Path) -> str:
    """``path`` as one line of valid UTF-8 text: bytes that are not UTF-8 (a name from another
    system's encoding) and control characters (a newline in a file name, which could forge a
    line of bt's own output) are shown as backslash escapes, so the path can be printed and
    written to a CSV."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


@dataclass(frozen=True)
class InputProblem:
    """One file or folder that was skipped or ignored, and why."""

    path: str
    patient_id: str
    problem: str
    skipped: bool = True  # False: not an input at all (a stray file), so exit status unaffected

    def __post_init__(self):
        object.__setattr__(self, "path", printable(self.path))
        object.__setattr__(self, "patient_id", printable(self.patient_id))

    def line(self) -> str:
        verb = "skipped" if self.skipped else "ignored"
        return f"{verb}: {self.path}: {self.problem}"


@dataclass
class VolumeScan:
    """One case given as volumes: NIfTI files by role, or DICOM series folders whose roles are
    read from their headers (:mod:`bt_pipeline.data.volumes`)."""

    patient_id: str
    folder: Path  # where the case was found
    nifti: dict[str, Path] = field(default_factory=dict)  # role -> file
    dicom_series: list[Path] = field(default_factory=list)  # series folders
    label: Path | None = None  # ground truth: CASE_seg, labelsTr/CASE or --labels DIR/CASE


def is_dicom(path: Path) -> bool:
    """A DICOM Part 10 file: ``DICM`` after its 128-byte preamble (extensions vary)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _holds_dicom(folder: Path) -> bool:
    return any(p.is_file() and is_dicom(p) for p in sorted(folder.iterdir())[:50])


def channel_role(name: str) -> str | None:
    """The role a sequence's name gives (a dataset.json channel name, a --channels value):
    FLAIR; T1 with a contrast word post-contrast, T1 alone pre-contrast; None for a sequence
    the models do not use (T2, ADC, ...)."""
    text = re.sub(r"[^a-z0-9+]", "", name.lower())
    if "flair" in text:
        return "flair"
    if not text.startswith("t1"):
        return None
    rest = text[2:].removeprefix("w")
    contrast = rest in ("c", "ce") or any(word in rest for word in ("gd", "gad", "post",
                                                                    "contrast", "+"))
    return "post" if contrast else "pre"


def channels_named(text: str) -> dict[str, str | None]:
    """``--channels 0000=flair,0001=t1,0002=t1ce`` as channel code -> role.

    Raises:
        ValueError: a part that is not NUMBER=NAME.
    """
    channels = {}
    for part in text.split(","):
        code, _, name = part.partition("=")
        if not code.strip().isdigit() or not name.strip():
            raise ValueError(f"--channels {text!r}: {part!r} is not NUMBER=NAME (for example "
                             "0000=flair,0001=t1,0002=t1ce)")
        channels[f"{int(code):04d}"] = channel_role(name)
    return channels


def dataset_channels(folder: Path, problems: list[InputProblem]) -> dict[str, str | None] | None:
    """Channel code -> role from the ``dataset.json`` nearest at or above ``folder``
    (nnU-Net's ``channel_names``, the Decathlon's ``modality``), or None when there is none."""
    for candidate in [folder, *list(folder.parents)[:DATASET_JSON_LEVELS]]:
        path = candidate / "dataset.json"
        if not path.is_file():
            continue
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            names = raw.get("channel_names") or raw.get("modality")
            return {f"{int(code):04d}": channel_role(str(name)) for code, name in names.items()}
        except (OSError, ValueError, AttributeError, TypeError):
            problems.append(InputProblem(str(path), "", "dataset.json without readable "
                                         "channel_names (or modality): {\"0\": \"FLAIR\", ...}"))
            return {}
    return None


def volume_role(path: Path, channels: dict[str, str | None] | None = None
               ) -> tuple[str, str | None] | None:
    """(case id, role) a volume file's name says (NIfTI, NRRD, MetaImage); role None for a
    sequence the models do not use (T2), :data:`UNNAMED` for a numbered channel when
    ``channels`` (code -> role) is not given; case id "" when the name is the role alone
    (``flair.nii.gz``). None: not a sequence name."""
    stem = volume_stem(path)
    match = _NNUNET.match(stem)
    if match:
        return match.group("case"), UNNAMED if channels is None else channels.get(
            match.group("code"))
    match = _BRATS.match(stem)
    if match:
        return match.group("case") or "", _BRATS_ROLES.get(match.group("code").lower())
    return None


def _file_cases(folder: Path, files: list[Path], problems: list[InputProblem],
                 channels: dict[str, str | None] | None = None) -> list[VolumeScan]:
    if channels is None and any(_NNUNET.match(volume_stem(p)) for p in files):
        channels = dataset_channels(folder, problems)
    cases: dict[str, VolumeScan] = {}
    unnamed: dict[str, list[Path]] = {}
    labels: dict[str, Path] = {}
    for path in files:
        if volume_stem(path).lower().endswith("_seg"):  # BraTS's ground truth beside the images
            labels[printable(volume_stem(path)[:-4] or folder.name)] = path
            continue
        named = volume_role(path, channels)
        if named is None:
            problems.append(InputProblem(str(path), "", "volume name says no sequence (CASE_0000"
                                         " with a dataset.json, or CASE_t1|flair|t1ce expected)",
                                         False))
            continue
        case_id, role = named
        case_id = printable(case_id or folder.name)
        case = cases.setdefault(case_id, VolumeScan(case_id, folder))
        if role == UNNAMED:
            unnamed.setdefault(case_id, []).append(path)
        elif role is None:
            problems.append(InputProblem(str(path), case_id, "sequence not used by the models",
                                         False))
        elif role in case.nifti:
            problems.append(InputProblem(str(path), case_id, f"second {role} volume (the one "
                                         f"used is {printable(case.nifti[role].name)})"))
        else:
            case.nifti[role] = path
    for case_id, paths in unnamed.items():
        if len(paths) == 1 and not cases[case_id].nifti:  # one volume alone is FLAIR
            cases[case_id].nifti["flair"] = paths[0]
            continue
        cases[case_id].nifti.clear()
        codes = ", ".join(sorted(volume_stem(p)[-4:] for p in paths))
        problems.append(InputProblem(
            str(folder), case_id, f"channels {codes} have no names: write a dataset.json "
            "beside the images folder ({\"channel_names\": {\"0\": \"T1\", \"1\": "
            "\"FLAIR\", \"2\": \"T1ce\"}}) or pass --channels 0000=t1,0001=flair,0002=t1ce"))
    for case in cases.values():
        if "flair" not in case.nifti and case.patient_id not in unnamed:
            problems.append(InputProblem(str(folder), case.patient_id,
                                         "no FLAIR volume (CASE_flair, or a channel named FLAIR "
                                         "in dataset.json)"))
    found = [case for case in cases.values() if "flair" in case.nifti]
    for case in found:
        case.label = labels.get(case.patient_id) or labels.get(folder.name if len(found) == 1
                                                                  else "") or \
            labels_folder_file(folder, case.patient_id)
    return found


def labels_folder_file(images: Path, case_id: str) -> Path | None:
    """nnU-Net's and the Decathlon's ground truth: ``labelsTr/CASE.nii.gz`` beside
    ``imagesTr/`` (``labelsTs`` beside ``imagesTs``)."""
    if not images.name.startswith("images"):
        return None
    folder = images.parent / ("labels" + images.name[len("images"):])
    return next((folder / f"{case_id}{suffix}" for suffix in (".nii.gz", ".nii")
                 if (folder / f"{case_id}{suffix}").is_file()), None)


def _volume_cases(folder: Path, problems: list[InputProblem], depth: int = 0,
                  channels: dict[str, str | None] | None = None) -> list[VolumeScan]:
    """The volume cases in ``folder``: itself a DICOM series or a case of series folders, its
    NIfTI files, and (one level down) the same in each sub-folder."""
    entries = sorted(folder.iterdir())
    folders = [p for p in entries if p.is_dir()]
    candidates = [p for p in folders if not _holds_slices(p)]  # a listing, not 50 file reads
    # a folder of DICOM files is a series unless it also holds series folders (a case)
    series = [p for p in candidates if _holds_dicom(p) and not any(
        q.is_dir() and _holds_dicom(q) for q in p.iterdir())]
    if _holds_dicom(folder):  # below SCAN_DIR only a case holding series folders gets here
        if not series:
            return [VolumeScan(printable(folder.name), folder, dicom_series=[folder])]
        # files beside the series folders (a DICOMDIR index, a stray slice) are not a series
        for stray in (p for p in entries if p.is_file() and is_dicom(p)):
            index = stray.name.upper() == "DICOMDIR"
            problems.append(InputProblem(
                str(stray), printable(folder.name),
                "a DICOMDIR index; the series folders beside it are read" if index else
                "a DICOM file beside the case's series folders; a series belongs in a folder "
                "of its own", not index))
    # a sub-folder holding no image at all (notes, an export's extras) does not make the
    # series beside it separate cases
    holding = [p for p in folders if p in series or not _holds_nothing(p)]
    if series and len(series) == len(holding):
        for extra in (p for p in folders if p not in holding):
            problems.append(InputProblem(str(extra), printable(folder.name),
                                         "holds no DICOM, NIfTI or slice", False))
        return [VolumeScan(printable(folder.name), folder, dicom_series=series)]
    cases = _file_cases(folder, [p for p in entries if p.is_file() and is_volume_file(p)],
                        problems, channels)
    if depth == 0:
        for sub in candidates:
            cases.extend([VolumeScan(printable(sub.name), sub, dicom_series=[sub])]
                         if sub in series else _volume_cases(sub, problems, depth + 1,
                                                             channels))
    else:  # deeper folders are not searched: say so for those that hold volumes
        for sub in candidates:
            if sub not in series and (_holds_dicom(sub) or any(
                    p.is_file() and is_volume_file(p) for p in sub.iterdir())):
                problems.append(InputProblem(str(sub), printable(sub.name), "volumes two "
                                             "levels below SCAN_DIR are not searched; give "
                                             "this folder or its parent as SCAN_DIR"))
    return cases


@dataclass
class PatientScan:
    patient_id: str  # the folder's name, printable (see :func:`printable`)
    folder: Path
    slices: list[tuple[int, Path, Path | None]] = field(default_factory=list)  # n, image, mask


def _scan_patient(folder: Path, problems: list[InputProblem]) -> PatientScan:
    scan = PatientScan(printable(folder.name), folder)
    images: dict[int, Path] = {}
    masks: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        name = slice_name(path)
        if path.is_dir() or name is None:
            problems.append(InputProblem(str(path), scan.patient_id,
                                         "not a slice (<patient>_<n>.tif|.tiff|.png)", False))
        elif name.is_mask:
            masks[name.stem] = path
        elif name.number in images:
            problems.append(InputProblem(str(path), scan.patient_id,
                                         f"duplicate slice number {name.number} (the slice used "
                                         f"is {printable(images[name.number].name)})"))
        else:
            images[name.number] = path
    used = {slice_name(path).stem for path in images.values()}
    for stem, mask in sorted(masks.items()):
        if stem not in used:
            problems.append(InputProblem(str(mask), scan.patient_id, "mask with no image"))
    scan.slices = [(n, path, _mask_of(path, masks)) for n, path in sorted(images.items())]
    if not scan.slices:
        problems.append(InputProblem(str(folder), scan.patient_id, "no slices in patient folder"))
    return scan


def _mask_of(image: Path, masks: dict[str, Path]) -> Path | None:
    """The mask beside ``image``: same stem, the image's own suffix first."""
    same = mask_path_for(image)
    return same if same in masks.values() else masks.get(slice_name(image).stem)


def _holds_nothing(folder: Path) -> bool:
    """Whether ``folder`` holds no slice, NIfTI or DICOM file, nor a folder."""
    entries = list(folder.iterdir())
    return not any(p.is_dir() or is_volume_file(p) or slice_name(p) is not None for p in entries) \
        and not _holds_dicom(folder)


def _holds_slices(folder: Path) -> bool:
    return any(slice_name(p) is not None and p.is_file() for p in folder.iterdir())


def scan_inputs(scan_dirs: list[Path], channels: dict[str, str | None] | None = None
                ) -> tuple[list[PatientScan | VolumeScan], list[InputProblem]]:
    """Patients (with at least one slice, or a FLAIR volume) and the problems met on the way.

    A SCAN_DIR with sub-folders holding slices is a folder of patients: images lying at its top
    are reported and passed over. A SCAN_DIR holding volumes (NIfTI or DICOM, see the module's
    docstring) gives their cases. Otherwise it is one patient's folder of slices."""
    patients: list[PatientScan | VolumeScan] = []
    problems: list[InputProblem] = []
    for scan_dir in (Path(os.path.abspath(d)) for d in scan_dirs):  # "." has a name too
        if scan_dir.is_file() and is_volume_file(scan_dir):  # one file: FLAIR alone
            named = volume_role(scan_dir, channels)
            case_id = printable(named[0] if named and named[0] else volume_stem(scan_dir))
            if named is not None and named[1] not in ("flair", UNNAMED):
                problems.append(InputProblem(str(scan_dir), case_id, "a single volume is read as "
                                             "FLAIR, and this one's name says another sequence"))
                continue
            patients.append(VolumeScan(case_id, scan_dir.parent, nifti={"flair": scan_dir}))
            continue
        if not scan_dir.is_dir():
            reason = "a broken symlink or a symlink loop" if scan_dir.is_symlink() \
                else "not a directory or NIfTI file"
            problems.append(InputProblem(str(scan_dir), "", reason))
            continue
        if not _holds_slices(scan_dir):
            cases = _volume_cases(scan_dir, problems, channels=channels)
            if cases:
                patients.extend(cases)
                # slice-folder patients beside the volume cases are patients too
                for folder in sorted(p for p in scan_dir.iterdir()
                                     if p.is_dir() and _holds_slices(p)):
                    scan = _scan_patient(folder, problems)
                    if scan.slices:
                        patients.append(scan)
                continue
        entries = sorted(scan_dir.iterdir())
        folders = [p for p in entries if p.is_dir() and _holds_slices(p)]
        if folders:
            for stray in (p for p in entries if p.is_file() and slice_name(p) is not None):
                problems.append(InputProblem(str(stray), "", "an image at the top of a folder "
                                             "of patients; slices belong in a patient folder"))
            for empty in (p for p in entries if p.is_dir() and p not in folders):
                problems.append(InputProblem(str(empty), printable(empty.name),
                                             "no slices in patient folder"))
        elif _holds_slices(scan_dir):
            folders = [scan_dir]
        else:
            problems.append(InputProblem(str(scan_dir), "", "no slices or patient folders"))
        for folder in folders:
            scan = _scan_patient(folder, problems)
            if scan.slices:
                patients.append(scan)
    return patients, problems
