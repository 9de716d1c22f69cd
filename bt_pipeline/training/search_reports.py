"""A Keras Tuner search's reports: the trials table, the best hyperparameters, the top ten."""

from __future__ import annotations

import json
from pathlib import Path

import keras_tuner
import pandas as pd

from bt_pipeline.atomic import write_text_atomic
from bt_pipeline.reports import markdown_table


def trials_table(tuner: keras_tuner.Tuner, objective: str = "val_accuracy",
                 extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per trial: id, every hyperparameter, the mean objective and val loss over its
    executions, the ``extra`` metrics its ``run_trial`` reported, status, seconds."""
    rows = []
    for trial in tuner.oracle.trials.values():
        metrics = trial.metrics
        values = {name: round(value, 6) if isinstance(value, float) else value
                  for name, value in trial.hyperparameters.values.items()}
        row = {"trial_id": trial.trial_id, **values}
        for name in (objective, "val_loss", *extra, "seconds"):
            row[name] = metrics.get_last_value(name) if metrics.exists(name) else float("nan")
        row["status"] = trial.status
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.sort_values("trial_id").reset_index(drop=True) if rows else table


def write_search_reports(table: pd.DataFrame, best_hparams: dict, out_dir: Path,
                         settings: dict, objective: str = "val_accuracy") -> None:
    """``trials.csv``, ``best_hparams.json`` and a readable ``top10.md`` under ``out_dir``."""
    write_text_atomic(out_dir / "trials.csv", table.to_csv(index=False, lineterminator="\n"))
    write_text_atomic(out_dir / "best_hparams.json",
                      json.dumps({"hyperparameters": best_hparams, "search": settings},
                                 indent=2, sort_keys=True) + "\n")
    done = table[table["status"] == "COMPLETED"]
    top = done.sort_values([objective, "val_loss"], ascending=[False, True]).head(10)
    lines = [f"# Top {len(top)} of {len(done)} completed trials (objective: "
             f"{objective.replace('_', ' ')})", "",
             f"Search: {json.dumps(settings, sort_keys=True)}", "",
             markdown_table(top.round(4))]
    write_text_atomic(out_dir / "top10.md", "\n".join(lines) + "\n")
