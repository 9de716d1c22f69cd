"""What every written report shares: Markdown tables, a summary page, headless figures saved
atomically, and mask outlines drawn on a slice."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from bt_pipeline.atomic import write_text_atomic, write_with


def __getattr__(name: str):
    """``plt``: matplotlib's pyplot on the headless Agg backend, imported on first use so that
    the modules that only draw outlines or tables (inference) do not pay for it."""
    if name != "plt":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def shown_path(path: str | os.PathLike | None) -> str:
    """A path as a committed report shows it: relative to the working folder when under it, so
    that the report does not change with where the repository sits."""
    if path is None:
        return ""
    path = Path(path).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of ``table`` (index dropped)."""
    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "---|" * len(table.columns)
    body = ["| " + " | ".join(map(str, row)) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def write_summary(path: str | os.PathLike, title: str, intro: list[str],
                  tables: dict[str, pd.DataFrame], figures: list[str] = (),
                  titles: dict[str, str] | None = None) -> None:
    """``summary.md``: a title, intro lines, one section per table (rounded to 4 places) and
    the figures, written atomically."""
    titles = titles or {}
    lines = [f"# {title}", "", *intro, ""]
    for name, table in tables.items():
        lines += [f"## {titles.get(name, name)}", "", markdown_table(table.round(4)), ""]
    lines += [f"![{Path(f).stem}]({Path(f).name})" for f in figures]
    write_text_atomic(path, "\n".join(lines) + "\n")


def save_figure(figure, path: str | os.PathLike, dpi: int = 110) -> str:
    """Save ``figure`` as PNG atomically, close it, return the path."""
    figure.tight_layout()
    write_with(path, lambda tmp: figure.savefig(tmp, dpi=dpi, format="png"), suffix=".png")
    __getattr__("plt").close(figure)
    return str(path)


def draw_outline(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int],
                 thickness: int = 1) -> np.ndarray:
    """Copy of a uint8 colour image with the outline of the binary ``mask`` drawn in
    ``colour`` (given in the image's own channel order)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_NONE)
    out = np.ascontiguousarray(image.copy())
    cv2.drawContours(out, contours, -1, colour, thickness)
    return out
