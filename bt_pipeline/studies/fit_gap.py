"""Where the cross-validation's error lies (``bt fit-gap``, ``make fit-gap``): every development
patient scored twice under one recipe, by the fold models that never saw them (the held-out
rows of the CV report) and by the shipped models, which trained on every development patient.

A patient the shipped U-Net segments well but its fold U-Net does not is missed for want of
patients like it in the fold's training data; one that both miss, the recipe does not fit even
when it has seen it. Test patients are not read.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from bt_pipeline.atomic import write_text_atomic
from bt_pipeline.config import SHIPPED_CLASSIFIER, SHIPPED_UNET, DataConfig
from bt_pipeline.data.manifest import read_manifest
from bt_pipeline.evaluation.cv_report import report_dir, standard_error
from bt_pipeline.evaluation.scoring import evaluate_split
from bt_pipeline.inference.predictor import TwoStagePredictor
from bt_pipeline.reports import save_figure, shown_path, write_summary
from bt_pipeline.runtime import quiet_tensorflow
from bt_pipeline.training.cross_validation import SHIPPED_RECIPE

#: The scores compared: the U-Net on the true tumour slices, and the whole pipeline.
SCORES = ("dice_unet", "dice_pipeline")
#: A patient counts as fitted when the shipped model scores it at least this.
FITTED = 0.85
#: Rows in the table of the patients the cross-validation scores lowest.
WORST = 15


def paired(cv: pd.DataFrame, shipped: pd.DataFrame) -> pd.DataFrame:
    """One row per development patient: each score held out (the CV's) and trained on (the
    shipped models'), and their difference."""
    both = cv[["patient_id", "institution", *SCORES]].merge(
        shipped[["patient_id", *SCORES]], on="patient_id", how="outer", indicator=True,
        suffixes=("_held_out", "_trained_on"), validate="one_to_one")
    alone = both[both["_merge"] != "both"]
    if len(alone):
        raise ValueError(f"{len(alone)} patients scored on one side only (first: "
                         f"{alone['patient_id'].iloc[0]}, {alone['_merge'].iloc[0]})")
    both = both.drop(columns="_merge")
    for score in SCORES:
        both[f"{score}_gap"] = both[f"{score}_trained_on"] - both[f"{score}_held_out"]
    return both.sort_values("dice_pipeline_held_out").reset_index(drop=True)


def summary_table(both: pd.DataFrame) -> pd.DataFrame:
    """Mean of each score held out and trained on, the mean gap and its standard error, and
    how much of the held-out shortfall from 1 the gap is."""
    rows = []
    for score in SCORES:
        held, fitted, gap = (both[f"{score}_{k}"] for k in ("held_out", "trained_on", "gap"))
        rows.append({"score": score, "patients": int(gap.notna().sum()),
                     "held_out_mean": held.mean(), "trained_on_mean": fitted.mean(),
                     "gap_mean": gap.mean(), "gap_sem": standard_error(gap.dropna()),
                     "share_of_held_out_shortfall": gap.mean() / (1.0 - held.mean())})
    return pd.DataFrame(rows)


def worst_table(both: pd.DataFrame, count: int = WORST) -> pd.DataFrame:
    """The ``count`` patients with the lowest held-out pipeline Dice, and whether the shipped
    models fit them."""
    worst = both.head(count)[["patient_id", "institution", "dice_pipeline_held_out",
                              "dice_pipeline_trained_on", "dice_unet_held_out",
                              "dice_unet_trained_on"]].copy()
    worst["fitted_when_seen"] = worst["dice_pipeline_trained_on"] >= FITTED
    return worst


def gap_figure(both: pd.DataFrame, out: Path) -> str:
    """Held-out against trained-on pipeline Dice, one dot per patient."""
    from bt_pipeline.reports import plt

    figure, axis = plt.subplots(figsize=(5.2, 5.0))
    for institution, group in both.groupby("institution"):
        axis.scatter(group["dice_pipeline_trained_on"], group["dice_pipeline_held_out"], s=18,
                     label=institution)
    axis.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
    axis.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="pipeline Dice, shipped models (trained on)",
             ylabel="pipeline Dice, fold models (held out)",
             title="Each development patient, seen and unseen")
    axis.legend(title="institution", fontsize=8)
    return save_figure(figure, out / "fit_gap.png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=DataConfig.data_root)
    parser.add_argument("--manifest", default=DataConfig.manifest)
    parser.add_argument("--classifier", type=Path, default=SHIPPED_CLASSIFIER)
    parser.add_argument("--unet", type=Path, default=SHIPPED_UNET)
    parser.add_argument("--cv-report", type=Path, default=None, metavar="PATIENTS_CSV",
                        help="the CV's per-patient table of the recipe the U-Net shipped from "
                             "(default: reports/cv/<shipped recipe>/intensity_<its rule>/"
                             "patients.csv)")


def run(args: argparse.Namespace) -> int:
    quiet_tensorflow()
    predictor = TwoStagePredictor.load(args.classifier, args.unet)
    cv_path = args.cv_report or report_dir(Path("reports/cv"), SHIPPED_RECIPE,
                                           predictor.unet_config.intensity) / "patients.csv"
    if not cv_path.is_file():
        raise FileNotFoundError(f"{cv_path}: no cross-validation table (make cv)")
    cv = pd.read_csv(cv_path)
    manifest = read_manifest(args.manifest)
    development = sorted(cv["patient_id"])
    unseen = sorted(set(development) - set(predictor.trained_on_patients))
    if unseen:
        raise ValueError(f"{args.unet}: did not train on {len(unseen)} of the cross-validation's "
                         f"patients (first: {unseen[0]}); the comparison needs the model "
                         "trained on all of them")
    splits = sorted(set(manifest.loc[manifest["patient_id"].isin(development), "split"]))
    shipped = pd.concat([evaluate_split(predictor, manifest, split, args.data_dir)[0]
                         for split in splits], ignore_index=True)
    both = paired(cv, shipped)
    out = cv_path.parent / "fit_gap"
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "patients.csv",
                      both.to_csv(index=False, lineterminator="\n", float_format="%.4f"))
    tables = {"summary": summary_table(both), "worst": worst_table(both)}
    write_summary(out / "summary.md", "Held out against trained on", [
        f"Each of the {len(both)} development patients scored by the fold models that never "
        f"saw them (`{shown_path(cv_path)}`) and by `{shown_path(args.unet)}`, which trained "
        f"on all of them (its JSON's `trained_on_patients`), gated by "
        f"`{shown_path(args.classifier)}`, in float32 and under the same post-processing. "
        "`share_of_held_out_shortfall`: the mean gap over one minus "
        f"the held-out mean. `fitted_when_seen`: trained-on pipeline Dice >= {FITTED}."],
        tables, [gap_figure(both, out)],
        titles={"worst": f"The {WORST} patients the cross-validation scores lowest"})
    for name, table in tables.items():
        print(f"\n{name}\n" + table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\nreport: {out / 'summary.md'}")
    return 0
