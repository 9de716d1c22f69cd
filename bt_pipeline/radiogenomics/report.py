"""``bt radiogenomics``: the dataset's own research question answered from this tool's masks.

For every patient, shape features (``radiogenomics/shape.py``) are computed from the manual mask
and from an automatic one, and each feature is tested against each genomic subtype of
``data.csv`` (``radiogenomics/association.py``). An automatic mask must come from a U-Net that
never trained on the patient: a development patient's from its cross-validation fold's U-Net
(``reports/cv/<recipe>/models/fold<k>.keras``), a test patient's from the shipped U-Net. A
development patient whose fold is not trained yet has no automatic mask, and the report says so.

The automatic mask is the U-Net on every slice with the shipped post-processing rule, but no
stage-1 gate: a gate is bound to the U-Net it was built on and the from-scratch classifier
trained on development patients, so gated masks would not be held out for all of them.

    reports/radiogenomics/features.csv      per patient and mask source, every feature
    reports/radiogenomics/associations.csv  per mask source, subtype and feature: Fisher p
    reports/radiogenomics/summary.md        side by side tables, agreement, the paper's findings
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from bt_pipeline.atomic import write_text_atomic
from bt_pipeline.config import BASELINE_CLASSIFIER, SHIPPED_UNET, DataConfig, UNetConfig, load_json
from bt_pipeline.data.manifest import NO_FOLD, read_manifest
from bt_pipeline.data.preprocess import read_image, read_mask
from bt_pipeline.evaluation.cv_report import load_under_rule
from bt_pipeline.evaluation.metrics import dice_score
from bt_pipeline.radiogenomics.association import (
    PAPER_ALPHA,
    SUBTYPES,
    association_table,
    read_subtypes,
    short_id,
)
from bt_pipeline.radiogenomics.shape import FEATURES, shape_features
from bt_pipeline.reports import plt, save_figure, shown_path, write_summary
from bt_pipeline.runtime import quiet_tensorflow
from bt_pipeline.training.cross_validation import SHIPPED_RECIPE, fold_model

#: What Buda et al. (2019) report in their abstract, for the README's comparison.
PAPER_FINDINGS = (
    "RNASeq cluster x bounding ellipsoid volume ratio: p < 0.0002 (their strongest)",
    "RNASeq cluster x margin fluctuation: p < 0.005",
    "bounding ellipsoid volume ratio x every molecular subtype they tested: p < 0.02",
    "RNASeq cluster x angular standard deviation: p < 0.02",
)
SOURCES = ("manual", "automatic")


def heldout_unets(manifest: pd.DataFrame, recipe: str, models_root: Path,
                  test_unet: Path) -> dict[str, Path | None]:
    """Each patient's U-Net that never trained on them: a development patient's fold model of
    ``recipe`` (None until that fold is trained), a test patient's ``test_unet``."""
    folds = manifest.drop_duplicates("patient_id").set_index("patient_id")["fold"]
    chosen = {}
    for patient, fold in folds.items():
        path = Path(test_unet) if fold == NO_FOLD else fold_model(models_root, recipe, int(fold))
        chosen[patient] = path if path.is_file() else None
    return chosen


def _volumes(rows: pd.DataFrame, root: Path, predictor) -> tuple[np.ndarray, np.ndarray | None]:
    """(manual, automatic) bool mask volumes of one patient; automatic None without a model."""
    manual = np.stack([read_mask(root / p) for p in rows["mask"]]).astype(bool)
    if predictor is None:
        return manual, None
    maps = predictor.mask_probabilities([read_image(root / p) for p in rows["image"]])
    return manual, np.stack(predictor.volume_masks(maps)).astype(bool)


def patient_features(manifest: pd.DataFrame, data_root: str | Path,
                     models: dict[str, Path | None], classifier: Path,
                     rule: UNetConfig) -> pd.DataFrame:
    """One row per patient and mask source with every feature, the model used and, for the
    automatic mask, its Dice against the manual one."""
    root, rows = Path(data_root), []
    ordered = manifest.sort_values(["patient_id", "slice"])
    by_model: dict[Path | None, list[str]] = {}
    for patient, path in models.items():
        by_model.setdefault(path, []).append(patient)
    progress = tqdm(total=len(models), desc="masks and features", unit="patient")
    for path, patients in sorted(by_model.items(), key=lambda item: str(item[0])):
        predictor = None if path is None else load_under_rule(classifier, path, rule)
        for patient in sorted(patients):
            group = ordered[ordered["patient_id"] == patient]
            manual, automatic = _volumes(group, root, predictor)
            base = {"patient_id": patient, "institution": group["institution"].iloc[0],
                    "fold": int(group["fold"].iloc[0]), "model": shown_path(path)}
            rows.append({**base, "source": "manual", "dice_vs_manual": 1.0,
                         **shape_features(manual)})
            if automatic is not None:
                rows.append({**base, "source": "automatic",
                             "dice_vs_manual": dice_score(manual, automatic),
                             **shape_features(automatic)})
            progress.update()
    progress.close()
    return pd.DataFrame(rows)


def _wide(features: pd.DataFrame, source: str) -> pd.DataFrame:
    table = features[features["source"] == source].set_index("patient_id")
    return table.set_index(table.index.map(short_id))


def associations(features: pd.DataFrame, subtypes: pd.DataFrame) -> pd.DataFrame:
    """Fisher tests per mask source: ``manual`` over every patient, and both sources over the
    patients that have an automatic mask (``manual_paired``, ``automatic``), so that the side
    by side comparison is on the same patients."""
    automatic = _wide(features, "automatic")
    manual = _wide(features, "manual")
    sets = {"manual": manual, "manual_paired": manual.loc[manual.index.isin(automatic.index)],
            "automatic": automatic}
    tables = []
    for name, table in sets.items():
        joined = subtypes.reindex(table.index)
        tables.append(association_table(table, joined, FEATURES).assign(masks=name))
    return pd.concat(tables, ignore_index=True)


def side_by_side(tests: pd.DataFrame) -> pd.DataFrame:
    """subtype x feature rows, one p column per mask set."""
    wide = tests.pivot_table(index=["subtype", "feature"], columns="masks", values="p",
                             sort=False, dropna=False).reset_index()
    wide.columns.name = None
    return wide


def agreement(features: pd.DataFrame) -> pd.DataFrame:
    """Per feature, over patients with both masks: Pearson and Spearman correlation between the
    manual and the automatic value, and the two means."""
    manual, automatic = _wide(features, "manual"), _wide(features, "automatic")
    manual = manual.loc[automatic.index]
    rows = []
    for name in FEATURES:
        both = pd.concat([manual[name].rename("m"), automatic[name].rename("a")], axis=1).dropna()
        rows.append({"feature": name, "n": len(both),
                     "pearson_r": both["m"].corr(both["a"]),
                     "spearman_rho": both["m"].corr(both["a"], method="spearman"),
                     "manual_mean": both["m"].mean(), "automatic_mean": both["a"].mean()})
    return pd.DataFrame(rows)


def _scatter_figure(features: pd.DataFrame, out: Path) -> str:
    manual, automatic = _wide(features, "manual"), _wide(features, "automatic")
    manual = manual.loc[automatic.index]
    figure, axes = plt.subplots(1, len(FEATURES), figsize=(3.2 * len(FEATURES), 3.2))
    for ax, name in zip(axes, FEATURES, strict=True):
        ax.scatter(manual[name], automatic[name], s=12, color="#0072B2")
        limits = [np.nanmin([manual[name], automatic[name]]),
                  np.nanmax([manual[name], automatic[name]])]
        ax.plot(limits, limits, color="grey", lw=0.8, ls="--")
        ax.set(title=name.replace("_", " "), xlabel="manual mask", ylabel="automatic mask")
    return save_figure(figure, out / "manual_vs_automatic.png")


def _pvalue_figure(tests: pd.DataFrame, out: Path) -> str:
    titles = {"manual": "manual masks, every patient",
              "manual_paired": "manual masks, patients with both",
              "automatic": "automatic masks, patients with both"}
    figure, axes = plt.subplots(1, len(titles), figsize=(13, 4.8), sharey=True)
    for ax, (name, title) in zip(axes, titles.items(), strict=True):
        grid = tests[tests["masks"] == name].pivot(index="subtype", columns="feature",
                                                   values="p").reindex(index=SUBTYPES,
                                                                       columns=FEATURES)
        p = grid.to_numpy(dtype=float)
        image = ax.imshow(-np.log10(p), cmap="viridis", vmin=0, vmax=4)
        for (i, j), value in np.ndenumerate(p):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2g}" + ("*" if value < PAPER_ALPHA else ""),
                        ha="center", va="center", fontsize=7,
                        color="white" if value > 10 ** -2.5 else "black")
        ax.set_xticks(range(len(FEATURES)), [f.replace("_", "\n") for f in FEATURES], fontsize=7)
        ax.set_yticks(range(len(SUBTYPES)), SUBTYPES, fontsize=8)
        ax.set_title(f"{title} (n={int(tests.loc[tests['masks'] == name, 'n'].max())})",
                     fontsize=9)
    figure.colorbar(image, ax=axes[-1], fraction=0.046, label="-log10 p; * p < 0.005")
    return save_figure(figure, out / "associations.png")


def _p_values(table: pd.DataFrame) -> pd.DataFrame:
    """p columns as two significant digits: a fixed 4 places would print 0.0 for p < 5e-5."""
    columns = [c for c in table.columns if c not in ("subtype", "feature", "masks", "n")]
    return table.assign(**{c: table[c].map(lambda v: f"{v:.2g}") for c in columns})


def write_report(features: pd.DataFrame, tests: pd.DataFrame, out: Path, recipe: str,
                 missing: list[str], rule: UNetConfig) -> dict[str, pd.DataFrame]:
    """features.csv, associations.csv, the figures and summary.md under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for name, table in (("features", features), ("associations", tests)):
        write_text_atomic(out / f"{name}.csv", table.to_csv(index=False, lineterminator="\n",
                                                          float_format="%.6g"))
    automatic = features[features["source"] == "automatic"]
    significant = tests[tests["significant_at_paper_alpha"]][
        ["masks", "subtype", "feature", "n", "p", "p_bonferroni"]]
    tables = {"associations_side_by_side": _p_values(side_by_side(tests)),
              "significant_at_paper_alpha": _p_values(significant),
              "agreement_manual_vs_automatic": agreement(features)}
    intro = [
        f"{features['patient_id'].nunique()} patients with manual masks; "
        f"{automatic['patient_id'].nunique()} also with an automatic mask from a U-Net that "
        f"never trained on them (development patients: recipe `{recipe}`'s cross-validation "
        f"fold U-Nets; test patients: the shipped U-Net). Without a trained fold yet: "
        f"{len(missing)} development patients.",
        f"Automatic masks: the U-Net on every slice, threshold 0.5, "
        f"min_component_pixels={rule.min_component_pixels}, "
        f"keep_largest_3d={rule.keep_largest_3d} (sized by voxels: no stage-1 gate). Their mean "
        "Dice against "
        f"the manual masks: {automatic['dice_vs_manual'].mean():.3f} "
        f"(median {automatic['dice_vs_manual'].median():.3f}).",
        "Test: Fisher's exact test of each subtype's clusters against the feature split at its "
        f"median; `manual` over every patient, `manual_paired` and `automatic` over the same "
        f"patients. Significant: p < {PAPER_ALPHA} (the paper's level); `p_bonferroni` "
        "multiplies by every test of that mask set. Feature definitions: "
        "`bt_pipeline/radiogenomics/shape.py`.",
        "Buda et al. (2019) report, from 110 patients:",
        *[f"- {finding}" for finding in PAPER_FINDINGS],
    ]
    figures = [_pvalue_figure(tests, out), _scatter_figure(features, out)]
    write_summary(out / "summary.md", "Shape features against genomic subtypes", intro, tables,
                  figures)
    return tables


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=DataConfig.data_root,
                        help="the dataset's kaggle_3m folder (slices and data.csv)")
    parser.add_argument("--manifest", default=DataConfig.manifest)
    parser.add_argument("--recipe", default=SHIPPED_RECIPE,
                        help="whose cross-validation fold U-Nets segment development patients")
    parser.add_argument("--cv-dir", type=Path, default=Path("reports/cv"),
                        help="where the recipes' fold models are (<recipe>/models/)")
    parser.add_argument("--unet", type=Path, default=SHIPPED_UNET,
                        help="segments the test patients; its JSON gives the post-processing")
    parser.add_argument("--classifier", type=Path, default=BASELINE_CLASSIFIER,
                        help="loaded beside each U-Net, never gates (the masks are ungated)")
    parser.add_argument("--out", type=Path, default=Path("reports/radiogenomics"))


def run(args: argparse.Namespace) -> int:
    subtypes = read_subtypes(Path(args.data_dir) / "data.csv")
    manifest = read_manifest(args.manifest)
    quiet_tensorflow()
    models = heldout_unets(manifest, args.recipe, args.cv_dir, args.unet)
    missing = sorted(p for p, path in models.items() if path is None)
    rule = load_json(args.unet.with_suffix(".json"), UNetConfig)
    features = patient_features(manifest, args.data_dir, models, args.classifier, rule)
    tests = associations(features, subtypes)
    tables = write_report(features, tests, args.out, args.recipe, missing, rule)
    for name, table in tables.items():
        print(f"\n{name}\n" + table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\nreport: {args.out / 'summary.md'}")
    return 0
