"""Matplotlib helpers shared by the reports: headless backend, atomic PNG output, outlines."""

from __future__ import annotations

import os

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bt_pipeline.atomic import write_with  # noqa: E402


def save_figure(figure, path: str | os.PathLike, dpi: int = 110) -> str:
    """Save ``figure`` as PNG atomically, close it, return the path."""
    figure.tight_layout()
    write_with(path, lambda tmp: figure.savefig(tmp, dpi=dpi, format="png"), suffix=".png")
    plt.close(figure)
    return str(path)


def draw_outline(image_rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int],
                 thickness: int = 1) -> np.ndarray:
    """Copy of a uint8 RGB image with the outline of the binary ``mask`` drawn in ``colour``."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_NONE)
    out = np.ascontiguousarray(image_rgb.copy())
    cv2.drawContours(out, contours, -1, colour, thickness)
    return out
