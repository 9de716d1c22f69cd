"""Find the patients and slices in a user's SCAN_DIR, noting every file that cannot be used.

SCAN_DIR is one patient folder (slices directly inside) or a folder of patient folders (the
Kaggle ``kaggle_3m`` layout). Slices are ``<patient>_<n>.tif|.tiff|.png``; ``..._mask`` files
are ground truth and never input. Loose files at the top of a folder of patients (Kaggle's
``data.csv``, ``README.md``) are not inputs and are passed over silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from bt_pipeline.data.manifest import IMAGE_SUFFIXES

_SLICE = re.compile(r"^(?P<stem>.+_(?P<number>\d+))(?P<mask>_mask)?$")


@dataclass(frozen=True)
class InputProblem:
    """One file or folder that was skipped or ignored, and why."""

    path: str
    patient_id: str
    problem: str
    skipped: bool = True  # False: not an input at all (a stray file), so exit status unaffected

    def line(self) -> str:
        verb = "skipped" if self.skipped else "ignored"
        return f"{verb}: {self.path}: {self.problem}"


@dataclass
class PatientScan:
    patient_id: str
    folder: Path
    slices: list[tuple[int, Path, Path | None]] = field(default_factory=list)  # n, image, mask


def _scan_patient(folder: Path, problems: list[InputProblem]) -> PatientScan:
    scan = PatientScan(folder.name, folder)
    images: dict[str, tuple[int, Path]] = {}
    masks: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        match = _SLICE.match(path.stem) if path.suffix.lower() in IMAGE_SUFFIXES else None
        if path.is_dir() or match is None:
            problems.append(InputProblem(str(path), folder.name,
                                         "not a slice (<patient>_<n>.tif|.tiff|.png)", False))
        elif match.group("mask"):
            masks[match.group("stem")] = path
        else:
            images[match.group("stem")] = (int(match.group("number")), path)
    for stem, mask in sorted(masks.items()):
        if stem not in images:
            problems.append(InputProblem(str(mask), folder.name, "mask with no image"))
    scan.slices = sorted((n, path, masks.get(stem)) for stem, (n, path) in images.items())
    if not scan.slices:
        problems.append(InputProblem(str(folder), folder.name, "no slices in patient folder"))
    return scan


def scan_inputs(scan_dirs: list[Path]) -> tuple[list[PatientScan], list[InputProblem]]:
    """Patients (with at least one slice) and the problems met on the way."""
    patients: list[PatientScan] = []
    problems: list[InputProblem] = []
    for scan_dir in scan_dirs:
        if not scan_dir.is_dir():
            problems.append(InputProblem(str(scan_dir), "", "not a directory"))
            continue
        entries = sorted(scan_dir.iterdir())
        has_slices = any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in entries)
        folders = [scan_dir] if has_slices else [p for p in entries if p.is_dir()]
        if not folders:
            problems.append(InputProblem(str(scan_dir), "", "no slices or patient folders"))
        for folder in folders:
            scan = _scan_patient(folder, problems)
            if scan.slices:
                patients.append(scan)
    return patients, problems
