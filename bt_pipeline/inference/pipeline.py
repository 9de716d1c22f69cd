"""Both stages over a user's scan folders, and every output file of ``bt infer``."""

from __future__ import annotations

import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from bt_pipeline.atomic import write_text_atomic
from bt_pipeline.cli import UsageError
from bt_pipeline.data.layout import InputProblem, PatientScan, scan_inputs
from bt_pipeline.data.preprocess import SliceReadError, read_image, read_mask
from bt_pipeline.evaluation.metrics import dice_score, iou_score
from bt_pipeline.inference.outputs import (
    write_html_report,
    write_mask_png,
    write_mask_volume,
    write_overview,
    write_viewer,
)

#: The output tables' columns (README "Reading the outputs" defines each).
SLICE_COLUMNS = ["patient_id", "slice", "image", "classifier_probability", "classifier_positive",
                 "tumor_detected", "mask_pixels"]
PATIENT_COLUMNS = ["patient_id", "n_slices", "n_tumor_slices", "tumor_detected", "tumor_pixels",
                   "tumor_volume_ml"]
ERROR_COLUMNS = ["path", "patient_id", "problem", "skipped"]


@dataclass
class InferenceResult:
    patients: pd.DataFrame
    slices: pd.DataFrame
    problems: list[InputProblem]
    first_patient_unix: float | None  # wall clock when the first patient's outputs were written

    @property
    def exit_code(self) -> int:
        if self.patients.empty:
            return 2
        return 1 if any(p.skipped for p in self.problems) else 0


class LoadedSlice(NamedTuple):
    number: int
    image_path: Path
    image: np.ndarray  # uint8 RGB
    mask_path: Path | None
    truth: np.ndarray | None  # uint8 {0, 1}, None without (readable) ground truth
    problem: str | None  # why the ground truth could not be read


def _read_slice(entry) -> LoadedSlice:
    number, image_path, mask_path = entry
    image = read_image(image_path)  # raises SliceReadError naming the file
    truth, problem = None, None
    if mask_path is not None:
        try:
            truth = read_mask(mask_path)
        except SliceReadError as exc:
            problem = str(exc)
    return LoadedSlice(number, image_path, image, mask_path, truth, problem)


def _load_patient(scan: PatientScan, pool: ThreadPoolExecutor, problems: list[InputProblem]):
    """Readable slices of one patient, all of one size; the rest become problems."""
    loaded = [pool.submit(_read_slice, entry) for entry in scan.slices]
    slices = []
    for future, entry in zip(loaded, scan.slices, strict=True):
        try:
            slices.append(future.result())
        except SliceReadError as exc:
            problems.append(InputProblem(str(entry[1]), scan.patient_id, exc.reason))
    for s in slices:
        if s.problem:
            problems.append(InputProblem(str(s.mask_path), scan.patient_id,
                                         s.problem.split(": ", 1)[-1] + " (no ground truth used)"))
    if slices:
        shape = Counter(s.image.shape for s in slices).most_common(1)[0][0]
        for s in [s for s in slices if s.image.shape != shape]:
            problems.append(InputProblem(str(s.image_path), scan.patient_id,
                                         f"size {s.image.shape[1]}x{s.image.shape[0]} differs "
                                         f"from the patient's other slices "
                                         f"({shape[1]}x{shape[0]})"))
        slices = [s for s in slices if s.image.shape == shape]
    return slices


def _write_patient(out: Path, scan: PatientScan, slices, probabilities, masks, threshold,
                   pool: ThreadPoolExecutor, spacing: tuple[float, float, float] | None):
    folder = out / scan.patient_id
    list(pool.map(lambda pair: write_mask_png(
        folder / f"{pair[0].image_path.stem}_mask.png", pair[1]), zip(slices, masks, strict=True)))
    truths = [s.truth for s in slices]
    has_truth = all(t is not None for t in truths)
    write_mask_volume(folder / "mask.nii.gz", masks)
    write_overview(folder / "overview.png", [s.image for s in slices], masks,
                   truths if has_truth else None, [s.number for s in slices])
    # classifier_*: what the stage-1 gate said; tumor_detected: whether the final mask (after
    # the U-Net and post-processing) is non-empty, which is the answer.
    slice_rows = [{"patient_id": scan.patient_id, "slice": s.number,
                   "image": s.image_path.relative_to(scan.folder.parent).as_posix(),
                   "classifier_probability": round(float(p), 6),
                   "classifier_positive": int(p >= threshold),
                   "tumor_detected": int(m.any()), "mask_pixels": int(m.sum())}
                  for s, p, m in zip(slices, probabilities, masks, strict=True)]
    pixels = int(sum(r["mask_pixels"] for r in slice_rows))
    patient = {"patient_id": scan.patient_id, "n_slices": len(slices),
               "n_tumor_slices": int(sum(r["tumor_detected"] for r in slice_rows)),
               "tumor_pixels": pixels,
               "tumor_volume_ml": tumour_volume_ml(pixels, spacing)}
    patient["tumor_detected"] = int(patient["n_tumor_slices"] > 0)
    if has_truth:
        patient["dice"] = dice_score(np.stack(truths), np.stack(masks))
        patient["iou"] = iou_score(np.stack(truths), np.stack(masks))
    write_viewer(folder / "viewer.html", patient, [s.image for s in slices], masks,
                 truths if has_truth else None, [s.number for s in slices], probabilities,
                 threshold, spacing)
    return patient, slice_rows


def tumour_volume_ml(pixels: int, spacing: tuple[float, float, float] | None) -> float:
    """Tumour volume in millilitres from a voxel count and the voxel size (x, y, z) in mm;
    NaN (an empty cell in the tables) when the spacing is unknown."""
    if spacing is None:
        return float("nan")
    return pixels * float(np.prod(spacing)) / 1000.0


def _check_out_dir(scan_dirs: list[Path], out: Path) -> None:
    resolved = out.resolve()
    for scan_dir in scan_dirs:
        base = scan_dir.resolve()
        if resolved == base or base in resolved.parents:
            raise UsageError(f"--out {out} is inside the input folder {scan_dir}; "
                             "inputs are never written to, choose another --out")


def run_inference(scan_dirs: list[Path], out: Path, predictor, progress: bool = True,
                  report=print, spacing: tuple[float, float, float] | None = None
                  ) -> InferenceResult:
    """Run both stages over every patient found in ``scan_dirs`` and write the outputs.
    ``spacing`` is the voxel size (x, y, z) in mm, when known, for tumour volumes."""
    _check_out_dir(scan_dirs, out)
    patients, problems = scan_inputs(scan_dirs)
    for problem in problems:
        print(problem.line(), file=sys.stderr)
    seen: set[str] = set()
    patient_rows, slice_rows, first = [], [], None
    threshold = predictor.classifier_config.threshold
    with ThreadPoolExecutor(max_workers=4) as pool:
        for scan in tqdm(patients, desc="patients", unit="patient", disable=not progress):
            if scan.patient_id in seen:
                problems.append(InputProblem(str(scan.folder), scan.patient_id,
                                             "duplicate patient id"))
                print(problems[-1].line(), file=sys.stderr)
                continue
            seen.add(scan.patient_id)
            before = len(problems)
            slices = _load_patient(scan, pool, problems)
            for problem in problems[before:]:
                print(problem.line(), file=sys.stderr)
            if not slices:
                continue
            probabilities, masks = predictor.predict([s.image for s in slices])
            patient, rows = _write_patient(out, scan, slices, probabilities, masks, threshold,
                                           pool, spacing)
            patient_rows.append(patient)
            slice_rows.extend(rows)
            first = first if first is not None else time.time()
    result = InferenceResult(
        pd.DataFrame(patient_rows, columns=PATIENT_COLUMNS + (
            ["dice", "iou"] if any("dice" in p for p in patient_rows) else [])),
        pd.DataFrame(slice_rows, columns=SLICE_COLUMNS), problems, first)
    _write_tables(out, result)
    for row in result.patients.itertuples(index=False):
        truth = f", dice {row.dice:.3f}" if "dice" in result.patients and not np.isnan(row.dice) \
            else ""
        report(f"{row.patient_id}: {'TUMOUR' if row.tumor_detected else 'no tumour'} "
               f"({row.n_tumor_slices}/{row.n_slices} slices, {row.tumor_pixels} px{truth})")
    return result


def _write_tables(out: Path, result: InferenceResult) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "slices.csv", result.slices.to_csv(index=False, lineterminator="\n"))
    write_text_atomic(out / "patients.csv", result.patients.to_csv(
        index=False, lineterminator="\n", float_format="%.4f", na_rep=""))
    errors = pd.DataFrame([p.__dict__ for p in result.problems], columns=ERROR_COLUMNS)
    write_text_atomic(out / "errors.csv", errors.to_csv(index=False, lineterminator="\n"))
    write_html_report(out / "report.html", result.patients, errors)
