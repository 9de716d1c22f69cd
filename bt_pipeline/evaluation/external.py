"""``bt external DIR`` (``make external EXTERNAL_DIR=DIR``): the models on labelled BraTS-style
cases from outside the training collection, scored in 3D.

A case is a folder holding ``CASE_flair.nii.gz``, ``CASE_seg.nii.gz`` and any of ``CASE_t1``,
``CASE_t1ce`` (``t1c``, ``t1gd``), named as BraTS names them. Each case is segmented exactly as
``infer`` segments a volume case (:func:`~bt_pipeline.inference.segment.segment`), once with
every sequence it has and once with FLAIR alone, and scored against whole tumour (``_seg`` > 0,
every label) on the FLAIR's grid:

    reports/external/<name>/<label>/cases.csv    per case and input: Dice, volumes in mL, notes
    reports/external/<name>/<label>/summary.md   mean and median Dice per input

(``<name>`` the cases folder's name, ``<label>`` "shipped" or the name given to other models.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from bt_pipeline.atomic import write_text_atomic
from bt_pipeline.data.formats import is_volume_file, volume_stem
from bt_pipeline.data.layout import volume_role
from bt_pipeline.data.volumes import tumour_label
from bt_pipeline.evaluation.metrics import dice_score
from bt_pipeline.inference.model_options import add_model_arguments, load_predictor
from bt_pipeline.reports import shown_path, write_summary
from bt_pipeline.runtime import UsageError, library_output_silenced

#: The inputs each case is segmented with.
INPUTS = ("all sequences", "FLAIR alone")


def labelled_cases(folder: Path) -> dict[str, dict[str, Path]]:
    """case -> {"flair", "pre", "post", "seg"} files of every BraTS-named case folder at or
    under ``folder`` (one level); cases without FLAIR or ``_seg`` are left out."""
    cases = {}
    for case_dir in sorted([folder, *[p for p in folder.iterdir() if p.is_dir()]]):
        files = {}
        for path in sorted(case_dir.iterdir()):
            if not path.is_file() or not is_volume_file(path):
                continue
            stem = volume_stem(path)
            if stem.lower().endswith("_seg"):
                files["seg"] = path
                continue
            found = volume_role(path)
            if found and found[1]:
                files[found[1]] = path
        if "flair" in files and "seg" in files:
            cases[case_dir.name] = files
    return cases


def score_case(case: str, files: dict[str, Path], predictor) -> list[dict]:
    """Rows of one case: every sequence it has, then FLAIR alone."""
    import SimpleITK as sitk

    from bt_pipeline.inference.segment import segment

    rows = []
    for label in INPUTS:
        given = files if label == INPUTS[0] else {"flair": files["flair"]}
        result = segment(given["flair"], given.get("pre"), given.get("post"),
                         predictor=predictor)
        predicted = sitk.GetArrayViewFromImage(result.mask) > 0
        truth, _ = tumour_label(files["seg"], result.mask)
        voxel_ml = float(np.prod(result.mask.GetSpacing())) / 1000.0
        rows.append({"case": case, "input": label, "sequences": result.sequences,
                     "dice": dice_score(truth, predicted),
                     "truth_ml": round(float(truth.sum()) * voxel_ml, 2),
                     "predicted_ml": round(float(predicted.sum()) * voxel_ml, 2),
                     "predicted_dice": result.predicted_dice, "review": result.review,
                     "notes": " | ".join(result.notes)})
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cases", type=Path, help="a folder of BraTS-named case folders")
    parser.add_argument("--name", default=None,
                        help="the report's folder name (default: the cases folder's name)")
    parser.add_argument("--label", default="shipped",
                        help="the models' folder inside the report (default: shipped); name "
                             "other models to compare them")
    parser.add_argument("--out", type=Path, default=Path("reports/external"))
    add_model_arguments(parser, precision="auto")


def run(args: argparse.Namespace) -> int:
    if not args.cases.is_dir():
        raise UsageError(f"cases folder not found: {args.cases}")
    cases = labelled_cases(args.cases)
    if not cases:
        raise UsageError(f"{args.cases}: no case folder with CASE_flair and CASE_seg NIfTI files")
    predictor = load_predictor(args)
    rows = []
    with library_output_silenced(keep=args.debug):
        for case, files in tqdm(cases.items(), desc="external cases", unit="case"):
            rows += score_case(case, files, predictor)
    table = pd.DataFrame(rows)
    out = args.out / (args.name or args.cases.resolve().name) / args.label
    write_text_atomic(out / "cases.csv",
                      table.to_csv(index=False, lineterminator="\n", float_format="%.4f"))
    summary = (table.groupby("input", sort=False)["dice"]
               .agg(cases="count", mean_dice="mean", median_dice="median", min_dice="min")
               .reset_index())
    write_summary(out / "summary.md", f"External cases: {out.parent.name}, {args.label}", [
        f"Whole-tumour Dice (label > 0) per case in 3D on the FLAIR's grid, {len(cases)} cases; "
        f"U-Net {shown_path(args.unet)}, stage 1 {shown_path(args.classifier)}. "
        "No model trained on these cases.",
        f"Written by `bt external <cases> --label {args.label}` (docs/external.md)."],
        {"summary": summary, "cases": table})
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"wrote {out}/cases.csv, summary.md")
    return 0
