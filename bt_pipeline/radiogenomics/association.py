"""Shape features against genomic subtypes: the dataset's ``data.csv`` and Fisher's exact test.

Buda et al. (2019) tested each pair of imaging feature and genomic subtype with Fisher's exact
test, counted 10 hypotheses per pair and used a Bonferroni correction (p < 0.005 significant).
Its 10 hypotheses per pair are not reproduced here; instead each feature is split at its
median over the patients tested (above / not above), and the subtype's clusters against the
two halves form one k x 2 table, tested with Fisher's exact test (its Freeman-Halton form for
more than two clusters, by exact enumeration).
Each row reports the raw p, whether it is under the paper's 0.005, and a Bonferroni-adjusted p
over every pair of the table, the stricter family this report actually tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import special

#: data.csv columns holding a genomic subtype (cluster numbers), in the paper's order.
SUBTYPES = ("RNASeqCluster", "MethylationCluster", "miRNACluster", "CNCluster", "RPPACluster",
            "OncosignCluster", "COCCluster")
#: The paper's per-test significance level (0.05 over its 10 hypotheses per pair).
PAPER_ALPHA = 0.005


def read_subtypes(data_csv: str | Path) -> pd.DataFrame:
    """The subtype columns of the dataset's ``data.csv``, indexed by its short patient id
    (``TCGA_CS_4941``); missing clusters stay NaN."""
    path = Path(data_csv)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no data.csv (it ships in the dataset's kaggle_3m "
                                "folder)")
    table = pd.read_csv(path)
    missing = [c for c in ("Patient", *SUBTYPES) if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(missing)}")
    return table.set_index("Patient")[list(SUBTYPES)]


def short_id(patient_id: str) -> str:
    """``TCGA_CS_4941_19960909`` -> ``TCGA_CS_4941``, the key of data.csv."""
    return "_".join(patient_id.split("_")[:3])


def _log_choose(n, k):
    return special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1)


def fisher_exact_k_by_2(table: np.ndarray) -> float:
    """Two-sided p of Fisher's exact test (Freeman-Halton form) for a k x 2 table of counts: the
    total probability, under fixed margins, of every table no more probable than this one.
    Exact enumeration: SciPy computes 2 x 2 exactly but larger tables by Monte Carlo, whose
    resolution and run-to-run noise sit at the paper's 0.0002."""
    table = np.asarray(table, dtype=np.int64)
    rows, first = table.sum(axis=1), int(table[:, 0].sum())
    sums, logs = np.zeros(1, np.int64), np.zeros(1)
    for i, size in enumerate(rows):
        counts = np.arange(size + 1)
        sums = (sums[:, None] + counts).ravel()
        logs = (logs[:, None] + _log_choose(size, counts)).ravel()
        still_reachable = (sums <= first) & (sums + rows[i + 1:].sum() >= first)
        sums, logs = sums[still_reachable], logs[still_reachable]
    observed = _log_choose(rows, table[:, 0]).sum()
    total = _log_choose(rows.sum(), first)
    return float(min(1.0, np.exp(logs[logs <= observed + 1e-7] - total).sum()))


def fisher_test(feature: pd.Series, subtype: pd.Series) -> dict[str, float]:
    """Fisher's exact test of ``subtype`` (categories) against ``feature`` split at its median,
    over the patients that have both. Returns n, clusters and p (NaN if under 2 clusters)."""
    both = pd.concat([feature.rename("feature"), subtype.rename("subtype")], axis=1).dropna()
    high = both["feature"] > both["feature"].median()
    table = pd.crosstab(both["subtype"], high).reindex(columns=[False, True], fill_value=0)
    table = table[table.sum(axis=1) > 0]
    p = float("nan")
    if len(table) >= 2 and (table.sum(axis=0) > 0).all():
        p = fisher_exact_k_by_2(table.to_numpy())
    return {"n": len(both), "clusters": len(table), "p": p}


def association_table(features: pd.DataFrame, subtypes: pd.DataFrame,
                      feature_names: tuple[str, ...]) -> pd.DataFrame:
    """One row per (subtype, feature): n, clusters, p, ``p < PAPER_ALPHA`` and the Bonferroni p
    over every row. ``features`` and ``subtypes`` share an index (patients)."""
    rows = []
    for subtype in subtypes.columns:
        for name in feature_names:
            rows.append({"subtype": subtype, "feature": name,
                         **fisher_test(features[name], subtypes[subtype])})
    table = pd.DataFrame(rows)
    tested = table["p"].notna().sum()
    table["significant_at_paper_alpha"] = table["p"] < PAPER_ALPHA
    table["p_bonferroni"] = np.minimum(table["p"] * tested, 1.0)
    return table
