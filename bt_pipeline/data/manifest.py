"""The slice manifest: one row per slice of a Kaggle-layout root, with a patient-level split.

Columns: patient_id, institution, slice, n_slices, image, mask, tumor_pixels, has_tumor, split,
fold. ``fold`` is the patient's cross-validation fold (0..N_FOLDS-1) for development patients
(train and val) and -1 for test patients, who never enter the cross-validation.
Paths are relative to the data root, with forward slashes, so the CSV is portable and the
committed ``data_manifest.csv`` is reproduced byte for byte by ``make manifest``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from bt_pipeline.atomic import write_text_atomic
from bt_pipeline.config import DataConfig
from bt_pipeline.data.layout import institution_of, mask_path_for, parse_slice_name
from bt_pipeline.data.preprocess import read_mask

COLUMNS = [
    "patient_id", "institution", "slice", "n_slices", "image", "mask",
    "tumor_pixels", "has_tumor", "split", "fold",
]
SPLITS = ("train", "val", "test")
#: Cross-validation folds over the development (train + val) patients.
N_FOLDS = 5
#: ``fold`` of a patient outside the cross-validation (the test split).
NO_FOLD = -1
def scan_slices(data_root: str | os.PathLike) -> pd.DataFrame:
    """One row per image slice (with its mask) under ``data_root/<patient>/``, no split yet."""
    root = Path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data directory not found (see `make data`)")
    rows = []
    for patient_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(patient_dir.iterdir()):
            parsed = parse_slice_name(path)
            if parsed is None:
                continue
            mask = mask_path_for(path)
            if not mask.is_file():
                raise FileNotFoundError(f"{mask}: mask missing for slice {path.name}")
            rows.append({
                "patient_id": patient_dir.name,
                "institution": institution_of(patient_dir.name),
                "slice": parsed[1],
                "image": path.relative_to(root).as_posix(),
                "mask": mask.relative_to(root).as_posix(),
            })
    if not rows:
        raise FileNotFoundError(f"{root}: no <patient>/<patient>_<n>.tif slices found")
    table = pd.DataFrame(rows).sort_values(["patient_id", "slice"], kind="stable")
    table = table.reset_index(drop=True)
    table["n_slices"] = table.groupby("patient_id")["slice"].transform("size")
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        counts = list(pool.map(lambda rel: int(read_mask(root / rel).sum()), table["mask"]))
    table["tumor_pixels"] = counts
    table["has_tumor"] = (table["tumor_pixels"] > 0).astype(int)
    return table


def split_patients(
    institution_by_patient: dict[str, str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[str, str]:
    """Assign each patient to train/val/test, stratified by institution.

    Within each institution the patients are shuffled with ``seed`` and the split sizes are
    apportioned by largest remainder, so every institution appears in every split it is big
    enough for, and the result depends only on the patient list and the seed.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be in [0, 1) and sum below 1")
    rng = np.random.default_rng(seed)
    fractions = np.array([1.0 - val_fraction - test_fraction, val_fraction, test_fraction])
    assignment: dict[str, str] = {}
    assigned = np.zeros(len(SPLITS))
    for patients in _shuffled_by_institution(institution_by_patient, rng):
        ideal = fractions * len(patients)
        counts = np.floor(ideal).astype(int)
        # Leftover patients go to the largest remainders; ties go to the split furthest
        # below its share of all patients seen so far, so small institutions spread out.
        deficit = fractions * (len(assignment) + len(patients)) - assigned - counts
        order = sorted(range(len(SPLITS)), key=lambda k: (-round(ideal[k] - counts[k], 9),
                                                          -deficit[k], k))
        for index in order[: len(patients) - counts.sum()]:
            counts[index] += 1
        assigned += counts
        bounds = np.cumsum(counts)
        for position, patient in enumerate(patients):
            assignment[patient] = SPLITS[int(np.searchsorted(bounds, position, side="right"))]
    return assignment


def assign_folds(institution_by_patient: dict[str, str], n_folds: int, seed: int) -> dict[str, int]:
    """Deal patients into ``n_folds`` cross-validation folds, stratified by institution.

    Within each institution the patients are shuffled with ``seed`` and dealt round-robin; the
    deal continues across institutions where the previous one stopped, so fold sizes differ by
    at most one and each institution is spread as evenly as its size allows. The result depends
    only on the patient list, ``n_folds`` and ``seed``.
    """
    if n_folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {n_folds}")
    rng = np.random.default_rng(seed)
    folds: dict[str, int] = {}
    for patients in _shuffled_by_institution(institution_by_patient, rng):
        for patient in patients:
            folds[patient] = len(folds) % n_folds
    return folds


def _shuffled_by_institution(institution_by_patient: dict[str, str],
                             rng: np.random.Generator) -> Iterator[list[str]]:
    """Each institution's patients (institutions and patients in sorted order), shuffled by
    ``rng``, one institution after the other."""
    by_institution: dict[str, list[str]] = {}
    for patient, institution in sorted(institution_by_patient.items()):
        by_institution.setdefault(institution, []).append(patient)
    for institution in sorted(by_institution):
        members = by_institution[institution]
        yield [members[i] for i in rng.permutation(len(members))]


def build_manifest(
    data_root: str | os.PathLike, val_fraction: float, test_fraction: float, seed: int
) -> pd.DataFrame:
    """Scan ``data_root`` and add the patient-level split."""
    table = scan_slices(data_root)
    institutions = dict(zip(table["patient_id"], table["institution"], strict=False))
    split = split_patients(institutions, val_fraction, test_fraction, seed)
    table["split"] = table["patient_id"].map(split)
    development = {p: i for p, i in institutions.items() if split[p] != "test"}
    folds = assign_folds(development, N_FOLDS, seed)
    table["fold"] = table["patient_id"].map(lambda p: folds.get(p, NO_FOLD)).astype(int)
    return table[COLUMNS]


def write_manifest(table: pd.DataFrame, path: str | os.PathLike) -> None:
    write_text_atomic(path, table[COLUMNS].to_csv(index=False, lineterminator="\n"))


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Read and check a manifest written by :func:`write_manifest`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found (run `make manifest`)")
    table = pd.read_csv(path, dtype={"patient_id": str, "institution": str})
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: manifest lacks column(s) {missing}")
    bad = sorted(set(table["split"]) - set(SPLITS))
    if bad:
        raise ValueError(f"{path}: unknown split name(s) {bad}")
    for column in ("split", "fold"):
        leaked = table.groupby("patient_id")[column].nunique()
        if (leaked > 1).any():
            raise ValueError(f"{path}: patient(s) in several {column}s: "
                             f"{list(leaked[leaked > 1].index)}")
    crossed = table[(table["split"] == "test") != (table["fold"] == NO_FOLD)]
    if not crossed.empty:
        raise ValueError(f"{path}: fold must be {NO_FOLD} exactly for test patients "
                         f"(see {sorted(set(crossed['patient_id']))[:3]})")
    return table


def add_arguments_manifest(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=DataConfig.data_root)
    parser.add_argument("--out", default=DataConfig.manifest)
    parser.add_argument("--seed", type=int, default=DataConfig.seed)


def run_manifest(args: argparse.Namespace) -> int:
    defaults = DataConfig()
    table = build_manifest(args.data_dir, defaults.val_fraction, defaults.test_fraction, args.seed)
    write_manifest(table, args.out)
    per_split = table.groupby("split")["patient_id"].nunique().to_dict()
    print(f"{args.out}: {table['patient_id'].nunique()} patients, {len(table)} slices, "
          f"{int(table['has_tumor'].sum())} with tumour; patients per split {per_split}")
    return 0


def add_arguments_patients(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=DataConfig.data_root)
    parser.add_argument("--manifest", default=DataConfig.manifest)
    parser.add_argument("--split", choices=list(SPLITS), default="test")


def run_patients(args: argparse.Namespace) -> int:
    table = read_manifest(args.manifest)
    for patient in sorted(table.loc[table["split"] == args.split, "patient_id"].unique()):
        print(Path(args.data_dir) / patient)
    return 0
