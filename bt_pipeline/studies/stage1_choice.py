"""Which stage 1 ships (``bt stage1-choice``, ``make stage1-choice``): the cross-validation's
encoder gates against another stage-1 model (the from-scratch slice CNN) and against no gate,
each scored as the whole pipeline on development patients that neither stage saw.

Every patient is segmented by the fold U-Net that never trained on them. The fold's own
encoder gate never saw them either, so it is scored on all held-out patients. The other model
trained on the manifest's train split, so it is scored only on the val patients, the
development patients it did not train on (its threshold was chosen on them, which favours it).
Test patients are not read.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from bt_pipeline.atomic import write_text_atomic
from bt_pipeline.config import SHIPPED_UNET, DataConfig, UNetConfig, load_json
from bt_pipeline.data.manifest import N_FOLDS, read_manifest
from bt_pipeline.data.preprocess import read_image
from bt_pipeline.evaluation.cv_report import (
    baseline_classifier,
    fold_predictions,
    report_dir,
    standard_error,
)
from bt_pipeline.evaluation.metrics import dice_score
from bt_pipeline.evaluation.scoring import PatientPrediction, gated_volume
from bt_pipeline.inference.predictor import TwoStagePredictor
from bt_pipeline.reports import shown_path, write_summary
from bt_pipeline.runtime import quiet_tensorflow
from bt_pipeline.training.cross_validation import SHIPPED_RECIPE, fold_gate

#: The gates compared, in report order.
GATES = ("no_gate", "encoder_gate", "other")


def gated_dice(predictor, prediction: PatientPrediction, passed: np.ndarray,
               probabilities: np.ndarray | None = None) -> float:
    """Whole-volume Dice of one patient's pipeline masks when stage 1 passes ``passed``, with
    ``probabilities`` its P(tumour) per slice (None: no stage 1)."""
    masks = gated_volume(predictor, prediction.maps, passed, prediction.truths,
                         gate_probabilities=probabilities)
    return dice_score(np.stack(prediction.truths), np.stack(masks))


def patient_rows(predictor, other, prediction: PatientPrediction, fold: int, in_val: bool,
                 data_root: Path) -> dict:
    """Pipeline Dice of one held-out patient under each gate (``other`` on val patients only),
    and each gate's slice sensitivity and specificity."""
    truth = np.array([t.any() for t in prediction.truths])
    probabilities = {"no_gate": None, "encoder_gate": prediction.probabilities}
    passed = {"no_gate": np.ones(len(truth), bool),
              "encoder_gate": prediction.probabilities >= predictor.classifier_config.threshold}
    if in_val:
        images = [read_image(data_root / p) for p in prediction.rows["image"]]
        probabilities["other"] = other.tumour_probabilities(images)
        passed["other"] = probabilities["other"] >= other.classifier_config.threshold
    row = {"patient_id": prediction.rows["patient_id"].iloc[0], "fold": fold,
           "val_patient": int(in_val)}
    for gate in GATES:
        chosen = passed.get(gate)
        row[f"dice_{gate}"] = gated_dice(predictor, prediction, chosen, probabilities.get(gate)) \
            if chosen is not None else float("nan")
        row[f"sensitivity_{gate}"] = float(chosen[truth].mean()) \
            if chosen is not None and truth.any() else float("nan")
        row[f"specificity_{gate}"] = float((~chosen[~truth]).mean()) \
            if chosen is not None and (~truth).any() else float("nan")
    return row


def compare(patients: pd.DataFrame) -> pd.DataFrame:
    """Mean pipeline Dice per gate on each set of patients, and the paired differences with
    their standard errors."""
    rows = []
    sets = {"every held-out patient": (patients, GATES[:2]),
            "val patients (the other model did not train on them)":
                (patients[patients["val_patient"] == 1], GATES)}
    for name, (group, gates) in sets.items():
        for gate in gates:
            values = group[f"dice_{gate}"].dropna()
            rows.append({"patients": name, "n": len(values), "gate": gate,
                         "dice_pipeline_mean": values.mean(),
                         "slice_sensitivity": group[f"sensitivity_{gate}"].mean(),
                         "slice_specificity": group[f"specificity_{gate}"].mean()})
        for a, b in [("encoder_gate", other) for other in gates if other != "encoder_gate"]:
            diff = (group[f"dice_{a}"] - group[f"dice_{b}"]).dropna()
            if len(diff) > 1:
                rows.append({"patients": name, "n": len(diff), "gate": f"{a} - {b}",
                             "dice_pipeline_mean": diff.mean(), "sem": standard_error(diff)})
    return pd.DataFrame(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=DataConfig.data_root)
    parser.add_argument("--manifest", default=DataConfig.manifest)
    parser.add_argument("--recipe", default=SHIPPED_RECIPE)
    parser.add_argument("--cv-dir", type=Path, default=Path("reports/cv"))
    parser.add_argument("--other", type=Path, default=None, metavar="CLASSIFIER",
                        help="the stage-1 model to compare with the encoder gates (default: the "
                             "baseline recipe's from-scratch CNN, "
                             "<cv-dir>/baseline/models/classifier.keras)")
    parser.add_argument("--rule-from", type=Path, default=SHIPPED_UNET,
                        help="U-Net whose JSON gives the post-processing and intensity rules")


def run(args: argparse.Namespace) -> int:
    quiet_tensorflow()
    other_path = args.other or baseline_classifier(args.cv_dir)
    if not other_path.is_file():
        raise FileNotFoundError(f"{other_path}: no such stage-1 model")
    manifest = read_manifest(args.manifest)
    val = set(manifest.loc[manifest["split"] == "val", "patient_id"])
    rule = load_json(args.rule_from.with_suffix(".json"), UNetConfig)
    other = TwoStagePredictor.load(other_path, args.rule_from)
    rows = []
    for fold in range(N_FOLDS):
        gate = fold_gate(args.cv_dir, args.recipe, fold)
        if not gate.is_file():
            raise FileNotFoundError(f"{gate}: fold {fold} has no encoder gate "
                                    "(make tune, or make cv-gates for a candidate recipe)")
        predictions, predictor = fold_predictions(args.recipe, fold, manifest, args.data_dir,
                                                  args.cv_dir, other_path, rule)
        for prediction in tqdm(predictions, desc=f"gating fold {fold}", unit="patient"):
            in_val = prediction.rows["patient_id"].iloc[0] in val
            rows.append(patient_rows(predictor, other, prediction, fold, in_val,
                                     Path(args.data_dir)))
    patients = pd.DataFrame(rows)
    # beside the CV report scored under the same intensity rule (bt cv --intensity)
    out = report_dir(args.cv_dir, args.recipe, rule.intensity) / "stage1_choice"
    write_text_atomic(out / "patients.csv",
                      patients.to_csv(index=False, lineterminator="\n", float_format="%.4f"))
    table = compare(patients)
    write_summary(out / "summary.md", f"Stage 1 compared on the {args.recipe} folds", [
        "Whole-pipeline mean Dice under each stage 1; `other` is "
        f"`{shown_path(other_path)}`, scored on the val patients only (it trained on the "
        "train split; its threshold was chosen on val). Every patient is segmented by the "
        f"fold U-Net that never trained on them, under the intensity rule {rule.intensity} (from "
        f"`{shown_path(args.rule_from.with_suffix('.json'))}`)."],
        {"comparison": table}, [])
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"report: {out / 'summary.md'}")
    return 0
