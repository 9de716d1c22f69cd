"""Stage 1 on the U-Net's encoder (``bt tune --gate``), searched and scored by the
cross-validation: RandomSearch over the gate's head and how many trunk blocks fine-tune, each
trial trained once per trained fold of a U-Net recipe on that fold's own U-Net trunk and judged
on the fold's held-out patients, whom neither the trunk nor the head saw.

The winner is then trained at the search's best epoch count (a fixed schedule, no early
stopping on the patients it is judged on): once per fold, giving every development patient a
held-out gate probability, from which the threshold is chosen; and once on the shipped U-Net's
trunk over every development patient, which ships with that threshold (``--folds-only``
stops before it: a candidate recipe's cross-validation needs only the folds' gates). Test
patients are only scored.

The frozen part of a trunk never changes, so its output for every slice is computed once per
fold and cut and each trial trains only what lies above it. Trunk features carry no
augmentation; the head's dropout stands in for it.

    <cv-dir>/<recipe>/models/gate_fold<k>.keras   fold k's gate (on fold k's U-Net)
    <cv-dir>/<recipe>/gate_heldout.csv            every development slice's held-out probability
    <out-dir>/trials.csv, top10.md, best_hparams.json, gate_metrics.csv
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import keras_tuner
import numpy as np
import pandas as pd

from bt_pipeline.atomic import write_text_atomic
from bt_pipeline.config import GateConfig, Preprocessing, UNetConfig, load_json
from bt_pipeline.data.loader import SplitArrays, load_rows
from bt_pipeline.data.manifest import N_FOLDS, NO_FOLD, read_manifest
from bt_pipeline.evaluation.metrics import classification_metrics
from bt_pipeline.models.batch_norm import with_fused_batch_norm
from bt_pipeline.models.gate import Gate, build_gate_from_config, cut_layer_name, fingerprint
from bt_pipeline.training.callbacks import ship_model
from bt_pipeline.training.cross_validation import RECIPES, fold_gate, fold_model
from bt_pipeline.training.search_reports import trials_table, write_search_reports
from bt_pipeline.training.train_classifier import choose_threshold

DENSE_ACTIVATIONS = ["relu", "sigmoid", "tanh", "elu"]
#: Trunk blocks that may fine-tune: the bottleneck (1) at most; deeper cuts cost minutes per
#: epoch on 2 cores. Even with the bottleneck training, a head's epoch over 2,500 slices took
#: 14 s against 0.35 s for a frozen trunk's (2 cores shared with a training run): about 40x, so
#: ``--fine-tune-choices 0`` is how a small machine affords the full budget over five folds.
FINE_TUNE_CHOICES = (0, 1)


def gate_kwargs_from_hp(hp: keras_tuner.HyperParameters,
                        fine_tune_choices=FINE_TUNE_CHOICES) -> dict:
    """Map hyperparameters to GateConfig fields (the builder's arguments and the LR)."""
    dropout = dict(min_value=0.0, max_value=0.5, step=0.05, default=0.2)
    return {
        "fine_tune_blocks": hp.Choice("fine_tune_blocks", list(fine_tune_choices),
                                      default=min(fine_tune_choices)),
        "feature_dropout": hp.Float("dropout_features", **dropout),
        "dense_dropout": hp.Float("dropout_dense", **dropout),
        "dense_units": hp.Int("dense_units", 32, 512, step=32, default=128),
        "dense_activation": hp.Choice("dense_activation", DENSE_ACTIVATIONS, default="relu"),
        "learning_rate": hp.Float("learning_rate", 1e-4, 1e-2, sampling="log", default=1e-3),
    }


def compile_head(gate: Gate, learning_rate: float) -> keras.Model:
    gate.head.compile(optimizer=keras.optimizers.Adam(learning_rate),
                      loss="binary_crossentropy",
                      metrics=[keras.metrics.BinaryAccuracy(name="accuracy"),
                               keras.metrics.AUC(name="auc")])
    return gate.head


@dataclass
class Trunk:
    """A U-Net whose encoder a gate sits on, and which slices (indices into the arrays) its
    head trains on and is judged on; ``held_out`` is empty for the shipped trunk."""

    name: str
    unet: keras.Model
    train: np.ndarray
    held_out: np.ndarray
    fold: int = NO_FOLD


class GateHyperModel(keras_tuner.HyperModel):
    """``build(hp)`` only turns ``hp`` into the gate builder's arguments; it returns the part
    that trains (fine-tuned blocks and head), fed by cached trunk features. The trunk is the
    first fold's unless :meth:`head` names another."""

    def __init__(self, trunks: list[Trunk], config: GateConfig,
                 fine_tune_choices=FINE_TUNE_CHOICES):
        super().__init__(name="encoder_gate")
        self.trunks, self.config, self.fine_tune_choices = trunks, config, fine_tune_choices

    def head(self, hp: keras_tuner.HyperParameters, unet: keras.Model) -> keras.Model:
        config = dataclasses.replace(self.config,
                                     **gate_kwargs_from_hp(hp, self.fine_tune_choices))
        return compile_head(build_gate_from_config(unet, config), config.learning_rate)

    def build(self, hp: keras_tuner.HyperParameters) -> keras.Model:
        return self.head(hp, self.trunks[0].unet)


class TrunkFeatures:
    """Every slice's output of each trunk at each cut, computed on first use and kept; with
    skull-stripped copies of the slices (``arrays.stripped``), theirs too."""

    def __init__(self, arrays: SplitArrays, batch_size: int = 32):
        self.arrays, self.batch_size = arrays, batch_size
        self._cache: dict[tuple[str, int, bool], np.ndarray] = {}

    def get(self, trunk: Trunk, fine_tune_blocks: int, stripped: bool = False) -> np.ndarray:
        key = (trunk.name, fine_tune_blocks, stripped)
        if key not in self._cache:
            cut = trunk.unet.get_layer(cut_layer_name(trunk.unet, fine_tune_blocks))
            encoder = keras.Model(trunk.unet.inputs, cut.output)
            images = self.arrays.stripped if stripped else self.arrays.images
            self._cache[key] = encoder.predict(images, batch_size=self.batch_size, verbose=0)
        return self._cache[key]

    def training(self, trunk: Trunk, fine_tune_blocks: int) -> tuple[np.ndarray, np.ndarray]:
        """Features and labels the head trains on: the trunk's training slices, and their
        skull-stripped copies too where the arrays have them."""
        features = [self.get(trunk, fine_tune_blocks)[trunk.train]]
        labels = [self.arrays.labels[trunk.train]]
        if self.arrays.stripped is not None:
            features.append(self.get(trunk, fine_tune_blocks, stripped=True)[trunk.train])
            labels.append(labels[0])
        return np.concatenate(features), np.concatenate(labels)


class GateSearch(keras_tuner.RandomSearch):
    """RandomSearch whose trials train a head per fold on that fold's cached trunk features for
    ``epochs`` epochs, ``executions_per_trial`` times, and report the held-out ROC AUC curve
    averaged over folds and executions: its best value (``val_auc``), the epoch it is reached
    (``best_epoch``, what the winner is then trained for) and the trial's wall time."""

    def __init__(self, hypermodel: GateHyperModel, features: TrunkFeatures, *, seed: int,
                 **kwargs):
        super().__init__(hypermodel, seed=seed, **kwargs)
        self.features, self.search_seed = features, seed

    def run_trial(self, trial, epochs: int, batch_size: int, verbose="auto"):
        started, curves, losses = time.monotonic(), [], []
        k = trial.hyperparameters.get("fine_tune_blocks")
        labels = self.features.arrays.labels
        for trunk in self.hypermodel.trunks:
            features = self.features.get(trunk, k)
            for execution in range(self.executions_per_trial):
                keras.utils.set_random_seed(self.search_seed + 10 * int(trial.trial_id)
                                            + execution)
                head = self.hypermodel.head(trial.hyperparameters, trunk.unet)
                history = head.fit(features[trunk.train], labels[trunk.train],
                                   validation_data=(features[trunk.held_out],
                                                    labels[trunk.held_out]),
                                   epochs=epochs, batch_size=batch_size, shuffle=True,
                                   verbose=verbose)
                curves.append(history.history["val_auc"])
                losses.append(history.history["val_loss"])
        curve = np.mean(curves, axis=0)
        best = int(np.argmax(curve))
        return {"val_auc": float(curve[best]), "val_loss": float(np.mean(losses, axis=0)[best]),
                "best_epoch": best + 1, "val_auc_last_epoch": float(curve[-1]),
                "seconds": time.monotonic() - started, "epochs": epochs,
                "executions": self.executions_per_trial, "folds": len(self.hypermodel.trunks)}

    def save_model(self, trial_id, model, step=0):  # the best configuration is retrained
        pass


def train_gate(trunk: Trunk, config: GateConfig, features: TrunkFeatures,
               verbose="auto") -> Gate:
    """``config``'s gate on ``trunk``, its head trained on the trunk's training slices for
    ``config.epochs`` epochs (a fixed schedule: nothing is watched)."""
    keras.utils.set_random_seed(config.seed)
    gate = build_gate_from_config(trunk.unet, config)
    head = compile_head(gate, config.learning_rate)
    inputs, labels = features.training(trunk, config.fine_tune_blocks)
    head.fit(inputs, labels, epochs=config.epochs, batch_size=config.batch_size, shuffle=True,
             verbose=verbose)
    return gate


def _probabilities(gate: Gate, trunk: Trunk, config: GateConfig, features: TrunkFeatures,
                   indices: np.ndarray) -> np.ndarray:
    cached = features.get(trunk, config.fine_tune_blocks)[indices]
    return gate.head.predict(cached, batch_size=256, verbose=0).ravel()


def load_trunk(path: Path) -> keras.Model:
    """A saved U-Net whose encoder a gate is built on (batch norm through the fused kernel)."""
    return with_fused_batch_norm(keras.saving.load_model(path, compile=False))


def trained_folds(cv_dir: Path, recipe: str) -> list[int]:
    """The folds of ``recipe`` whose U-Net is trained; the gate is searched on them."""
    folds = [fold for fold in range(N_FOLDS) if fold_model(cv_dir, recipe, fold).is_file()]
    if not folds:
        raise FileNotFoundError(f"{fold_model(cv_dir, recipe, 0).parent}: no fold U-Net of "
                                f"recipe {recipe!r} is trained; the gate is searched on them "
                                f"(make cv CV_RECIPE={recipe})")
    return folds


def fold_trunks(rows: pd.DataFrame, recipe: str, cv_dir: Path) -> list[Trunk]:
    """A trunk per trained fold of ``recipe``: that fold's U-Net, its head trained on the other
    folds' slices (``rows``: every manifest row, in the arrays' order) and judged on the
    fold's own."""
    folds = rows["fold"].to_numpy()
    return [Trunk(f"fold{fold}", load_trunk(fold_model(cv_dir, recipe, fold)),
                  np.flatnonzero((folds != fold) & (folds != NO_FOLD)),
                  np.flatnonzero(folds == fold), fold)
            for fold in trained_folds(cv_dir, recipe)]


def cross_validated_gates(trunks: list[Trunk], config: GateConfig, features: TrunkFeatures,
                          cv_dir: Path, recipe: str,
                          verbose="auto") -> tuple[pd.DataFrame, float]:
    """Train ``config``'s gate on every fold's trunk; every development slice's held-out
    probability; the threshold chosen on them by the sensitivity rule. Each fold's gate ships
    as ``gate_fold<k>.keras`` beside its U-Net, with that threshold."""
    rows, parts, gates = features.arrays.rows, [], []
    for trunk in trunks:
        gates.append(train_gate(trunk, config, features, verbose))
        parts.append(rows.iloc[trunk.held_out][["patient_id", "slice", "fold", "has_tumor"]]
                     .assign(gate_probability=_probabilities(gates[-1], trunk, config, features,
                                                             trunk.held_out)))
    held_out = pd.concat(parts, ignore_index=True)
    threshold = choose_threshold(held_out["has_tumor"], held_out["gate_probability"],
                                 config.min_val_sensitivity)
    for trunk, gate in zip(trunks, gates, strict=True):
        ship_model(gate.full, fold_gate(cv_dir, recipe, trunk.fold),
                   dataclasses.replace(config, threshold=threshold,
                                       unet_fingerprint=fingerprint(trunk.unet)),
                   {"trunk": f"{trunk.name}.keras", "threshold_chosen_on": "cv held-out"})
    return held_out, threshold


def search_name(recipe: str, intensity: str) -> str:
    """The Keras Tuner project of a search: one per U-Net recipe and intensity rule, so that a
    rerun resumes its own trials and never reuses another rule's."""
    return f"gate_{recipe}" if intensity == "raw" else f"gate_{recipe}_{intensity}"


def _fed_as(unet_path: Path | None, cv_dir: Path, recipe: str) -> Preprocessing:
    """What the gate is fed: what its U-Net is fed, read from the shipped U-Net's JSON or,
    without one, from the recipe's first trained fold's."""
    if unet_path is None:
        unet_path = fold_model(cv_dir, recipe, trained_folds(cv_dir, recipe)[0])
    elif not Path(unet_path).is_file():
        raise FileNotFoundError(f"{unet_path}: no trained U-Net; the gate is built on one, so "
                                "train it first (make train-unet), then make tune")
    return load_json(Path(unet_path).with_suffix(".json"), UNetConfig).preprocessing


def run_gate_tuning(data_config, recipe: str, cv_dir: Path, unet_path: Path | None,
                    out_dir: Path, work_dir: Path, trials: int, epochs: int, executions: int,
                    ship_to: Path | None, verbose="auto",
                    fine_tune_choices=FINE_TUNE_CHOICES,
                    retrain_from: Path | None = None,
                    shipped_only: bool = False) -> pd.DataFrame:
    """The whole of ``bt tune --gate``: search on the folds, the winner trained per fold
    (held-out probabilities, threshold) and on the shipped U-Net ``unet_path`` (shipped to
    ``ship_to``), scores. With ``unet_path`` None only the folds' gates are trained, which is
    all a candidate recipe's cross-validation needs. ``retrain_from`` (an earlier gate's JSON)
    skips the search: its head's hyperparameters and epochs are trained on these trunks
    (``shipped_only``: on the shipped trunk alone, the folds' gates kept as trained). A
    recipe that trained with skull-stripped slices (``skull_strip_p``) gives its gates'
    heads the stripped copies of their training slices too. Returns the metrics table."""
    preprocessing = _fed_as(unet_path, cv_dir, recipe)
    # the gate reads the U-Net's encoder, so it is fed what the U-Net is fed: every
    # preprocessing field (size, context, denoising, intensity rule)
    fed_as_unet = dataclasses.asdict(preprocessing)
    data_config = dataclasses.replace(data_config, **fed_as_unet,
                                      skull_strip_p=_strip_share(recipe))
    manifest = read_manifest(data_config.manifest)
    arrays = load_rows(manifest, data_config)
    trunks = fold_trunks(arrays.rows, recipe, cv_dir)
    base = GateConfig(**fed_as_unet, epochs=epochs, seed=data_config.seed)
    features = TrunkFeatures(arrays)
    if retrain_from is not None:
        return _retrained(retrain_from, base, trunks, features, data_config, recipe, cv_dir,
                          unet_path, out_dir, ship_to, verbose, shipped_only)
    tuner = GateSearch(GateHyperModel(trunks, base, fine_tune_choices), features, seed=base.seed,
                       objective=keras_tuner.Objective("val_auc", "max"), max_trials=trials,
                       executions_per_trial=executions, directory=str(work_dir),
                       project_name=search_name(recipe, preprocessing.intensity),
                       overwrite=False)
    started = time.monotonic()
    tuner.search(epochs=epochs, batch_size=base.batch_size, verbose=verbose)
    best_trial = tuner.oracle.get_best_trials(1)[0]
    table = trials_table(tuner, objective="val_auc",
                         extra=("best_epoch", "val_auc_last_epoch", "epochs", "executions",
                                "folds"))
    trial_seconds = round(float(table["seconds"].sum()), 1)
    config = dataclasses.replace(base, **gate_kwargs_from_hp(best_trial.hyperparameters,
                                                             fine_tune_choices),
                                 epochs=int(best_trial.metrics.get_last_value("best_epoch")))
    write_search_reports(table, best_trial.hyperparameters.values, out_dir, {
        "trials": trials, "epochs_per_trial": epochs, "executions_per_trial": executions,
        "folds": [t.name for t in trunks], "recipe": recipe,
        "intensity": preprocessing.intensity,
        "fine_tune_choices": list(fine_tune_choices), "objective": "val_auc (held-out "
        "ROC AUC averaged over folds and executions, best epoch)", "seed": base.seed,
        "trial_seconds_total": trial_seconds}, objective="val_auc")
    held_out, threshold = cross_validated_gates(trunks, config, features, cv_dir, recipe,
                                                verbose)
    write_text_atomic(Path(cv_dir) / recipe / "gate_heldout.csv",
                      held_out.to_csv(index=False, lineterminator="\n", float_format="%.6f"))
    metrics = _heldout_metrics(held_out, trunks, threshold)
    if unet_path is not None:
        extra = {"data": dataclasses.asdict(data_config), "trunk": Path(unet_path).name,
                 "cv_recipe": recipe, "threshold_chosen_on": "cv held-out",
                 # a search resumed from its Keras Tuner project reruns no finished trial, so
                 # this call's wall time alone undercounts it; the trials' own seconds do not
                 "trial_seconds_total": trial_seconds}
        metrics = _shipped_gate(unet_path, dataclasses.replace(config, threshold=threshold),
                                features, metrics, ship_to, verbose, extra, started)
    write_text_atomic(out_dir / "gate_metrics.csv",
                      metrics.to_csv(index=False, lineterminator="\n", float_format="%.4f"))
    return metrics


def _heldout_metrics(held_out: pd.DataFrame, trunks: list[Trunk],
                     threshold: float) -> pd.DataFrame:
    """The metrics table's row for the folds' held-out probabilities at ``threshold``."""
    return pd.DataFrame([
        {"patients": f"cv held-out ({held_out['patient_id'].nunique()}, folds "
                     f"{','.join(str(t.fold) for t in trunks)})",
         **classification_metrics(held_out["has_tumor"], held_out["gate_probability"],
                                  threshold)}])


def _strip_share(recipe: str) -> float:
    """The share of skull-stripped slices ``recipe``'s U-Net trained with."""
    return RECIPES[recipe]().data.skull_strip_p if recipe in RECIPES else 0.0


def _retrained(retrain_from: Path, base: GateConfig, trunks: list[Trunk],
               features: TrunkFeatures, data_config, recipe: str, cv_dir: Path,
               unet_path: Path | None, out_dir: Path, ship_to: Path | None,
               verbose, shipped_only: bool = False) -> pd.DataFrame:
    """The gates of ``retrain_from``'s head (no search) on ``trunks`` and the shipped trunk."""
    started = time.monotonic()
    earlier = load_json(retrain_from, GateConfig)
    head_fields = ("fine_tune_blocks", "feature_dropout", "dense_dropout", "dense_units",
                   "dense_activation", "learning_rate", "epochs", "batch_size")
    config = dataclasses.replace(base, **{f: getattr(earlier, f) for f in head_fields})
    heldout_csv = Path(cv_dir) / recipe / "gate_heldout.csv"
    fold_gates = [fold_gate(cv_dir, recipe, trunk.fold) for trunk in trunks]
    if shipped_only:
        # the folds' gates stand as trained (their threshold, their held-out probabilities):
        # only the shipped trunk's gate is trained
        missing = [str(g) for g in fold_gates if not g.is_file()]
        if missing or not heldout_csv.is_file():
            raise FileNotFoundError(f"{missing or heldout_csv}: train the fold gates first "
                                    "(--folds-only)")
        threshold = load_json(fold_gates[0].with_suffix(".json"), GateConfig).threshold
        held_out = pd.read_csv(heldout_csv)
    else:
        held_out, threshold = cross_validated_gates(trunks, config, features, cv_dir, recipe,
                                                    verbose)
        write_text_atomic(heldout_csv, held_out.to_csv(index=False, lineterminator="\n",
                                                       float_format="%.6f"))
    metrics = _heldout_metrics(held_out, trunks, threshold)
    if unet_path is not None:
        extra = {"data": dataclasses.asdict(data_config), "trunk": Path(unet_path).name,
                 "cv_recipe": recipe, "threshold_chosen_on": "cv held-out",
                 "head_from": str(retrain_from)}
        metrics = _shipped_gate(unet_path, dataclasses.replace(config, threshold=threshold),
                                features, metrics, ship_to, verbose, extra, started)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "gate_metrics.csv",
                      metrics.to_csv(index=False, lineterminator="\n", float_format="%.4f"))
    return metrics


def _shipped_gate(unet_path: Path, config: GateConfig, features: TrunkFeatures,
                  metrics: pd.DataFrame, ship_to: Path | None, verbose, extra: dict,
                  started: float) -> pd.DataFrame:
    """``config``'s gate trained on ``unet_path``'s trunk over every development patient and
    shipped to ``ship_to`` (None: not written) with ``extra`` and the wall time since
    ``started``; returns ``metrics`` with its test row."""
    folds = features.arrays.rows["fold"].to_numpy()
    shipped = Trunk("shipped", load_trunk(unet_path),
                    np.flatnonzero(folds != NO_FOLD), np.flatnonzero(folds == NO_FOLD))
    gate = train_gate(shipped, config, features, verbose)
    test = _probabilities(gate, shipped, config, features, shipped.held_out)
    metrics = pd.concat([metrics, pd.DataFrame([
        {"patients": "test (shipped gate, only reported)",
         **classification_metrics(features.arrays.labels[shipped.held_out], test,
                                  config.threshold)}])], ignore_index=True)
    if ship_to is not None:
        ship_model(gate.full, ship_to,
                   dataclasses.replace(config, unet_fingerprint=fingerprint(shipped.unet)),
                   {**extra, "parameters": int(gate.full.count_params()),
                    "wall_seconds_this_call": round(time.monotonic() - started, 1),
                    "metrics": metrics.set_index("patients").to_dict(orient="index")})
    return metrics
