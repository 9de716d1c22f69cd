"""Matplotlib helpers shared by the reports: headless backend, atomic PNG output."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bt_pipeline.atomic import write_with  # noqa: E402


def save_figure(figure, path: str | os.PathLike, dpi: int = 110) -> str:
    """Save ``figure`` as PNG atomically, close it, return the path."""
    figure.tight_layout()
    write_with(path, lambda tmp: figure.savefig(tmp, dpi=dpi, format="png"), suffix=".png")
    plt.close(figure)
    return str(path)

