"""``bt brain-masks`` (``make brain-masks``): a brain mask for every patient of the manifest,
written once and committed, with each patient's tumour coverage and a montage to check by eye.

    reports/brain_masks/brain_masks.npz   patient -> bool (slices, 256, 256), bits packed
    reports/brain_masks/coverage.csv      per patient: annotated tumour voxels inside the mask
    reports/brain_masks/montage.png       three slices each of ten patients, outlines drawn
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from bt_pipeline.atomic import write_text_atomic, write_with
from bt_pipeline.config import DataConfig
from bt_pipeline.data.brain_mask import BRAIN_MASKS, brain_mask, save_masks
from bt_pipeline.data.manifest import read_manifest
from bt_pipeline.data.preprocess import read_image, read_mask

#: Share of each patient's annotated tumour voxels a brain mask must keep.
MIN_COVERAGE = 0.995
#: Patients in the montage (spread over institutions by taking every tenth).
MONTAGE_PATIENTS = 10


def patient_volume(root: Path, rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """One patient's slices (N, H, W, 3) uint8 and truth (N, H, W) bool, in slice order."""
    rows = rows.sort_values("slice")
    images = np.stack([read_image(root / p) for p in rows["image"]])
    truths = np.stack([read_mask(root / p).astype(bool) for p in rows["mask"]])
    return images, truths


def coverage_row(patient: str, mask: np.ndarray, truth: np.ndarray) -> dict:
    tumour = int(truth.sum())
    kept = int((truth & mask).sum())
    return {"patient_id": patient, "slices": len(mask), "brain_voxels": int(mask.sum()),
            "tumour_voxels": tumour, "tumour_inside": kept,
            "coverage": kept / tumour if tumour else 1.0}


def montage(root: Path, manifest: pd.DataFrame, masks: dict[str, np.ndarray]) -> np.ndarray:
    """Three slices (a quarter, half and three quarters up) of every tenth patient: brain
    outline green, tumour red, on the slice's RGB."""
    from bt_pipeline.reports import draw_outline

    patients = sorted(masks)[::max(1, len(masks) // MONTAGE_PATIENTS)][:MONTAGE_PATIENTS]
    rows = []
    for patient in patients:
        images, truths = patient_volume(root, manifest[manifest["patient_id"] == patient])
        n = len(images)
        tiles = []
        for k in (n // 4, n // 2, 3 * n // 4):
            tile = draw_outline(images[k], masks[patient][k], (0, 255, 0))
            tiles.append(draw_outline(tile, truths[k], (255, 0, 0)))
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)


def add_arguments_brain_masks(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=DataConfig.data_root)
    parser.add_argument("--manifest", default=DataConfig.manifest)
    parser.add_argument("--out", type=Path, default=BRAIN_MASKS,
                        help="the masks (.npz); coverage.csv and montage.png go beside it")


def run_brain_masks(args: argparse.Namespace) -> int:
    import cv2

    root, manifest = Path(args.data_dir), read_manifest(args.manifest)
    masks, coverage = {}, []
    for patient, rows in tqdm(manifest.groupby("patient_id", sort=True), desc="brain masks",
                              unit="patient"):
        images, truths = patient_volume(root, rows)
        masks[patient] = brain_mask(images)
        coverage.append(coverage_row(patient, masks[patient], truths))
    table = pd.DataFrame(coverage)
    save_masks(masks, args.out)
    write_text_atomic(args.out.parent / "coverage.csv",
                      table.to_csv(index=False, lineterminator="\n", float_format="%.6f"))
    picture = cv2.cvtColor(montage(root, manifest, masks), cv2.COLOR_RGB2BGR)
    write_with(args.out.parent / "montage.png",
               lambda tmp: cv2.imwrite(str(tmp), picture), suffix=".png")
    low = table[table["coverage"] < MIN_COVERAGE]
    print(f"{len(table)} patients; tumour coverage min {table['coverage'].min():.4f}, "
          f"median {table['coverage'].median():.4f}; below {MIN_COVERAGE}: {len(low)} "
          f"{list(low['patient_id'])}")
    print(f"wrote {args.out}, coverage.csv, montage.png")
    return 0
