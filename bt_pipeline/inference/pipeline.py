"""Both stages over a user's scan folders, and every output file of ``bt infer``."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import platform
import signal
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from bt_pipeline.atomic import write_text_atomic
from bt_pipeline.data.layout import (
    ROLES,
    InputProblem,
    PatientScan,
    VolumeScan,
    printable,
    scan_inputs,
)
from bt_pipeline.data.preprocess import SliceReadError, read_image, read_mask, replaced_sequences
from bt_pipeline.evaluation.metrics import dice_score, iou_score
from bt_pipeline.inference.domain import domain_notes, is_skull_stripped
from bt_pipeline.inference.output_folder import (
    OutputFolder,
    check_no_overlap,
    name_problem,
    output_file_name,
    signals_held,
)
from bt_pipeline.inference.outputs import (
    write_html_report,
    write_image_volume,
    write_mask_png,
    write_mask_volume,
    write_on_input_grid,
    write_overview,
    write_probability_volume,
    write_viewer,
)
from bt_pipeline.inference.quality import QUALITY_FILE

#: The output tables' columns (README "Reading the outputs" defines each).
SLICE_COLUMNS = ["patient_id", "slice", "image", "classifier_probability", "classifier_positive",
                 "tumor_detected", "mask_pixels"]
PATIENT_COLUMNS = ["patient_id", "sequences", "n_slices", "n_tumor_slices", "tumor_detected",
                   "tumor_pixels", "tumor_volume_ml", "predicted_dice", "review", "notes"]
TRUTH_COLUMNS = ["dice", "iou", "dice_note"]
#: The dice_note of a patient the U-Net learnt from: its score is not a held-out one.
TRAINED_ON_NOTE = "not held out: the U-Net trained on this patient"
ERROR_COLUMNS = ["path", "patient_id", "problem", "skipped"]


@dataclass
class InferenceResult:
    patients: pd.DataFrame
    slices: pd.DataFrame
    problems: list[InputProblem]
    first_patient_unix: float | None  # wall clock when the first patient's outputs were written
    interrupted: bool = False
    resumed: list[str] = dataclasses.field(default_factory=list)  # cases kept from a resume

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
            problem = exc.reason
        else:
            if truth.shape != image.shape[:2]:
                problem = (f"mask size {truth.shape[1]}x{truth.shape[0]} differs from its "
                           f"slice's {image.shape[1]}x{image.shape[0]}")
                truth = None
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
                                         f"{s.problem} (slice segmented; no ground truth used)"))
    if slices:
        shape = Counter(s.image.shape for s in slices).most_common(1)[0][0]
        for s in [s for s in slices if s.image.shape != shape]:
            problems.append(InputProblem(str(s.image_path), scan.patient_id,
                                         f"size {s.image.shape[1]}x{s.image.shape[0]} differs "
                                         f"from the patient's other slices "
                                         f"({shape[1]}x{shape[0]})"))
        slices = [s for s in slices if s.image.shape == shape]
    return slices


def _load_case(scan: VolumeScan, problems: list[InputProblem], series_roles):
    """A volume case's slices on the model grid, and the case (None when it cannot be read)."""
    from bt_pipeline.data.volumes import VolumeReadError, read_case

    try:
        case = read_case(scan, series_roles)
    except VolumeReadError as exc:
        problems.append(InputProblem(exc.path, scan.patient_id, exc.reason))
        return [], None
    source = Path(case.sources["flair"])
    return [LoadedSlice(k + 1, source, image, None, None, None)
            for k, image in enumerate(case.images)], case


def _write_patient(out: Path, scan: PatientScan | VolumeScan, slices, probabilities, masks,
                   threshold, pool: ThreadPoolExecutor,
                   spacing: tuple[float, float, float] | None, case=None,
                   learnt_from: bool = False, maps=None, notes=(), quality=None,
                   sequences: str = "", label_values: tuple[int, ...] | None = None,
                   outputs: str = "all"):
    folder = out / scan.patient_id
    everything = outputs == "all"
    images, numbers = [s.image for s in slices], [s.number for s in slices]
    truths = [s.truth for s in slices]
    has_truth = all(t is not None for t in truths)
    truth_files = sum(s.mask_path is not None for s in slices)
    if case is None:  # slices in, slices (and the stack as NIfTI) out
        if everything:
            list(pool.map(lambda pair: write_mask_png(
                folder / output_file_name(printable(pair[0].image_path.stem), "_mask.png"),
                pair[1]),
                zip(slices, masks, strict=True)))
            write_image_volume(folder / "image.nii.gz", images, spacing)
        write_mask_volume(folder / "mask.nii.gz", masks, spacing)
        if maps is not None:
            write_probability_volume(folder / "probability.nii.gz", maps, spacing)
        pixels = int(sum(int(m.sum()) for m in masks))
    else:  # a volume in: the mask goes back onto its grid, the spacing is its header's
        mask = write_on_input_grid(folder, masks, case, maps, with_image=everything)
        pixels, spacing = int(sitk_array(mask).sum()), case.spacing
    if everything:
        write_overview(folder / "overview.png", images, masks, truths if has_truth else None,
                       numbers)
    # classifier_*: what the stage-1 gate said; tumor_detected: whether the final mask (after
    # the U-Net and post-processing) is non-empty, which is the answer.
    slice_rows = [{"patient_id": scan.patient_id, "slice": s.number,
                   "image": printable(s.image_path.relative_to(scan.folder.parent).as_posix()),
                   "classifier_probability": round(float(p), 6),
                   "classifier_positive": int(p >= threshold),
                   "tumor_detected": int(m.any()), "mask_pixels": int(m.sum())}
                  for s, p, m in zip(slices, probabilities, masks, strict=True)]
    patient = {"patient_id": scan.patient_id, "sequences": sequences, "n_slices": len(slices),
               "n_tumor_slices": int(sum(r["tumor_detected"] for r in slice_rows)),
               "tumor_pixels": pixels,
               # one rounding for the table, the terminal line and the viewer
               "tumor_volume_ml": round(tumour_volume_ml(pixels, spacing), 2)}
    patient["tumor_detected"] = int(patient["n_tumor_slices"] > 0)
    patient["predicted_dice"], patient["review"] = quality if quality is not None else (
        float("nan"), float("nan"))
    patient["notes"] = " | ".join(notes)
    if case is not None and getattr(scan, "label", None) is not None:
        patient.update(_label_scores(scan.label, mask, label_values))
    elif has_truth:
        patient["dice"] = dice_score(np.stack(truths), np.stack(masks))
        patient["iou"] = iou_score(np.stack(truths), np.stack(masks))
        patient["dice_note"] = TRAINED_ON_NOTE if learnt_from else ""
    elif truth_files:  # some ground truth given, not usable for every slice: say so
        usable = sum(t is not None for t in truths)
        patient.update(dice=float("nan"), iou=float("nan"),
                       dice_note=f"unavailable: ground truth usable for {usable} of "
                                 f"{len(slices)} slices (see errors.csv)")
    if everything:
        write_viewer(folder / "viewer.html", patient, images, masks,
                     truths if has_truth else None, numbers, probabilities, threshold,
                     spacing if case is None else case.grid.GetSpacing(),
                     "--spacing" if case is None else "the volume's header, on the model's grid")
    return patient, slice_rows


def sitk_array(image) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayViewFromImage(image)


def _label_scores(label: Path, mask, values: tuple[int, ...] | None) -> dict:
    """Dice and IoU of a volume case's mask against its label file, in 3D on the FLAIR's grid
    (whole tumour: label > 0, or one of ``values``)."""
    from bt_pipeline.data.volumes import VolumeReadError, tumour_label

    try:
        truth, resampled = tumour_label(label, mask, values)
    except VolumeReadError as exc:
        return {"dice": float("nan"), "iou": float("nan"),
                "dice_note": f"unavailable: label {exc.reason}"}
    predicted = sitk_array(mask) > 0
    kind = "label > 0" if values is None else f"label in {','.join(map(str, values))}"
    return {"dice": dice_score(truth, predicted), "iou": iou_score(truth, predicted),
            "dice_note": f"3D against {printable(label.name)} ({kind})" +
                         ("; label resampled onto the FLAIR's grid (nearest neighbour)"
                          if resampled else "")}


def _sequences(images: list[np.ndarray]) -> str:
    """The sequences a patient's slices hold, ``pre+flair+post`` or fewer."""
    return "+".join(r for r in ROLES if r not in replaced_sequences(images))


def tumour_volume_ml(pixels: int, spacing: tuple[float, float, float] | None) -> float:
    """Tumour volume in millilitres from a voxel count and the voxel size (x, y, z) in mm;
    NaN (an empty cell in the tables) when the spacing is unknown."""
    if spacing is None:
        return float("nan")
    return pixels * float(np.prod(spacing)) / 1000.0


@dataclass
class FoundInputs:
    """What a run will read, found and checked before any model loads."""

    patients: list[PatientScan | VolumeScan]
    problems: list[InputProblem]


def find_inputs(scan_dirs: list[Path], out: Path,
                channels: dict[str, str | None] | None = None,
                labels: Path | None = None) -> FoundInputs:
    """The cases in ``scan_dirs`` (and the inputs that cannot be used), with OUT checked: not
    overlapping any of them, and replaceable. ``channels`` (code -> role) names numbered
    NIfTI channels instead of a ``dataset.json``; ``labels``, a folder of ground-truth
    volumes named by case (``CASE.nii.gz`` or ``CASE_seg.nii.gz``).

    Raises:
        UsageError: OUT cannot be used.
    """
    folder = OutputFolder(out)
    patients, problems = scan_inputs(scan_dirs, channels)
    check_no_overlap(folder.out, [*scan_dirs, *(path for scan in patients for path in (
        [scan.folder] if isinstance(scan, PatientScan) else
        [*scan.nifti.values(), *scan.dicom_series]))])
    folder.check()
    for scan in (p for p in patients if isinstance(p, VolumeScan) and labels is not None):
        scan.label = next((labels / f"{scan.patient_id}{end}" for end in (
            ".nii.gz", ".nii", "_seg.nii.gz", "_seg.nii")
            if (labels / f"{scan.patient_id}{end}").is_file()), scan.label)
    return FoundInputs(patients, problems)


def run_inference(scan_dirs: list[Path], out: Path, predictor, progress: bool = True,
                  report=print, spacing: tuple[float, float, float] | None = None,
                  options: dict | None = None,
                  series_roles: dict[str, str] | None = None,
                  save_probabilities: bool = False,
                  found: FoundInputs | None = None,
                  label_values: tuple[int, ...] | None = None, resume: bool = False,
                  runner=None, outputs: str = "all") -> InferenceResult:
    """Run both stages over every patient found in ``scan_dirs`` and write the outputs into
    ``out`` as one run (see :mod:`output_folder`). ``spacing`` is the voxel size (x, y, z) in
    mm of slice folders, when known, for tumour volumes (volumes carry their own);
    ``series_roles`` picks DICOM series by description (:func:`volumes.read_case`);
    ``save_probabilities`` adds each patient's ``probability.nii.gz``; ``options`` are recorded
    in ``run.json``; ``found``: :func:`find_inputs`' answer when already known;
    ``label_values``: the label values that are tumour in volume cases' ground truth (default:
    every value > 0); ``resume``: keep the cases an interrupted run into the same OUT
    finished; ``runner``: what runs the cases instead of this process (``cluster.run_on_ray``
    with its spec bound), called as :func:`_run_patients` is, less the predictor;
    ``outputs``: "all", or "masks" (each case's mask and the tables only)."""
    folder = OutputFolder(out, resume=resume)
    found = find_inputs(scan_dirs, out) if found is None else found
    patients, problems = found.patients, found.problems
    for problem in problems:
        print(problem.line(), file=sys.stderr)
    if predictor.quality is None:
        print(f"note: no quality estimate ships with this U-Net ({QUALITY_FILE} beside it): "
              "predicted_dice and review stay empty", file=sys.stderr)
    started = time.time()
    case_options = CaseOptions(spacing, series_roles, save_probabilities, label_values, outputs)
    with folder, _sigterm_as_interrupt():
        resumed = read_case_records(folder.staging) if resume else {}
        if runner is None:
            result = _run_patients(patients, problems, folder.staging, predictor, progress,
                                   case_options, resumed)
        else:
            result = runner(patients, problems, folder.staging, case_options, resumed, progress)
        result.resumed = sorted(resumed)
        if result.patients.empty:  # nothing processed: an earlier OUT stays as it was
            if result.interrupted:
                raise KeyboardInterrupt
            return result
        # every patient is finished: a signal now waits until they are committed
        with signals_held():
            manifest = _manifest(scan_dirs, predictor, options, result, started)
            _write_tables(folder.staging, result, manifest)
            folder.commit(manifest)
    if result.interrupted:
        raise KeyboardInterrupt
    for row in result.patients.itertuples(index=False):
        truth = f", dice {row.dice:.3f}" if "dice" in result.patients and not np.isnan(row.dice) \
            else ""
        if truth and row.dice_note == TRAINED_ON_NOTE:
            truth += f" ({TRAINED_ON_NOTE})"
        volume = "" if np.isnan(row.tumor_volume_ml) else f", {row.tumor_volume_ml:.2f} mL"
        check = f"; check: predicted Dice {row.predicted_dice:.2f}" if row.review == 1 else ""
        report(f"{row.patient_id}: {'TUMOUR' if row.tumor_detected else 'no tumour'} "
               f"({row.n_tumor_slices}/{row.n_slices} slices, {row.tumor_pixels} px{volume}"
               f"{truth}){check}")
    return result


#: Why a blank case is skipped: with every voxel alike there is nothing to examine, and "no
#: tumour" would be an answer about nothing.
BLANK = "blank: every voxel has the same value (empty, constant or unreadable values)"


def is_blank(images: list[np.ndarray]) -> bool:
    """Whether one case's slices (uint8) hold a single value throughout."""
    first = images[0].flat[0]
    return all(not np.any(image != first) for image in images)


def _sequence_note(patient: dict, predictor) -> str:
    """What a patient with sequences replaced by FLAIR gets, and how far to trust it."""
    model = ("the U-Net trained with sequences replaced by FLAIR at random"
             if predictor.missing_sequence_training else
             "this U-Net did not train with missing sequences: expect lower accuracy (README, "
             "FLAIR-only input)")
    return (f"note: {patient['patient_id']}: sequences {patient['sequences']}; the missing "
            f"ones are filled with FLAIR, as the dataset does; {model}")


@dataclass(frozen=True)
class CaseOptions:
    """What every case of one run is read and written with."""

    spacing: tuple[float, float, float] | None = None
    series_roles: dict[str, str] | None = None
    save_probabilities: bool = False
    label_values: tuple[int, ...] | None = None
    #: "all", or "masks": each case's mask (and probabilities when asked) and the tables
    #: only, no slice PNGs, image copy, overview or viewer (a cohort's run)
    outputs: str = "all"


@dataclass
class PredictedCase:
    """One case read, checked and through both stages, ready to be written."""

    scan: PatientScan | VolumeScan
    slices: list[LoadedSlice]
    case: object  # CaseVolume of a volume case, None for slices
    probabilities: np.ndarray
    masks: list[np.ndarray]
    maps: list[np.ndarray] | None
    notes: list[str]
    quality: tuple[float, int] | None
    sequences: str


def predict_case(scan: PatientScan | VolumeScan, predictor, pool: ThreadPoolExecutor,
                 problems: list[InputProblem], options: CaseOptions) -> PredictedCase | None:
    """Read one case, check it, run both stages and the quality estimate; None (and the
    reason in ``problems``) when nothing of it can be segmented."""
    if isinstance(scan, VolumeScan):
        slices, case = _load_case(scan, problems, options.series_roles)
    else:
        slices, case = _load_patient(scan, pool, problems), None
    if not slices:
        return None
    images = [s.image for s in slices]
    if is_blank(images):
        named = slices[0].image_path if case is None else case.sources["flair"]
        problems.append(InputProblem(str(named), scan.patient_id, BLANK))
        return None
    stripped = is_skull_stripped(images)
    notes = [*(case.notes if case is not None else []),
             *domain_notes(images, predictor, stripped)]
    if options.save_probabilities or predictor.quality is not None:
        probabilities, masks, maps = predictor.predict(images, with_maps=True)
    else:
        (probabilities, masks), maps = predictor.predict(images), None
    sequences = case.sequences if case is not None else _sequences(images)
    threshold = predictor.classifier_config.threshold
    quality = None if predictor.quality is None else predictor.assess(
        images, probabilities, [m if p >= threshold else None
                                for m, p in zip(maps, probabilities, strict=True)],
        masks, stripped, flair_only=sequences == "flair")
    return PredictedCase(scan, slices, case, probabilities, masks,
                         maps if options.save_probabilities else None, notes, quality, sequences)


#: Written last into each finished case's folder: the case's rows and problems, so that a
#: run resumed into the same OUT (``--resume``) keeps the case instead of segmenting it again.
CASE_RECORD = ".bt-case.json"


def write_case(out: Path, predicted: PredictedCase, predictor, pool: ThreadPoolExecutor,
               options: CaseOptions, problems: list[InputProblem]) -> tuple[dict, list[dict]]:
    """Write one predicted case's outputs under ``out``, its record last; ``problems``: the
    case's own. Returns its patient row and slice rows."""
    scan = predicted.scan
    patient, rows = _write_patient(
        out, scan, predicted.slices, predicted.probabilities, predicted.masks,
        predictor.classifier_config.threshold, pool, options.spacing, predicted.case,
        learnt_from=scan.patient_id in predictor.trained_on_patients, maps=predicted.maps,
        notes=predicted.notes, quality=predicted.quality, sequences=predicted.sequences,
        label_values=options.label_values, outputs=options.outputs)
    write_text_atomic(out / scan.patient_id / CASE_RECORD, json.dumps(
        {"patient": patient, "slices": rows, "problems": [p.__dict__ for p in problems]}) + "\n")
    return patient, rows


class CaseRecord(NamedTuple):
    """A finished case as its ``CASE_RECORD`` keeps it."""

    patient: dict
    slices: list[dict]
    problems: list[InputProblem]


def read_case_records(folder: Path) -> dict[str, CaseRecord]:
    """Case id -> record of every finished case under ``folder`` (an earlier run's)."""
    records = {}
    for path in sorted(folder.glob(f"*/{CASE_RECORD}")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # cut short by a kill: the case runs again
            continue
        records[record["patient"]["patient_id"]] = CaseRecord(
            record["patient"], record["slices"],
            [InputProblem(**p) for p in record["problems"]])
    return records


def case_admitted(scan: PatientScan | VolumeScan, seen: set[str],
                  problems: list[InputProblem]) -> bool:
    """Whether ``scan`` may be processed: a new case id that can name its output folder."""
    if scan.patient_id in seen:
        problems.append(InputProblem(str(scan.folder), scan.patient_id, "duplicate patient id"))
        return False
    seen.add(scan.patient_id)
    unusable = name_problem(scan.patient_id)
    if unusable:
        named = scan.nifti.get("flair", scan.folder) if isinstance(scan, VolumeScan) \
            else scan.folder
        problems.append(InputProblem(str(named), scan.patient_id,
                                     f"case not processed: {unusable}; rename it"))
        return False
    return True


def _run_patients(patients: list[PatientScan | VolumeScan], problems: list[InputProblem],
                  out: Path, predictor, progress: bool, options: CaseOptions,
                  resumed: dict[str, CaseRecord] | None = None) -> InferenceResult:
    """Both stages over each patient, outputs into ``out``; stops early (``interrupted``) on
    Ctrl-C or SIGTERM, keeping what was finished. ``resumed``: cases an earlier run into the
    same OUT finished (their outputs already in ``out``), kept as they are.

    One patient's outputs are written on a thread of their own while the next patient is read
    and predicted: the model leaves a core idle between its graph calls, and PNG, zlib and
    OpenCV release the GIL, so the writing mostly hides behind the prediction. At most one
    patient waits to be written, so memory stays that of two patients."""
    seen: set[str] = set()
    resumed = resumed or {}
    patient_rows, slice_rows, first, interrupted = [], [], None, False
    pending = None  # the previous patient's write

    def write(*args):
        return (*write_case(*args), time.time())

    def finish_pending() -> None:
        nonlocal pending, first
        if pending is None:
            return
        patient, rows, written = pending.result()
        pending = None
        if patient["sequences"] != "pre+flair+post":
            print(_sequence_note(patient, predictor), file=sys.stderr)
        patient_rows.append(patient)
        slice_rows.extend(rows)
        first = first if first is not None else written

    with ThreadPoolExecutor(max_workers=4) as pool, \
            ThreadPoolExecutor(max_workers=1) as writer:
        try:
            for scan in tqdm(patients, desc="patients", unit="patient", disable=not progress):
                before = len(problems)
                if not case_admitted(scan, seen, problems):
                    print(problems[-1].line(), file=sys.stderr)
                    continue
                if scan.patient_id in resumed:
                    record = resumed[scan.patient_id]
                    problems.extend(record.problems)
                    patient_rows.append(record.patient)
                    slice_rows.extend(record.slices)
                    continue
                predicted = predict_case(scan, predictor, pool, problems, options)
                for problem in problems[before:]:
                    print(problem.line(), file=sys.stderr)
                if predicted is None:
                    continue
                for note in predicted.notes:  # above the progress bar, not through it
                    tqdm.write(f"note: {printable(scan.patient_id)}: {note}", file=sys.stderr)
                finish_pending()
                pending = writer.submit(write, out, predicted, predictor, pool, options,
                                        problems[before:])
            finish_pending()
        except KeyboardInterrupt:
            interrupted = True
            # the write under way runs to its end on its thread; keep what it finished
            with contextlib.suppress(KeyboardInterrupt):
                finish_pending()
    return inference_result(patient_rows, slice_rows, problems, first, interrupted)


def inference_result(patient_rows, slice_rows, problems, first, interrupted) -> InferenceResult:
    # one column set whether or not truth was given: empty cells where it was not
    return InferenceResult(
        pd.DataFrame(patient_rows, columns=PATIENT_COLUMNS + TRUTH_COLUMNS),
        pd.DataFrame(slice_rows, columns=SLICE_COLUMNS), problems, first, interrupted)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM stops the run like Ctrl-C: finished patients are kept and marked interrupted."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _manifest(scan_dirs: list[Path], predictor, options: dict | None, result: InferenceResult,
              started: float) -> dict:
    """``run.json``: what this run read, with which models and options, and how it ended.
    ``predictor`` a loaded predictor or, for a run on Ray, ``model_options.ModelFacts``."""
    from importlib.metadata import version

    import SimpleITK as sitk

    from bt_pipeline import __version__

    finished = time.time()
    quality = predictor.quality
    return {
        "status": "interrupted" if result.interrupted else "complete",
        "started": _iso(started), "finished": _iso(finished),
        "duration_s": round(finished - started, 2),
        "inputs": [printable(p.absolute()) for p in scan_dirs],
        "models": {"files": {printable(path.absolute()): _sha256(path)
                             for path in predictor.files},
                   "precision": "bfloat16" if predictor.bfloat16 else "float32",
                   "stage1_threshold": predictor.classifier_config.threshold,
                   "mask_threshold": predictor.mask_threshold,
                   "tta_flips": predictor.tta_flips,
                   "quality_estimate": None if quality is None else {
                       "review_threshold": quality.review_threshold,
                       "fitted_on": quality.fitted_on},
                   "classifier_config": dataclasses.asdict(predictor.classifier_config),
                   "unet_config": dataclasses.asdict(predictor.unet_config),
                   "extra_unets": len(predictor.extra_unets)},
        "options": options or {},
        "versions": {"bt_pipeline": __version__, "tensorflow": version("tensorflow"),
                     "keras": version("keras"), "python": platform.python_version(),
                     "numpy": np.__version__, "simpleitk": sitk.Version_VersionString(),
                     "pandas": pd.__version__},
        "patients": len(result.patients), "slices": len(result.slices),
        "resumed_patients": result.resumed,
        "inputs_skipped": sum(p.skipped for p in result.problems),
    }


def _iso(unix: float) -> str:
    """ISO 8601 in UTC, to the second."""
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="seconds")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_tables(out: Path, result: InferenceResult, manifest: dict | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "slices.csv", result.slices.to_csv(index=False, lineterminator="\n"))
    write_text_atomic(out / "patients.csv", result.patients.to_csv(
        index=False, lineterminator="\n", float_format="%.4f", na_rep=""))
    errors = pd.DataFrame([p.__dict__ for p in result.problems], columns=ERROR_COLUMNS)
    errors["skipped"] = errors["skipped"].astype(int)  # 1/0, as README defines it
    write_text_atomic(out / "errors.csv", errors.to_csv(index=False, lineterminator="\n"))
    write_html_report(out / "report.html", result.patients, errors, run=manifest,
                      pictures=(manifest or {}).get("options", {}).get("outputs", "all") == "all")
