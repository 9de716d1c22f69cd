"""``bt quality`` (``make quality-check``): the per-case quality estimate
(:mod:`bt_pipeline.inference.quality`) measured where it was not fitted.

1. Features and true Dice of every development patient from the fold models that never saw
   it (the shipped recipe's cross-validation), three times: as scanned, skull-stripped by its
   brain mask, and FLAIR alone.
2. Nested cross-validation: each fold's cases estimated by an estimate fitted on the other four
   folds' cases (whose own threshold and Dice map come from folds inside those four).
3. The estimate fitted on every fold's cases; ``--ship-to UNET`` writes it beside that U-Net.
4. That estimate on data it was not fitted on: the test split through the shipped models, and
   labelled BraTS-style cases (``--external``), each reported only.

Outputs in ``reports/quality/``: ``cases.csv`` (per case: features, true and predicted Dice,
review flag, where it was estimated), ``summary.md`` and ``quality.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from bt_pipeline.atomic import write_text_atomic
from bt_pipeline.config import DataConfig, UNetConfig, load_json
from bt_pipeline.data.brain_mask import load_masks
from bt_pipeline.data.manifest import N_FOLDS, read_manifest
from bt_pipeline.evaluation.cv_report import baseline_classifier, fold_predictions
from bt_pipeline.evaluation.scoring import pipeline_volume, predict_split
from bt_pipeline.inference.model_options import add_model_arguments, load_predictor
from bt_pipeline.inference.quality import (
    FEATURES,
    POOR_DICE,
    QUALITY_FILE,
    case_features,
    fit_quality,
)
from bt_pipeline.reports import plt, save_figure, shown_path, write_summary
from bt_pipeline.runtime import UsageError, library_output_silenced, quiet_tensorflow
from bt_pipeline.training.cross_validation import SHIPPED_RECIPE

#: The inputs each held-out patient is estimated on.
VARIANTS = ("as scanned", "skull-stripped", "FLAIR alone")
#: A case at or above this true Dice is a good one the flag should leave alone.
GOOD_DICE = 0.8


def prediction_rows(predictor, predictions, variant: str, where: str) -> list[dict]:
    """One row per patient: its features, as inference computes them, and its true Dice."""
    from bt_pipeline.evaluation.metrics import dice_score

    threshold = predictor.classifier_config.threshold
    rows = []
    for prediction in predictions:
        passed = prediction.probabilities >= threshold
        masks = pipeline_volume(predictor, prediction)
        features = case_features(
            [m if g else None for m, g in zip(prediction.maps, passed, strict=True)],
            prediction.mirrored, [m.astype(np.uint8) for m in masks], predictor.mask_threshold,
            # the input's kind, which inference detects (98 of 100 stripped LGG volumes and
            # none of the 100 heads, data/brain_mask.py)
            stripped=variant == "skull-stripped", flair_only=variant == "FLAIR alone")
        rows.append({"patient_id": prediction.rows["patient_id"].iloc[0], "input": variant,
                     "estimated_on": where,
                     "dice": dice_score(np.stack(prediction.truths), np.stack(masks)),
                     **features})
    return rows


def cv_cases(args, rule: UNetConfig) -> pd.DataFrame:
    manifest = read_manifest(args.manifest)
    brain_masks = load_masks(args.brain_masks)
    classifier = baseline_classifier(args.models_root)
    rows = []
    for fold in range(N_FOLDS):
        for variant in VARIANTS:
            predictions, predictor = fold_predictions(
                args.recipe, fold, manifest, args.data_dir, args.models_root, classifier, rule,
                flair_alone=variant == "FLAIR alone",
                brain_masks=brain_masks if variant == "skull-stripped" else None,
                mirrored=True)
            rows += [{**row, "fold": fold} for row in
                     prediction_rows(predictor, predictions, variant, f"cv fold {fold}")]
    return pd.DataFrame(rows)


def nested_estimates(table: pd.DataFrame) -> pd.DataFrame:
    """Each fold's cases estimated by a fit on the other folds' cases only."""
    parts = []
    for fold in sorted(table["fold"].unique()):
        inside = table["fold"] != fold
        model = fit_quality(table[inside], f"cv folds other than {fold}")
        parts.append(estimated(table[~inside], model))
    return pd.concat(parts).sort_index()


def estimated(table: pd.DataFrame, model) -> pd.DataFrame:
    rows = [model.estimate(dict(zip(FEATURES, values, strict=True)))
            for values in table[list(FEATURES)].to_numpy(float)]
    return table.assign(predicted_dice=[r[0] for r in rows], review=[r[1] for r in rows])


def performance(table: pd.DataFrame, by: str = "input") -> pd.DataFrame:
    """Per group: Spearman correlation of predicted with true Dice, and at the review
    threshold the share of poor cases flagged and of good cases flagged."""
    from scipy.stats import spearmanr

    rows = []
    groups = [("all", table), *table.groupby(by, sort=False)]
    for name, group in groups:
        poor, good = group["dice"] < POOR_DICE, group["dice"] >= GOOD_DICE
        rows.append({
            by: name, "cases": len(group),
            "spearman": float(spearmanr(group["predicted_dice"], group["dice"]).statistic)
            if len(group) > 2 else float("nan"),
            "poor_cases": int(poor.sum()),
            "poor_flagged": float(group.loc[poor, "review"].mean()) if poor.any() else np.nan,
            "good_cases": int(good.sum()),
            "good_flagged": float(group.loc[good, "review"].mean()) if good.any() else np.nan,
            "flagged": float(group["review"].mean())})
    return pd.DataFrame(rows)


def test_cases(args, model) -> pd.DataFrame:
    predictor = load_predictor(args)
    manifest = read_manifest(args.manifest)
    brain_masks = load_masks(args.brain_masks)
    rows = []
    for variant in VARIANTS:
        predictions = predict_split(predictor, manifest, "test", args.data_dir,
                                    flair_alone=variant == "FLAIR alone",
                                    brain_masks=brain_masks if variant == "skull-stripped"
                                    else None, mirrored=True)
        rows += prediction_rows(predictor, predictions, variant, "test split")
    return estimated(pd.DataFrame(rows), model)


def external_cases(args, model) -> pd.DataFrame:
    from bt_pipeline.evaluation.external import labelled_cases, score_case

    predictor = load_predictor(args)
    predictor.quality = model
    rows = []
    with library_output_silenced(keep=args.debug):
        for case, files in labelled_cases(args.external).items():
            for row in score_case(case, files, predictor):
                rows.append({"patient_id": row["case"], "estimated_on": "external",
                             "input": row["input"], "dice": row["dice"],
                             "predicted_dice": row["predicted_dice"], "review": row["review"]})
    return pd.DataFrame(rows)


def quality_figure(table: pd.DataFrame, path: Path) -> str:
    figure, axis = plt.subplots(figsize=(6, 5))
    for (where, group), marker in zip(table.groupby("estimated_on", sort=False), "os^v",
                                      strict=False):
        flagged = group["review"] == 1
        axis.scatter(group.loc[~flagged, "predicted_dice"], group.loc[~flagged, "dice"],
                     marker=marker, facecolors="none", edgecolors="tab:blue",
                     label=f"{where}: not flagged")
        axis.scatter(group.loc[flagged, "predicted_dice"], group.loc[flagged, "dice"],
                     marker=marker, color="tab:red", label=f"{where}: flagged for review")
    axis.axhline(POOR_DICE, color="grey", lw=0.8, ls="--")
    axis.set_xlabel("predicted Dice")
    axis.set_ylabel("true Dice (held out)")
    axis.set_xlim(0, 1)
    axis.set_ylim(-0.02, 1.02)
    axis.legend(fontsize=7, loc="lower right")
    return save_figure(figure, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=DataConfig.data_root)
    parser.add_argument("--manifest", default=DataConfig.manifest)
    parser.add_argument("--recipe", default=SHIPPED_RECIPE,
                        help="the recipe whose fold models give the held-out predictions "
                             "(default: the shipped one)")
    parser.add_argument("--models-root", type=Path, default=Path("reports/cv"),
                        help="where the recipes' fold models are (<recipe>/models/)")
    parser.add_argument("--brain-masks", type=Path, default=Path(DataConfig.brain_masks))
    parser.add_argument("--external", type=Path, default=None,
                        help="also report on labelled BraTS-style cases (bt external's layout)")
    parser.add_argument("--ship-to", type=Path, default=None, metavar="UNET",
                        help=f"write the estimate fitted on every fold as {QUALITY_FILE} "
                             "beside this U-Net (the shipped one: make quality-check)")
    parser.add_argument("--out", type=Path, default=Path("reports/quality"))
    add_model_arguments(parser, precision="auto")


def run(args: argparse.Namespace) -> int:
    if args.external is not None and not args.external.is_dir():
        raise UsageError(f"--external {args.external}: no such folder")
    quiet_tensorflow()
    rule = load_json(Path(args.unet).with_suffix(".json"), UNetConfig)
    cv = cv_cases(args, rule)
    nested = nested_estimates(cv)
    model = fit_quality(cv, f"cv:{args.recipe} held-out predictions, {cv['patient_id'].nunique()} "
                            f"patients x {len(VARIANTS)} inputs ({', '.join(VARIANTS)})")
    if args.ship_to is not None:
        model.save(Path(args.ship_to).with_name(QUALITY_FILE))
        print(f"wrote {Path(args.ship_to).with_name(QUALITY_FILE)}")
    parts = [nested.assign(estimated_on="nested cv"), test_cases(args, model)]
    if args.external is not None:
        parts.append(external_cases(args, model))
    table = pd.concat(parts, ignore_index=True)
    columns = ["estimated_on", "input", "patient_id", "dice", "predicted_dice", "review",
               *FEATURES]
    write_text_atomic(args.out / "cases.csv", table[columns].to_csv(
        index=False, lineterminator="\n", float_format="%.4f"))
    tables = {name: performance(table[table["estimated_on"] == name])
              for name in table["estimated_on"].unique()}
    coefficients = pd.DataFrame({"feature": model.features, "coefficient": model.coef})
    write_summary(args.out / "summary.md", "Per-case quality estimate, measured where it was "
                  "not fitted", [
                      f"Fitted on {model.fitted_on}: a logistic regression of P(Dice < "
                      f"{POOR_DICE}) on standardised features, an isotonic map to the Dice "
                      f"expected; a case is flagged for review at P >= "
                      f"{model.review_threshold:.3f}. Good: Dice >= {GOOD_DICE}.",
                      "Nested cv: each fold's cases estimated by a fit on the other folds only. "
                      f"Test split and external cases: the estimate fitted on every fold, "
                      f"through the shipped models ({shown_path(args.unet)}); reported only.",
                      "Written by `make quality-check` (`bt quality`)."],
                  {**tables, "coefficients (standardised features)": coefficients},
                  [quality_figure(table, args.out / "quality.png")])
    for name, result in tables.items():
        print(f"\n{name}\n" + result.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0
