"""Evaluation report for the shipped models on the patient-level splits (``bt evaluate``).

Writes ``summary.md`` (the tables), ``patients.csv`` and ``slices.csv`` (every score), and
PNG figures: the classifier's ROC curves and confusion matrices, the per-patient Dice
distribution, and the best and worst slices.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from bt_pipeline.atomic import write_text_atomic
from bt_pipeline.config import DataConfig
from bt_pipeline.data.manifest import read_manifest
from bt_pipeline.data.preprocess import read_image
from bt_pipeline.evaluation.metrics import classification_metrics
from bt_pipeline.evaluation.scoring import (
    PatientPrediction,
    input_size_ceiling,
    pipeline_volume,
    predict_split,
    score_split,
    summarise,
    sweep_thresholds,
)
from bt_pipeline.inference.model_options import add_model_arguments, load_predictor
from bt_pipeline.inference.postprocess import (
    PostprocessingChoice,
    choose_postprocessing,
    write_choice,
)
from bt_pipeline.inference.predictor import TwoStagePredictor
from bt_pipeline.reports import draw_outline, plt, save_figure, write_summary


def classifier_table(slices: pd.DataFrame, threshold: float) -> pd.DataFrame:
    rows = [{"split": split, **classification_metrics(group["has_tumor"],
                                                       group["classifier_probability"], threshold)}
            for split, group in slices.groupby("split", sort=False)]
    return pd.DataFrame(rows)


def pipeline_detection_table(slices: pd.DataFrame) -> pd.DataFrame:
    """Per split, what the final output says slice by slice (a mask drawn or not) against the
    truth: the classifier gate, the U-Net and the post-processing together. Not the
    classifier's own figures (those are in ``classifier_table``)."""
    counts = ("n", "accuracy", "sensitivity", "specificity", "tp", "fp", "tn", "fn")
    rows = []
    for split, group in slices.groupby("split", sort=False):
        drawn = (group["pipeline_pixels"] > 0).astype(float)
        metrics = classification_metrics(group["has_tumor"], drawn, 0.5)
        rows.append({"split": split, **{name: metrics[name] for name in counts}})
    return pd.DataFrame(rows)


def by_institution(patients: pd.DataFrame) -> pd.DataFrame:
    """Pipeline and U-Net Dice per institution (CS, DU, EZ, FG, HT), per split."""
    return (patients.groupby(["split", "institution"], sort=False)
            .agg(patients=("patient_id", "size"), dice_unet_mean=("dice_unet", "mean"),
                 dice_pipeline_mean=("dice_pipeline", "mean"))
            .reset_index())


def by_slice_level(slices: pd.DataFrame) -> pd.DataFrame:
    """Classifier sensitivity and IoU on tumour slices by level of the brain: the lower,
    middle and upper third of each patient's slices, per split."""
    tumour = slices[slices["has_tumor"] == 1].copy()
    position = (tumour["slice"] - 1) / tumour["n_slices"].clip(lower=1)
    tumour["level"] = pd.cut(position, [-0.01, 1 / 3, 2 / 3, 1.01],
                             labels=["lower third", "middle third", "upper third"])
    return (tumour.groupby(["split", "level"], observed=True, sort=False)
            .agg(tumour_slices=("slice", "size"),
                 classifier_sensitivity=("classifier_positive", "mean"),
                 iou_unet_mean=("iou_unet", "mean"), iou_pipeline_mean=("iou_pipeline", "mean"))
            .reset_index())


def input_size_table(predictor: TwoStagePredictor,
                     predictions: dict[str, list[PatientPrediction]]) -> pd.DataFrame:
    """Per split, the pooled tumour-slice IoU a flawless U-Net at this input size could reach,
    for each way of shrinking the training masks (``DataConfig.mask_resize``)."""
    size = predictor.unet_config.image_size
    rows = []
    for split, split_predictions in predictions.items():
        ceiling = input_size_ceiling(split_predictions, size, predictor.mask_threshold)
        rows.append({"split": split, "unet_input_size": size,
                     **{f"iou_pooled_{resize}_masks": value for resize, value in ceiling.items()}})
    return pd.DataFrame(rows)


def _roc_figure(slices: pd.DataFrame, table: pd.DataFrame, out: Path) -> str:
    figure, axis = plt.subplots(figsize=(5, 5))
    for split, group in slices.groupby("split", sort=False):
        fpr, tpr, _ = roc_curve(group["has_tumor"], group["classifier_probability"])
        auc = table.set_index("split").loc[split, "auc"]
        axis.plot(fpr, tpr, label=f"{split} (AUC {auc:.3f})")
    axis.plot([0, 1], [0, 1], color="#aaa", linestyle=":")
    axis.set_xlabel("1 - specificity")
    axis.set_ylabel("sensitivity")
    axis.set_title("Slice classifier ROC")
    axis.legend()
    return save_figure(figure, out / "classifier_roc.png")


def _confusion_figure(table: pd.DataFrame, out: Path) -> str:
    figure, axes = plt.subplots(1, len(table), figsize=(3.2 * len(table), 3))
    for axis, row in zip(np.atleast_1d(axes), table.itertuples(index=False), strict=True):
        matrix = np.array([[row.tn, row.fp], [row.fn, row.tp]])
        axis.imshow(matrix, cmap="Blues")
        for (i, j), value in np.ndenumerate(matrix):
            axis.text(j, i, str(value), ha="center", va="center")
        axis.set_xticks([0, 1], ["no tumour", "tumour"])
        axis.set_yticks([0, 1], ["no tumour", "tumour"])
        axis.set_xlabel("predicted")
        axis.set_ylabel("truth")
        axis.set_title(f"{row.split} (threshold {row.threshold:.3f})")
    return save_figure(figure, out / "classifier_confusion.png")


def _dice_figure(patients: pd.DataFrame, out: Path) -> str:
    figure, axis = plt.subplots(figsize=(7, 4))
    groups, labels = [], []
    for split, group in patients.groupby("split", sort=False):
        for column in ("dice_unet", "dice_pipeline"):
            groups.append(group[column].dropna())
            labels.append(f"{split}\n{column.split('_')[1]}")
    axis.boxplot(groups, showmeans=True)
    axis.set_xticks(range(1, len(labels) + 1), labels)
    for k, values in enumerate(groups, start=1):
        axis.scatter(np.full(len(values), k) + np.linspace(-0.1, 0.1, len(values)), values,
                     s=8, color="#c44", alpha=0.6)
    axis.set_ylabel("Dice per patient volume")
    axis.set_ylim(0, 1.02)
    axis.set_title("Per-patient Dice (U-Net on tumour slices; two-stage pipeline on all)")
    return save_figure(figure, out / "dice_per_patient.png")


def _extremes_figure(predictor: TwoStagePredictor, slices: pd.DataFrame,
                     predictions: list[PatientPrediction], data_root: Path, out: Path,
                     n: int = 4) -> str:
    tumour = slices[slices["has_tumor"] == 1].sort_values("iou_pipeline")
    picks = pd.concat([tumour.tail(n).iloc[::-1], tumour.head(n)])
    by_patient = {p.rows["patient_id"].iloc[0]: p for p in predictions}
    volumes: dict[str, list[np.ndarray]] = {}
    figure, axes = plt.subplots(2, n, figsize=(3 * n, 7.2))
    for axis, row in zip(axes.ravel(), picks.itertuples(index=False), strict=False):
        prediction = by_patient[row.patient_id]
        k = int(np.flatnonzero(prediction.rows["slice"].to_numpy() == row.slice)[0])
        image = read_image(data_root / prediction.rows["image"].iloc[k])
        if row.patient_id not in volumes:
            volumes[row.patient_id] = pipeline_volume(predictor, prediction)
        mask = volumes[row.patient_id][k]
        shown = draw_outline(draw_outline(image, prediction.truths[k], (0, 255, 0)), mask,
                             (255, 0, 0))
        axis.imshow(shown)
        axis.set_title(f"{row.patient_id[5:12]} #{row.slice} IoU {row.iou_pipeline:.2f}",
                       fontsize=8)
        axis.axis("off")
    figure.suptitle(f"Best (top) and worst (bottom) {n} tumour slices: truth green, "
                    "prediction red")
    return save_figure(figure, out / "best_worst_slices.png")


def _sweep_figure(sweep: pd.DataFrame, predictor: TwoStagePredictor, out: Path) -> str:
    classifier_threshold = predictor.classifier_config.threshold
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    at_gate = sweep[np.isclose(sweep["classifier_threshold"], classifier_threshold)]
    if "component_share" in at_gate:  # the largest component alone, one line per rule
        at_gate = at_gate[at_gate["component_share"] == 1.0]
    rules = ["min_component_pixels", "keep_largest_3d", "largest_3d_by"]
    for (pixels, largest, by), group in at_gate.groupby(rules):
        left.plot(group["mask_threshold"], group["dice_pipeline_mean"], marker="o",
                  linestyle=(":" if by == "gate" else "-") if largest else "--",
                  label=f"drop < {pixels} px{f', largest 3D by {by}' if largest else ''}")
    left.set_xlabel("mask threshold")
    left.set_ylabel("mean per-patient Dice (val)")
    left.set_title(f"Mask threshold (classifier threshold {classifier_threshold:.3f})")
    left.legend(fontsize=7, ncol=2)
    in_use = predictor.unet_config
    plain = sweep[np.isclose(sweep["mask_threshold"], 0.5)
                  & (sweep["min_component_pixels"] == in_use.min_component_pixels)
                  & (sweep["keep_largest_3d"] == in_use.keep_largest_3d)
                  & (sweep["largest_3d_by"] == (in_use.largest_3d_by if in_use.keep_largest_3d
                                                else "voxels"))
                  & (sweep.get("component_share", 1.0) == (in_use.component_share
                                                           if in_use.keep_largest_3d else 1.0))]
    right.plot(plain["classifier_threshold"], plain["dice_pipeline_mean"], marker="o",
               label="mean per-patient Dice")
    right.plot(plain["classifier_threshold"], plain["slice_sensitivity"], marker="s",
               label="tumour-slice sensitivity")
    right.axvline(classifier_threshold, color="#aaa", linestyle=":")
    right.set_xlabel("classifier threshold")
    right.set_title("Classifier threshold (mask threshold 0.5, post-processing in use)")
    right.legend(fontsize=8)
    return save_figure(figure, out / "threshold_sweep.png")


def run_evaluation(predictor: TwoStagePredictor, data_config: DataConfig, splits: list[str],
                   out: Path, flair_alone: bool = False) -> dict[str, pd.DataFrame]:
    manifest = read_manifest(data_config.manifest)
    root = Path(data_config.data_root)
    predictions = {split: predict_split(predictor, manifest, split, root, flair_alone)
                   for split in splits}
    results = [score_split(predictor, predictions[split], split) for split in splits]
    patients = pd.concat([p for p, _ in results], ignore_index=True)
    slices = pd.concat([s for _, s in results], ignore_index=True)
    tables = {
        "classifier": classifier_table(slices, predictor.classifier_config.threshold),
        "segmentation": summarise(patients, slices),
        "pipeline_slice_detection": pipeline_detection_table(slices),
        "by_institution": by_institution(patients),
        "by_slice_level": by_slice_level(slices),
        "input_size_ceiling": input_size_table(predictor, predictions),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "patients.csv", patients.to_csv(index=False, lineterminator="\n"))
    write_text_atomic(out / "slices.csv", slices.to_csv(index=False, lineterminator="\n"))
    if "val" in splits:
        sweep = sweep_thresholds(predictor, predictions["val"])
        write_text_atomic(out / "threshold_sweep.csv",
                          sweep.to_csv(index=False, lineterminator="\n", float_format="%.4f"))
        choice = choose_postprocessing(sweep, predictor.classifier_config.threshold, "val")
        tables["postprocessing_choice"] = pd.DataFrame([
            {"setting": "min_component_pixels", "val_choice": choice.min_component_pixels,
             "in_use": predictor.unet_config.min_component_pixels},
            {"setting": "keep_largest_3d", "val_choice": choice.keep_largest_3d,
             "in_use": predictor.unet_config.keep_largest_3d},
            {"setting": "largest_3d_by", "val_choice": choice.largest_3d_by,
             "in_use": predictor.unet_config.largest_3d_by},
            {"setting": "val_dice_gain_of_choice", "val_choice": round(choice.gain, 4),
             "in_use": ""}])
    figures = [_roc_figure(slices, tables["classifier"], out),
               _confusion_figure(tables["classifier"], out), _dice_figure(patients, out),
               _extremes_figure(predictor, slices, [p for s in splits for p in predictions[s]],
                                root, out)]
    if "val" in splits:
        figures.append(_sweep_figure(sweep, predictor, out))
    intro = [f"Splits: {', '.join(splits)} (patient-level, from `{data_config.manifest}`). "
             f"Stage-1 threshold {predictor.classifier_config.threshold:.4f} (chosen on "
             "development patients, never test); "
             f"mask threshold {predictor.mask_threshold}; U-Nets {1 + len(predictor.extra_unets)}; "
             f"flip TTA {'on' if predictor.tta_flips else 'off'}; "
             f"{'bfloat16' if predictor.bfloat16 else 'float32'} compute. "
             "Scored at each slice's original grid."]
    write_summary(out / "summary.md", "bt_pipeline evaluation", intro, tables, figures)
    return tables


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=DataConfig.data_root)
    parser.add_argument("--manifest", default=DataConfig.manifest)
    parser.add_argument("--splits", nargs="+", default=["val", "test"],
                        choices=["train", "val", "test"])
    add_model_arguments(parser)
    parser.add_argument("--out", default="reports/evaluation")
    parser.add_argument("--flair-only", action="store_true",
                        help="score as FLAIR-only input: FLAIR in all three channels")
    parser.add_argument("--write-postprocessing", action="store_true",
                        help="write the post-processing that val chose into the U-Net's JSON "
                             "(needs val in --splits)")


def run(args: argparse.Namespace) -> int:
    if args.write_postprocessing and "val" not in args.splits:
        raise ValueError("--write-postprocessing chooses on val: add val to --splits")
    predictor = load_predictor(args)
    data_config = DataConfig(data_root=args.data_dir, manifest=args.manifest)
    if args.write_postprocessing and args.flair_only:
        raise ValueError("--write-postprocessing chooses for three-channel input: drop "
                         "--flair-only")
    tables = run_evaluation(predictor, data_config, args.splits, Path(args.out), args.flair_only)
    for name, table in tables.items():
        print(f"\n{name}\n" + table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if args.write_postprocessing:
        choice = tables["postprocessing_choice"].set_index("setting")["val_choice"]
        config = write_choice(args.unet, PostprocessingChoice(
            int(choice["min_component_pixels"]), bool(choice["keep_largest_3d"]),
            str(choice["largest_3d_by"]), float(choice["val_dice_gain_of_choice"]), "val"))
        print(f"\n{args.unet.with_suffix('.json')}: min_component_pixels="
              f"{config.min_component_pixels}, keep_largest_3d={config.keep_largest_3d}, "
              f"largest_3d_by={config.largest_3d_by}")
    print(f"\nreport: {Path(args.out) / 'summary.md'}")
    return 0
