"""Per-patient outputs people can read: an overview PNG, a NIfTI mask volume, an HTML page."""

from __future__ import annotations

import html
import os
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pandas as pd

from bt_pipeline.atomic import write_text_atomic, write_with
from bt_pipeline.reports import draw_outline

PREDICTED_BGR = (0, 0, 255)  # red
TRUTH_BGR = (0, 255, 0)  # green
TILE = 192


def _tile(image_rgb: np.ndarray, predicted: np.ndarray, truth: np.ndarray | None,
          label: str) -> np.ndarray:
    tile = np.ascontiguousarray(image_rgb[..., ::-1])
    for mask, colour in ((truth, TRUTH_BGR), (predicted, PREDICTED_BGR)):
        if mask is not None and mask.any():
            tile = draw_outline(tile, mask, colour)
    tile = cv2.resize(tile, (TILE, TILE), interpolation=cv2.INTER_AREA)
    cv2.putText(tile, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1)
    return tile


def write_overview(path: str | os.PathLike, images: list[np.ndarray], masks: list[np.ndarray],
                   truths: list[np.ndarray] | None, numbers: list[int],
                   max_tiles: int = 16) -> None:
    """A grid of the slices with predicted (red) or true (green) tumour, outlines drawn.

    With no tumour anywhere, a few evenly spaced slices are shown under a banner saying so.
    """
    shown = [i for i in range(len(images))
             if masks[i].any() or (truths is not None and truths[i].any())]
    banner = None
    if not shown:
        shown = sorted(set(np.linspace(0, len(images) - 1, num=min(4, len(images))).astype(int)))
        banner = "no tumour detected"
    if len(shown) > max_tiles:
        shown = [shown[i] for i in np.linspace(0, len(shown) - 1, max_tiles).astype(int)]
    tiles = [_tile(images[i], masks[i], truths[i] if truths else None, f"#{numbers[i]}")
             for i in shown]
    columns = min(4, len(tiles))
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    grid = np.vstack([np.hstack(tiles[r:r + columns]) for r in range(0, len(tiles), columns)])
    legend = np.zeros((22, grid.shape[1], 3), np.uint8)
    text = banner or "red: predicted" + ("   green: ground truth" if truths else "")
    cv2.putText(legend, text, (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1)
    canvas = np.vstack([legend, grid])
    write_with(path, lambda tmp: _imwrite(tmp, canvas), suffix=".png")


def _imwrite(path: Path, array: np.ndarray) -> None:
    if not cv2.imwrite(str(path), array):
        raise OSError(f"{path}: could not write image")


def write_mask_png(path: str | os.PathLike, mask: np.ndarray) -> None:
    """uint8 {0, 255} PNG of a {0, 1} mask, written atomically."""
    write_with(path, lambda tmp: _imwrite(tmp, (mask > 0).astype(np.uint8) * 255), suffix=".png")


def write_mask_volume(path: str | os.PathLike, masks: list[np.ndarray]) -> None:
    """The patient's masks as a NIfTI volume (x = column, y = row, z = slice number order).

    The slices carry no voxel spacing, so the affine is the identity (1 mm voxels).
    """
    volume = np.stack([(m > 0).astype(np.uint8) for m in masks], axis=-1).transpose(1, 0, 2)
    image = nib.Nifti1Image(volume, affine=np.eye(4))
    image.header.set_data_dtype(np.uint8)
    write_with(path, lambda tmp: nib.save(image, str(tmp)), suffix=".nii.gz")


def write_html_report(path: Path, patients: pd.DataFrame, problems: pd.DataFrame,
                      title: str = "bt_pipeline report") -> None:
    """One page: the per-patient table, every overview image, and the skipped inputs."""
    esc = html.escape
    detected = int(patients["tumor_detected"].sum()) if "tumor_detected" in patients else 0
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "img{max-width:100%;margin:.5em 0}</style></head><body>",
             f"<h1>{esc(title)}</h1>",
             f"<p>{len(patients)} patient(s); {detected} with tumour detected. Files: "
             "<a href='patients.csv'>patients.csv</a>, <a href='slices.csv'>slices.csv</a>, "
             "<a href='errors.csv'>errors.csv</a>.</p>"]
    if not patients.empty:
        table = patients.copy()
        table["patient_id"] = [f"<a href='#{esc(p)}'>{esc(p)}</a>" for p in table["patient_id"]]
        parts.append(table.to_html(index=False, escape=False, float_format=lambda v: f"{v:.3f}"))
    if not problems.empty:
        parts.append(f"<h2>Inputs not used ({len(problems)})</h2>")
        parts.append(problems.to_html(index=False))
    for patient in patients["patient_id"] if not patients.empty else []:
        pid = esc(patient)
        parts.append(f"<h2 id='{pid}'>{pid}</h2><p><a href='{pid}/mask.nii.gz'>mask.nii.gz</a>"
                     f"</p><img src='{pid}/overview.png' alt='overview of {pid}'>")
    parts.append("</body></html>")
    write_text_atomic(path, "\n".join(parts) + "\n")
