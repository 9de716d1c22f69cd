"""Synthetic patients in the Kaggle layout, for fast tests that need no dataset.

Each patient is a small volume of RGB slices (pre-contrast, FLAIR, post-contrast) showing an
elliptical "head"; a run of middle slices carries an elliptical lesion that is bright in the
FLAIR channel, with its binary mask beside it (``<patient>_<n>_mask.tif``).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

INSTITUTIONS = ("CS", "DU", "FG", "HT")


def _ellipse(size: int, centre, axes, angle: float) -> np.ndarray:
    canvas = np.zeros((size, size), np.uint8)
    cv2.ellipse(canvas, centre, axes, angle, 0, 360, 1, thickness=-1)
    return canvas


def _slice(rng: np.random.Generator, size: int, lesion: np.ndarray | None) -> np.ndarray:
    head = _ellipse(size, (size // 2, size // 2), (int(size * 0.38), int(size * 0.45)), 0)
    rgb = np.zeros((size, size, 3), np.float32)
    for channel, level in enumerate((70, 90, 80)):
        rgb[..., channel] = head * (level + rng.normal(0, 6, (size, size)))
    if lesion is not None:
        rgb[..., 1] += lesion * 120  # FLAIR hyperintensity
        rgb[..., 2] += lesion * 30
    return np.clip(rgb, 0, 255).astype(np.uint8)


def write_patient(root: Path, patient_id: str, rng: np.random.Generator, n_slices: int,
                  size: int, ext: str = ".tif") -> Path:
    """Write one synthetic patient folder; returns it."""
    folder = root / patient_id
    folder.mkdir(parents=True, exist_ok=True)
    first = n_slices // 3
    last = max(first, n_slices - n_slices // 3 - 1)
    low, high = int(size * 0.35), int(size * 0.65)
    centre = (int(rng.integers(low, high)), int(rng.integers(low, high)))
    axes = (int(rng.integers(size // 10, size // 6)), int(rng.integers(size // 10, size // 6)))
    angle = float(rng.uniform(0, 180))
    for number in range(1, n_slices + 1):
        lesion = _ellipse(size, centre, axes, angle) if first < number <= last + 1 else None
        image = _slice(rng, size, lesion)
        mask = (lesion if lesion is not None else np.zeros((size, size), np.uint8)) * 255
        stem = folder / f"{patient_id}_{number}"
        cv2.imwrite(f"{stem}{ext}", image[..., ::-1])  # OpenCV writes BGR
        cv2.imwrite(f"{stem}_mask{ext}", mask)
    return folder


def make_synthetic_dataset(root: str | os.PathLike, n_patients: int = 8, n_slices: int = 9,
                           size: int = 64, seed: int = 0, ext: str = ".tif") -> Path:
    """Write ``n_patients`` synthetic patients under ``root/kaggle_3m``; returns that folder."""
    rng = np.random.default_rng(seed)
    base = Path(root) / "kaggle_3m"
    for index in range(n_patients):
        institution = INSTITUTIONS[index % len(INSTITUTIONS)]
        patient_id = f"TCGA_{institution}_{1000 + index}_2000010{index % 9 + 1}"
        write_patient(base, patient_id, rng, n_slices, size, ext)
    return base
