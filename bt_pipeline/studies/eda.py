"""Plots of the dataset (``make eda``): class balance, volume sizes, tumour areas, examples,
the brightness of each volume."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pandas as pd

from bt_pipeline.atomic import write_text_atomic
from bt_pipeline.config import DataConfig
from bt_pipeline.data.manifest import read_manifest
from bt_pipeline.data.preprocess import BRAIN_FLAIR_FLOOR, brain_p99, read_image, read_mask
from bt_pipeline.reports import draw_outline, plt, save_figure


def _class_counts(table: pd.DataFrame, out: Path) -> str:
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    overall = table["has_tumor"].value_counts().reindex([0, 1], fill_value=0)
    left.bar(["no tumour", "tumour"], overall.values, color=["#8aa", "#c44"])
    left.set_title(f"All {len(table)} slices")
    for x, value in enumerate(overall.values):
        left.text(x, value, str(value), ha="center", va="bottom")
    per_inst = table.groupby(["institution", "has_tumor"]).size().unstack(fill_value=0)
    per_inst = per_inst.reindex(columns=[0, 1], fill_value=0)
    per_inst.columns = ["no tumour", "tumour"]
    per_inst.plot.bar(ax=right, color=["#8aa", "#c44"], rot=0)
    right.set_title("Slices per institution")
    right.set_ylabel("slices")
    return save_figure(figure, out / "slice_counts.png")


def _slices_per_patient(table: pd.DataFrame, out: Path) -> str:
    per_patient = table.groupby("patient_id").agg(n=("slice", "size"), tumour=("has_tumor", "sum"))
    figure, axis = plt.subplots(figsize=(6, 4))
    bins = np.arange(per_patient["n"].min() - 0.5, per_patient["n"].max() + 1.5, 2)
    axis.hist(per_patient["n"], bins=bins, color="#678", label="all slices")
    axis.hist(per_patient["tumour"], bins=np.arange(-0.5, per_patient["n"].max() + 1.5, 2),
              color="#c44", alpha=0.6, label="tumour slices")
    axis.set_xlabel("slices per patient")
    axis.set_ylabel("patients")
    axis.legend()
    axis.set_title(f"{len(per_patient)} patients")
    return save_figure(figure, out / "slices_per_patient.png")


def _tumour_area(table: pd.DataFrame, out: Path) -> str:
    areas = table.loc[table["has_tumor"] == 1, "tumor_pixels"]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.hist(areas, bins=40, color="#c44")
    axis.set_xlabel("tumour area per slice (pixels of 256x256)")
    axis.set_ylabel("slices")
    axis.set_title(f"{len(areas)} tumour slices; median {int(areas.median())} px")
    return save_figure(figure, out / "tumour_area.png")


def _example_grid(table: pd.DataFrame, data_root: Path, out: Path, n: int = 16,
                  seed: int = 0) -> str:
    tumour = table[table["has_tumor"] == 1]
    picks = tumour.sample(n=min(n, len(tumour)), random_state=seed)
    columns = 4
    rows = int(np.ceil(len(picks) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows))
    for axis, (_, row) in zip(np.ravel(axes), picks.iterrows(), strict=False):
        image = read_image(data_root / row["image"])
        outlined = draw_outline(image, read_mask(data_root / row["mask"]), (0, 255, 0))
        axis.imshow(outlined)
        axis.set_title(f"{row['patient_id'][:12]} #{row['slice']} ({row['institution']})",
                       fontsize=8)
    for axis in np.ravel(axes):
        axis.axis("off")
    figure.suptitle("Tumour slices (RGB = pre-contrast, FLAIR, post-contrast); truth in green")
    return save_figure(figure, out / "examples.png")


def volume_brightness(table: pd.DataFrame, data_root: Path) -> pd.DataFrame:
    """Per patient: each channel's 99th percentile (0-255) over the brain pixels (FLAIR above
    BRAIN_FLAIR_FLOOR) of the whole volume at its own grid, the statistic the "volume_p99"
    intensity rule equalises (on the model's grid)."""
    rows = []
    for patient, group in table.groupby("patient_id", sort=True):
        pixels = np.concatenate([read_image(data_root / p).reshape(-1, 3) for p in group["image"]])
        level = brain_p99(pixels, BRAIN_FLAIR_FLOOR * 255)
        if level is None:
            level = np.full(3, np.nan)
        rows.append({"patient_id": patient, "split": group["split"].iloc[0],
                     "pre_p99": level[0], "flair_p99": level[1], "post_p99": level[2]})
    return pd.DataFrame(rows)


def _brightness(table: pd.DataFrame, data_root: Path, out: Path, cv_patients: Path | None) -> str:
    """FLAIR brightness per volume, against the held-out U-Net Dice where a CV report exists."""
    brightness = volume_brightness(table, data_root)
    write_text_atomic(out / "volume_brightness.csv",
                      brightness.to_csv(index=False, lineterminator="\n", float_format="%.1f"))
    figure, ax = plt.subplots(figsize=(6, 4))
    if cv_patients is not None and cv_patients.is_file():
        scored = brightness.merge(pd.read_csv(cv_patients)[["patient_id", "dice_unet"]])
        rho = scored["flair_p99"].corr(scored["dice_unet"], method="spearman")
        ax.scatter(scored["flair_p99"], scored["dice_unet"], s=12)
        ax.set_ylabel(f"held-out U-Net Dice ({cv_patients.parent.name})")
        ax.set_title(f"{len(scored)} patients, Spearman rho {rho:.2f}")
    else:
        ax.hist(brightness["flair_p99"], bins=20)
        ax.set_ylabel("patients")
    ax.set_xlabel("FLAIR 99th percentile over the brain (of 255)")
    return save_figure(figure, out / "volume_brightness.png")


def write_eda_figures(manifest: str | os.PathLike, data_root: str | os.PathLike,
                      out_dir: str | os.PathLike, cv_patients: Path | None = None) -> list[str]:
    """Write the EDA PNGs (and ``volume_brightness.csv``) to ``out_dir``; returns the PNGs'
    paths."""
    table = read_manifest(manifest)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [_class_counts(table, out), _slices_per_patient(table, out), _tumour_area(table, out),
            _example_grid(table, Path(data_root), out),
            _brightness(table, Path(data_root), out, cv_patients)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=DataConfig.data_root)
    parser.add_argument("--manifest", default=DataConfig.manifest)
    parser.add_argument("--out", default="reports/eda")
    parser.add_argument("--cv-patients", type=Path, default=Path("reports/cv/fixed/patients.csv"),
                        help="a cross-validation's patients.csv: plot volume brightness against "
                             "its held-out U-Net Dice")


def run(args: argparse.Namespace) -> int:
    for path in write_eda_figures(args.manifest, args.data_dir, args.out, args.cv_patients):
        print(path)
    return 0
