"""Cross-validation report (``bt cv``): train a recipe's missing folds, score every fold's
held-out patients exactly as ``bt evaluate`` scores a split, and write ``reports/cv/<recipe>/``.

Each patient is scored by the fold U-Net that never trained on them, at 256x256, with the
shipped U-Net's post-processing rule, so that recipes are compared under one rule. A fold with
a gate of its own (``gate_fold<k>.keras``, from ``bt tune --gate``) is gated by it, so its
pipeline figure is held out; otherwise the baseline recipe's from-scratch slice CNN gates
(``reports/cv/baseline/models/classifier.keras``, a copy of the shipped classifier),
which trained on the manifest's train split, and only the U-Net figure (every true tumour slice
segmented) is held out.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from bt_pipeline.atomic import write_text_atomic, write_with
from bt_pipeline.config import (
    INTENSITY_RULES,
    SHIPPED_UNET,
    DataConfig,
    GateConfig,
    UNetConfig,
    load_json,
)
from bt_pipeline.data.brain_mask import load_masks
from bt_pipeline.data.manifest import N_FOLDS, read_manifest
from bt_pipeline.evaluation.evaluate import by_slice_level
from bt_pipeline.evaluation.metrics import dice_score
from bt_pipeline.evaluation.scoring import (
    pipeline_volume,
    predict_split,
    score_split,
    summarise,
    sweep_thresholds,
)
from bt_pipeline.inference.postprocess import choose_postprocessing, write_choice
from bt_pipeline.models.precision import TRAINING_PRECISIONS, resolve_precision
from bt_pipeline.reports import plt, save_figure, write_summary
from bt_pipeline.runtime import UsageError, keras_verbosity, quiet_tensorflow
from bt_pipeline.training.cross_validation import (
    ALL,
    RECIPES,
    fold_dir,
    fold_gate,
    fold_model,
    fold_patients,
    train_fold,
    with_seed,
)

#: Sensitivity floors of the gate's threshold rule that the report scores the pipeline at.
GATE_FLOORS = (0.97, 0.98, 0.99, 0.995)

#: Per-patient scores whose mean, median and standard error the report gives.
SCORES = ("dice_unet", "dice_pipeline", "dice_no_gate")


def load_under_rule(classifier: Path, unet: Path, rule: UNetConfig):
    """A predictor for ``classifier`` and ``unet`` whose post-processing, mirrored copies
    (``tta_flips``) and intensity rule are ``rule``'s, so that U-Nets shipped under other rules
    are scored under one."""
    from bt_pipeline.inference.predictor import TwoStagePredictor

    predictor = TwoStagePredictor.load(classifier, unet, tta_flips=rule.tta_flips)
    # a U-Net trained on standardised volumes is always fed them; one trained on raw
    # intensities may be run under either rule
    trained_on = predictor.unet_config.intensity
    predictor.unet_config = dataclasses.replace(
        postprocessed_as(predictor.unet_config, rule),
        intensity=rule.intensity if trained_on == "raw" else trained_on)
    if isinstance(predictor.classifier_config, GateConfig):  # it reads the U-Net's encoder
        predictor.classifier_config = dataclasses.replace(predictor.classifier_config,
                                                          intensity=predictor.unet_config.intensity)
    return predictor


def postprocessed_as(config: UNetConfig, rule: UNetConfig) -> UNetConfig:
    """``config`` with ``rule``'s post-processing."""
    return dataclasses.replace(config, min_component_pixels=rule.min_component_pixels,
                               keep_largest_3d=rule.keep_largest_3d,
                               largest_3d_by=rule.largest_3d_by,
                               component_share=rule.component_share)


def baseline_classifier(models_root: Path) -> Path:
    """The baseline recipe's stage 1 under ``models_root`` (``config.BASELINE_CLASSIFIER`` for
    the default ``reports/cv``): it gates the folds that have no gate of their own."""
    return Path(models_root) / "baseline" / "models" / "classifier.keras"


def score_fold(recipe: str, fold: int, manifest: pd.DataFrame, data_root: str,
               models_root: Path, classifier: Path, rule: UNetConfig, flair_alone: bool = False,
               brain_masks: dict | None = None):
    """Per-patient and per-slice tables of fold ``fold``'s held-out patients, their
    predictions and the fold's predictor."""
    predictions, predictor = fold_predictions(recipe, fold, manifest, data_root, models_root,
                                              classifier, rule, flair_alone, brain_masks)
    return (*score_split(predictor, predictions, f"fold{fold}"), predictions, predictor)


def fold_predictions(recipe: str, fold: int, manifest: pd.DataFrame, data_root: str,
                     models_root: Path, classifier: Path, rule: UNetConfig,
                     flair_alone: bool = False, brain_masks: dict | None = None,
                     mirrored: bool = False):
    """Fold ``fold``'s predictor (its U-Net, gated by its own gate where it has one, else by
    ``classifier``) and its predictions for the fold's held-out patients (skull-stripped by
    ``brain_masks`` when given; ``mirrored`` as :func:`scoring.predict_split`)."""
    _, held_out = fold_patients(manifest, fold)
    name = f"fold{fold}"
    rows = manifest[manifest["patient_id"].isin(held_out)].assign(split=name)
    gate = fold_gate(models_root, recipe, fold)
    predictor = load_under_rule(gate if gate.is_file() else classifier,
                                fold_model(models_root, recipe, fold), rule)
    return predict_split(predictor, rows, name, data_root, flair_alone, brain_masks,
                         mirrored), predictor


def report_dir(models_root: Path, recipe: str, intensity: str) -> Path:
    """Where ``recipe``'s CV report scored under the intensity rule ``intensity`` lives:
    ``<recipe>/intensity_<rule>/``, or ``<recipe>/`` on raw intensities. Filed by the rule the
    U-Nets were fed, so that a report is never paired with one scored under another rule."""
    report = Path(models_root) / recipe
    return report if intensity == "raw" else report / f"intensity_{intensity}"


def mean_and_sem(patients: pd.DataFrame, by: str | None = None) -> pd.DataFrame:
    """Mean, median and standard error of the mean of each per-patient score."""
    groups = [("all", patients)] if by is None else list(patients.groupby(by, sort=True))
    rows = []
    for key, group in groups:
        row = {by or "patients": key, "n": len(group)}
        for score in (s for s in SCORES if s in group.columns):
            values = group[score].dropna()
            row[f"{score}_mean"] = values.mean()
            row[f"{score}_median"] = values.median()
            row[f"{score}_sem"] = standard_error(values)
        rows.append(row)
    return pd.DataFrame(rows)


def paired_difference(patients: pd.DataFrame, other: pd.DataFrame, score: str) -> dict:
    """Mean per-patient difference ``patients - other`` on ``score`` over the patients both
    scored, with its standard error (the yardstick for adopting a recipe)."""
    both = patients.set_index("patient_id")[score].to_frame("a").join(
        other.set_index("patient_id")[score].to_frame("b"), how="inner").dropna()
    diff = both["a"] - both["b"]
    return {"score": score, "patients": len(diff), "mean_difference": diff.mean(),
            "sem": standard_error(diff)}


def standard_error(values: pd.Series) -> float:
    """Standard error of the mean (sample standard deviation); NaN for fewer than 2 values."""
    return values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")


def training_table(recipe: str, folds: list[int], models_root: Path,
                   runs_root: Path) -> pd.DataFrame:
    """Per trained fold: precision, schedule, epochs and wall time, from the fold's shipped
    JSON (epochs from its run log where this machine still has it)."""
    rows = []
    for fold in folds:
        path = fold_model(models_root, recipe, fold).with_suffix(".json")
        config = load_json(path, UNetConfig)
        extra = json.loads(path.read_text(encoding="utf-8"))["extra"]
        log = fold_dir(runs_root, recipe, fold) / "log.csv"
        epochs = extra.get("epochs_logged", extra["epochs_run_this_call"])
        rows.append({"fold": fold, "precision": config.precision, "schedule": config.schedule,
                     "epochs": len(pd.read_csv(log)) if log.is_file() else epochs,
                     "wall_seconds_last_call": extra["wall_seconds_this_call"]})
    return pd.DataFrame(rows)


def dice_figure(patients: pd.DataFrame, out: Path) -> str:
    """Per-patient Dice by fold and by institution: one dot per held-out patient, the
    median marked, U-Net and pipeline side by side."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, by in zip(axes, ("split", "institution"), strict=True):
        groups = sorted(patients[by].unique())
        for k, group in enumerate(groups):
            rows = patients[patients[by] == group]
            for shift, score, colour in ((-0.15, "dice_unet", "#0072B2"),
                                         (0.15, "dice_pipeline", "#E69F00")):
                values = rows[score].dropna().to_numpy()
                jitter = np.linspace(-0.06, 0.06, len(values)) if len(values) > 1 else [0.0]
                ax.scatter(k + shift + np.asarray(jitter), values, s=14, color=colour,
                           label=score if k == 0 else None)
                if len(values):
                    ax.hlines(np.median(values), k + shift - 0.1, k + shift + 0.1, color="k")
        ax.set_xticks(range(len(groups)), [f"{g}\n(n={int((patients[by] == g).sum())})"
                                           for g in groups])
        ax.set_title(f"per-patient Dice by {'fold' if by == 'split' else by}")
        ax.set_ylim(-0.03, 1.03)
    axes[0].set_ylabel("Dice (held-out patient)")
    axes[0].legend(loc="lower left", fontsize=8)
    return save_figure(figure, out / "dice_per_patient.png")


def against(patients: pd.DataFrame, reference: Path) -> pd.DataFrame:
    """Paired per-patient differences of each score against another run's ``patients.csv``
    (the baseline recipe's by default; this run minus that one), over the patients both
    scored."""
    other = pd.read_csv(reference)
    # a report written before a score existed has no column for it
    return pd.DataFrame([paired_difference(patients, other, score) for score in SCORES
                         if score in other.columns])


def write_report(recipe: str, patients: pd.DataFrame, slices: pd.DataFrame, out: Path,
                 folds_missing: list[int], rule: UNetConfig, training: pd.DataFrame,
                 reference: Path | None = None,
                 own_gates: tuple[int, ...] = (),
                 reference_label: str = "baseline",
                 more: dict[str, pd.DataFrame] | None = None) -> dict[str, pd.DataFrame]:
    """The report's CSVs, tables and figure in ``out``; ``more``: further tables to add."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "patients.csv", patients.to_csv(index=False, lineterminator="\n"))
    write_text_atomic(out / "slices.csv", slices.to_csv(index=False, lineterminator="\n"))
    pooled_patients = patients.assign(split="pooled")
    pooled_slices = slices.assign(split="pooled")
    tables = {
        "pooled": mean_and_sem(patients),
        "per_fold": pd.concat([summarise(patients, slices),
                               summarise(pooled_patients, pooled_slices)], ignore_index=True),
        "by_institution": mean_and_sem(patients, "institution"),
        "by_slice_level": by_slice_level(pooled_slices),
        "training": training,
    }
    if reference is not None and reference.is_file():
        tables[f"paired_difference_vs_{reference_label}"] = against(patients, reference)
    tables.update(more or {})
    missing = ", ".join(map(str, folds_missing)) or "none"
    intro = [f"Recipe `{recipe}`: {patients['patient_id'].nunique()} held-out development "
             f"patients scored, each by the fold U-Net that never trained on them (folds not "
             f"yet trained: {missing}). Post-processing as the shipped U-Net: "
             f"min_component_pixels={rule.min_component_pixels}, "
             f"keep_largest_3d={rule.keep_largest_3d} (sized by {rule.largest_3d_by}); "
             f"intensity rule {rule.intensity}; mirrored copies averaged in (flip TTA): "
             f"{'yes' if rule.tta_flips else 'no'}. "
             "`dice_unet`: every true tumour slice segmented (a perfect gate); "
             "`dice_no_gate`: every slice segmented, no stage 1, held out whatever gates; "
             "`dice_pipeline`: " + _gate_note(patients, own_gates) +
             " SEM: standard error of the mean over patients."]
    if reference is not None and reference_label != "baseline":
        intro.append(f"Paired differences: this run minus `{reference}`.")
    write_summary(out / "summary.md", f"Cross-validation: {recipe}", intro, tables,
                  [dice_figure(patients, out)])
    return tables


def _gate_note(patients: pd.DataFrame, own_gates: tuple[int, ...]) -> str:
    folds = sorted(int(split[4:]) for split in patients["split"].unique())
    if set(folds) <= set(own_gates):
        return ("each fold's own gate (`bt tune --gate`) on its U-Net's encoder, so the whole "
                "pipeline is held out.")
    note = ("the baseline's from-scratch classifier gates, and it trained on the manifest's "
            "train split, so that column is not held out")
    if own_gates:
        note += f" except in folds {', '.join(map(str, own_gates))}, gated by their own gates"
    return note + "."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=DataConfig.data_root)
    parser.add_argument("--manifest", default=DataConfig.manifest)
    parser.add_argument("--recipe", default="baseline", choices=sorted(RECIPES))
    parser.add_argument("--folds", type=int, nargs="+", default=list(range(N_FOLDS)))
    parser.add_argument("--no-train", action="store_true",
                        help="only score the folds already trained")
    parser.add_argument("--ship-to", type=Path, metavar="UNET",
                        help="with --all: copy the trained model and its JSON here")
    parser.add_argument("--write-postprocessing", type=Path, metavar="UNET",
                        help="choose the post-processing rule on the held-out predictions and "
                             "write it into this U-Net's JSON")
    parser.add_argument("--all", action="store_true",
                        help="instead: train the recipe on every development patient "
                             "(<recipe>/models/all.keras, the candidate to ship)")
    parser.add_argument("--flair-only", action="store_true",
                        help="score FLAIR-only input (FLAIR in all three channels) into "
                             "<recipe>/flair_only/")
    parser.add_argument("--stripped", action="store_true",
                        help="score every held-out volume skull-stripped by its brain mask "
                             "(make brain-masks) into <report>/stripped/")
    parser.add_argument("--brain-masks", type=Path, default=Path(DataConfig.brain_masks),
                        help="with --stripped: the masks")
    parser.add_argument("--precision", default="auto", choices=TRAINING_PRECISIONS,
                        help="training compute; auto = mixed_bfloat16 where the CPU multiplies "
                             "bfloat16 natively (AVX512-BF16 or AMX), else float32 (emulated "
                             "bfloat16 trains several times slower)")
    parser.add_argument("--seed", type=int, default=None,
                        help="train with this seed instead of the recipe's (with --out "
                             "elsewhere: a second run of a fold, to size run-to-run noise)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/cv"),
                        help="scratch: the folds' training runs (logs, backups)")
    parser.add_argument("--classifier", type=Path, default=None,
                        help="stage 1 of the folds without a gate of their own (default: the "
                             "from-scratch CNN of the baseline recipe, "
                             "<out>/baseline/models/classifier.keras)")
    parser.add_argument("--rule-from", type=Path, default=SHIPPED_UNET,
                        help="U-Net whose JSON gives the post-processing and intensity rules")
    parser.add_argument("--intensity", choices=INTENSITY_RULES, default=None,
                        help="score under this intensity rule instead of --rule-from's "
                             "(with --write-postprocessing: ship it); reports scored under a "
                             "rule go to <recipe>/intensity_<rule>/, on raw intensities to "
                             "<recipe>/")
    parser.add_argument("--tta-flips", action=argparse.BooleanOptionalAction, default=None,
                        help="also segment each slice mirrored left-right and average "
                             "(default: as --rule-from's JSON says); scored otherwise than "
                             "that JSON, reports go to <report>/tta_flips/ or no_tta_flips/")
    parser.add_argument("--against", type=Path, metavar="PATIENTS_CSV",
                        help="pair each patient's scores with another run's patients.csv "
                             "(default: the baseline recipe's)")
    parser.add_argument("--out", type=Path, default=Path("reports/cv"),
                        help="the reports and the folds' finished models (<recipe>/models/)")


def run(args: argparse.Namespace) -> int:
    quiet_tensorflow()
    recipe = RECIPES[args.recipe](resolve_precision(args.precision))
    if args.seed is not None:
        recipe = with_seed(recipe, args.seed)
    manifest = read_manifest(args.manifest)
    if args.all:
        path = train_fold(recipe, ALL, args.data_dir, args.manifest, args.runs_dir, args.out,
                          keras_verbosity())
        print(f"trained on every development patient: {path}")
        if args.ship_to is not None:
            for source, target in ((path, args.ship_to),
                                   (path.with_suffix(".json"), args.ship_to.with_suffix(".json"))):
                write_with(target, lambda tmp, source=source: shutil.copyfile(source, tmp),
                           suffix=target.suffix)
            print(f"shipped: {args.ship_to}")
        return 0
    if args.write_postprocessing is not None and (args.flair_only or args.stripped):
        raise UsageError("--write-postprocessing chooses for three-channel input with skull: "
                         "drop --flair-only and --stripped")
    brain_masks = load_masks(args.brain_masks) if args.stripped else None
    rule = load_json(args.rule_from.with_suffix(".json"), UNetConfig)
    if args.intensity is not None:
        rule = dataclasses.replace(rule, intensity=args.intensity)
    flips_differ = args.tta_flips is not None and args.tta_flips != rule.tta_flips
    if flips_differ and args.write_postprocessing is not None:
        raise UsageError("--write-postprocessing chooses for the U-Net as its JSON runs it: "
                         "drop --tta-flips/--no-tta-flips")
    if args.tta_flips is not None:
        rule = dataclasses.replace(rule, tta_flips=args.tta_flips)
    if recipe.unet.intensity != "raw":  # a U-Net trained under a rule is always fed it
        rule = dataclasses.replace(rule, intensity=recipe.unet.intensity)
    classifier = args.classifier or baseline_classifier(args.out)
    results, missing = [], []
    for fold in args.folds:
        if not args.no_train:
            train_fold(recipe, fold, args.data_dir, args.manifest, args.runs_dir, args.out,
                       keras_verbosity())
        if not fold_model(args.out, recipe.name, fold).is_file():
            missing.append(fold)
            continue
        results.append(score_fold(recipe.name, fold, manifest, args.data_dir, args.out,
                                  classifier, rule, args.flair_only, brain_masks))
    if not results:
        raise FileNotFoundError(f"{args.out / recipe.name / 'models'}: no fold is trained yet")
    trained = [fold for fold in args.folds if fold not in missing]
    # the rule the U-Nets were fed, whether --intensity, --rule-from's JSON or the recipe's
    # own training chose it
    report = report_dir(args.out, recipe.name, rule.intensity)
    report = report / ("flair_only" if args.flair_only else "") / \
        ("stripped" if args.stripped else "")
    if flips_differ:
        report = report / ("tta_flips" if rule.tta_flips else "no_tta_flips")
    if args.write_postprocessing is not None:
        # the report then scores what ships: the rule just chosen, not the one the JSON held
        chosen = choose_on_cv(results, trained, recipe.name, report, args.write_postprocessing)
        rule = postprocessed_as(rule, chosen)
        results = [rescored(result, rule, f"fold{fold}")
                   for result, fold in zip(results, trained, strict=True)]
    patients = pd.concat([r[0] for r in results], ignore_index=True)
    slices = pd.concat([r[1] for r in results], ignore_index=True)
    label = recipe.name + (", FLAIR-only input" if args.flair_only else "") + \
        (", skull-stripped by the brain masks" if args.stripped else "")
    reference = args.out / "baseline" / report.relative_to(args.out / recipe.name) / \
        "patients.csv"
    own_gates = tuple(f for f in trained if fold_gate(args.out, recipe.name, f).is_file())
    if args.against is not None:
        reference, reference_label = args.against, "reference"
    else:
        reference = None if recipe.name == "baseline" else reference
        reference_label = "baseline"
    # the floor is a choice for what ships: only where every fold's pipeline is held out
    more = {"gate_sensitivity_floors": gate_floors(results)} \
        if own_gates == tuple(trained) and not (args.flair_only or args.stripped) else None
    tables = write_report(label, patients, slices, report, missing, rule,
                          training_table(recipe.name, trained, args.out, args.runs_dir),
                          reference, own_gates, reference_label, more)
    for name, table in tables.items():
        print(f"\n{name}\n" + table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


def gate_floors(results, floors=GATE_FLOORS) -> pd.DataFrame:
    """The whole pipeline had the gates' threshold been chosen under other sensitivity floors:
    each threshold by the rule ``bt tune --gate`` applies (``choose_threshold``) to the pooled
    held-out gate probabilities, every fold's gate cut there, no model run again; paired with
    the gates' own threshold. A lower threshold passes more slices to the U-Net (slower)."""
    from bt_pipeline.training.train_classifier import choose_threshold

    predictions = [p for r in results for p in r[2]]
    labels = np.concatenate([[t.any() for t in p.truths] for p in predictions])
    probabilities = np.concatenate([p.probabilities for p in predictions])
    own = pd.concat([r[0] for r in results], ignore_index=True)
    rows = []
    for floor in floors:
        threshold = choose_threshold(labels, probabilities, floor)
        rows_at_floor = []
        for _, _, predictions_of_fold, predictor in results:
            cut = copy.copy(predictor)  # shares the loaded models; only the threshold differs
            cut.classifier_config = dataclasses.replace(predictor.classifier_config,
                                                        threshold=threshold)
            # the pipeline's masks alone: the other views do not depend on the threshold
            rows_at_floor += [{"patient_id": p.rows["patient_id"].iloc[0],
                               "dice_pipeline": dice_score(np.stack(p.truths),
                                                           np.stack(pipeline_volume(cut, p)))}
                              for p in predictions_of_fold]
        patients = pd.DataFrame(rows_at_floor)
        paired = paired_difference(patients, own, "dice_pipeline")
        rows.append({"min_sensitivity": floor, "threshold": threshold,
                     "slice_sensitivity": float((probabilities[labels] >= threshold).mean()),
                     "slices_passed": float((probabilities >= threshold).mean()),
                     "dice_pipeline_mean": patients["dice_pipeline"].mean(),
                     "vs_own_threshold": paired["mean_difference"], "sem": paired["sem"]})
    return pd.DataFrame(rows)


def rescored(result, rule: UNetConfig, split: str):
    """``result`` of :func:`score_fold` scored again from its predictions, under ``rule``'s
    post-processing: no model runs twice."""
    _, _, predictions, predictor = result
    predictor.unet_config = postprocessed_as(predictor.unet_config, rule)
    return (*score_split(predictor, predictions, split), predictions, predictor)


def choose_on_cv(results, folds: list[int], recipe: str, report: Path,
                 unet: Path) -> UNetConfig:
    """Choose the post-processing rule on the pooled held-out predictions of ``folds`` (each
    patient by the fold U-Net that never trained on them), write it into ``unet``'s JSON and
    return that JSON's config."""
    predictions = [p for r in results for p in r[2]]
    predictor = results[0][3]  # the sweep varies thresholds and rules, not models
    sweep = sweep_thresholds(predictor, predictions)
    write_text_atomic(report / "postprocessing_sweep.csv",
                      sweep.to_csv(index=False, lineterminator="\n", float_format="%.4f"))
    on = (f"cv:{recipe} folds {','.join(map(str, folds))} "
          f"({len(predictions)} held-out patients)")
    choice = dataclasses.replace(
        choose_postprocessing(sweep, predictor.classifier_config.threshold, on),
        intensity=predictor.unet_config.intensity)
    config = write_choice(unet, choice)
    print(f"\n{unet.with_suffix('.json')}: min_component_pixels={config.min_component_pixels}, "
          f"keep_largest_3d={config.keep_largest_3d}, largest_3d_by={config.largest_3d_by}, "
          f"component_share={config.component_share}, "
          f"intensity={config.intensity} "
          f"(gain {choice.gain:+.4f} on {on})")
    return config
