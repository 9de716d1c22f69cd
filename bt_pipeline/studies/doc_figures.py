"""``make docs`` (``bt docs``): the figures the README and the model card quote, written from
the committed reports into each document between ``<!-- figures:start -->`` and
``<!-- figures:end -->``. Nobody types these figures: ``bt docs --check`` (and
``tests/test_doc_figures.py``) fails when a document's block differs from what its reports
give, so an edited figure or a newer report without ``make docs`` is caught.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from bt_pipeline.atomic import write_text_atomic
from bt_pipeline.training.cross_validation import SHIPPED_RECIPE

START, END = "<!-- figures:start -->", "<!-- figures:end -->"
#: The published reference the README compares with (Buda, Saha & Mazurowski 2019: 22-fold
#: CV over 110 patients; the paper's mean Dice, and its code's README's).
REFERENCE = "0.82 in the paper (0.836 in its code's README)"


def _mean_sem(path: Path, column: str = "dice_pipeline") -> tuple[float, float, int]:
    values = pd.read_csv(path)[column].dropna()
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values))), len(values)


def figures(root: Path) -> dict[str, object]:
    """Every figure the documents quote, from the reports under ``root``."""
    cv = root / "reports" / "cv" / SHIPPED_RECIPE / "intensity_volume_p99"
    before = root / "reports" / "cv" / "four_cycles" / "intensity_volume_p99"
    test = root / "reports" / "evaluation"
    external = pd.read_csv(root / "reports" / "external" / "brats2015_dev" / "shipped" /
                           "cases.csv")
    by_input = external.groupby("input")["dice"]
    found = {
        "cv": _mean_sem(cv / "patients.csv"), "cv_flair": _mean_sem(cv / "flair_only" /
                                                                     "patients.csv"),
        "cv_stripped": _mean_sem(cv / "stripped" / "patients.csv"),
        "before_cv": _mean_sem(before / "patients.csv"),
        "before_flair": _mean_sem(before / "flair_only" / "patients.csv"),
        "before_stripped": _mean_sem(before / "stripped" / "patients.csv"),
        "test": _mean_sem(test / "patients.csv"),
        "test_flair": _mean_sem(test / "flair_only" / "patients.csv"),
        "brats_all": (float(by_input.mean()["all sequences"]),
                      int(by_input.count()["all sequences"])),
        "brats_flair": float(by_input.mean()["FLAIR alone"]),
    }
    quality = root / "reports" / "quality" / "cases.csv"
    if quality.is_file():
        from scipy.stats import spearmanr

        table = pd.read_csv(quality)
        nested = table[(table["estimated_on"] == "nested cv") & (table["input"] == "as scanned")]
        poor, good = nested["dice"] < 0.7, nested["dice"] >= 0.8
        found["quality"] = (float(spearmanr(nested["predicted_dice"], nested["dice"]).statistic),
                            float(nested.loc[poor, "review"].mean()),
                            float(nested.loc[good, "review"].mean()))
    return found


def readme_block(f: dict) -> str:
    cv, flair, stripped, test = f["cv"], f["cv_flair"], f["cv_stripped"], f["test"]
    rows = [
        "| input | cross-validation: 86 development patients, each held out | test split: "
        f"{test[2]} patients |",
        "|---|---|---|",
        f"| LGG as scanned (FLAIR, T1, post-contrast T1) | **{cv[0]:.3f}** (SEM {cv[1]:.3f}) | "
        f"**{test[0]:.3f}** |",
        f"| LGG, FLAIR alone | {flair[0]:.3f} | {f['test_flair'][0]:.3f} |",
        f"| LGG, skull removed by brain masks (as BraTS data come) | {stripped[0]:.3f} | |",
        f"| BraTS 2015, {f['brats_all'][1]} external cases (skull-stripped, other scanners) | "
        f"{f['brats_all'][0]:.3f} with FLAIR and post-contrast T1, {f['brats_flair']:.3f} "
        "FLAIR alone | |",
        f"| published reference (Buda et al. 2019, 110 patients) | {REFERENCE} | |",
    ]
    if "quality" in f:
        spearman, poor, good = f["quality"]
        rows.append(f"| quality estimate (nested CV, as scanned) | Spearman {spearman:.2f} with "
                    f"the true Dice; flags {poor:.0%} of masks under 0.7, {good:.0%} of those "
                    "over 0.8 | |")
    return "\n".join(rows)


def model_card_block(f: dict) -> str:
    cv, flair, stripped = f["cv"], f["cv_flair"], f["cv_stripped"]
    report = f"../reports/cv/{SHIPPED_RECIPE}/intensity_volume_p99"
    return "\n".join([
        "| domain | data | whole pipeline mean Dice (`four_cycles`, shipped before) | report |",
        "|---|---|---|---|",
        f"| LGG with skull (the training collection) | 86 development patients, held out by "
        f"fold | {cv[0]:.3f} ({f['before_cv'][0]:.3f}) | [cv]({report}/summary.md) |",
        f"| LGG, FLAIR alone | the same 86 | {flair[0]:.3f} ({f['before_flair'][0]:.3f}) | "
        f"[cv]({report}/flair_only/summary.md) |",
        f"| LGG, skull removed by the brain masks | the same 86 | {stripped[0]:.3f} "
        f"({f['before_stripped'][0]:.3f}) | [cv]({report}/stripped/summary.md) |",
        f"| LGG test split (only reported) | {f['test'][2]} patients | {f['test'][0]:.3f}, "
        f"FLAIR alone {f['test_flair'][0]:.3f} | [evaluation](../reports/evaluation/summary.md) "
        "|",
        f"| BraTS 2015 (skull-stripped, 1 mm, other scanners, high-grade cases too) | "
        f"{f['brats_all'][1]} development cases | {f['brats_all'][0]:.3f} with FLAIR and "
        f"post-contrast T1, {f['brats_flair']:.3f} FLAIR alone | "
        "[external](../reports/external/brats2015_dev/shipped/summary.md) |"])


DOCUMENTS = {"README.md": readme_block, "docs/model-card.md": model_card_block}


def rendered(text: str, block: str) -> str:
    """``text`` with its figure block replaced by ``block``."""
    if text.count(START) != 1 or text.count(END) != 1:
        raise ValueError(f"expected one {START} ... {END} block")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{block}\n{END}{tail}"


def stale(root: Path) -> list[str]:
    """The documents whose figure block is not what the reports give."""
    found = figures(root)
    return [name for name, make in DOCUMENTS.items()
            if (root / name).read_text(encoding="utf-8") !=
            rendered((root / name).read_text(encoding="utf-8"), make(found))]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, default=Path("."),
                        help="the repository (documents and reports/)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when a document's figures differ from its "
                             "reports")


def run(args: argparse.Namespace) -> int:
    if args.check:
        differ = stale(args.root)
        for name in differ:
            print(f"{name}: figures differ from the reports; run make docs")
        return 1 if differ else 0
    found = figures(args.root)
    for name, make in DOCUMENTS.items():
        path = args.root / name
        write_text_atomic(path, rendered(path.read_text(encoding="utf-8"), make(found)))
        print(f"wrote the figures of {name}")
    return 0
