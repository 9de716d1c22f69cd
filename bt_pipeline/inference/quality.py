"""A per-case quality estimate: which masks to check by eye.

From signals inference already has (plus one mirrored U-Net pass over the slices stage 1
passed), one row of features per case, all on the model grid:

- ``size``: log(1 + final mask voxels / 1000);
- ``uncertain``: of the voxels the U-Net gives p > 0.2, the share under 0.8 (a soft outline,
  a hesitant region);
- ``mirror_dice``: Dice between the mask and the mask predicted on the left-right mirrored
  slices (mirrored back); a model sure of a tumour finds it both ways;
- ``removed``: share of the thresholded voxels that post-processing removed (small components,
  the 3D rule);
- ``components``: log(1 + 3D components of the thresholded maps, before post-processing);
- ``gate_empty``: share of the slices stage 1 passed on which the final mask is empty;
- ``stripped``, ``flair_only``: the input-domain findings, 0 or 1.

The estimate (:class:`QualityModel`): a logistic regression of P(Dice < ``POOR_DICE``) on the
standardised features, and an isotonic map from that probability to the Dice expected, both
fitted only on cross-validation's held-out predictions (``bt quality``); a case is flagged for
review when the probability reaches the threshold chosen there. Applying it needs NumPy only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from bt_pipeline.atomic import write_text_atomic
from bt_pipeline.evaluation.metrics import dice_score

FEATURES = ("size", "uncertain", "mirror_dice", "removed", "components", "gate_empty",
            "stripped", "flair_only")
#: A mask below this Dice is one the user should have been told to check.
POOR_DICE = 0.7
#: The file beside the shipped U-Net that holds the fitted estimate.
QUALITY_FILE = "quality.json"


def case_features(maps: list[np.ndarray | None], mirrored: list[np.ndarray | None],
                  masks: list[np.ndarray], mask_threshold: float, stripped: bool,
                  flair_only: bool) -> dict[str, float]:
    """One case's features. ``maps``: the U-Net's probability map per slice, None where stage
    1 did not pass it; ``mirrored``: the same from the mirrored slices, mirrored back;
    ``masks``: the final {0, 1} masks, one per slice."""
    passed = [k for k, m in enumerate(maps) if m is not None]
    final = np.stack(masks).astype(bool)
    if passed:
        probability = np.stack([maps[k] for k in passed])
        above = probability > 0.2
        uncertain = float((above & (probability < 0.8)).sum() / max(int(above.sum()), 1))
        raw = probability > mask_threshold
        mirror = dice_score(raw, np.stack([mirrored[k] for k in passed]) > mask_threshold)
        _, components = ndimage.label(raw, structure=np.ones((3, 3, 3), bool))
        removed = float(1.0 - (raw & final[passed]).sum() / max(int(raw.sum()), 1)) \
            if raw.any() else 0.0
        gate_empty = float(np.mean([not final[k].any() for k in passed]))
    else:
        uncertain, mirror, components, removed, gate_empty = 0.0, 1.0, 0, 0.0, 0.0
    return {"size": float(np.log1p(final.sum() / 1000.0)), "uncertain": uncertain,
            "mirror_dice": float(mirror), "removed": removed,
            "components": float(np.log1p(components)), "gate_empty": gate_empty,
            "stripped": float(stripped), "flair_only": float(flair_only)}


@dataclass(frozen=True)
class QualityModel:
    """The fitted estimate, as ``quality.json`` stores it."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    review_threshold: float  # P(Dice < poor_dice) from which a case is flagged
    dice_at: tuple[tuple[float, ...], tuple[float, ...]]  # isotonic: P(poor) -> Dice expected
    poor_dice: float = POOR_DICE
    fitted_on: str = ""

    def poor_probability(self, features: dict[str, float]) -> float:
        x = (np.array([features[name] for name in self.features]) - np.array(self.mean)) / \
            np.array(self.scale)
        return float(1.0 / (1.0 + np.exp(-(x @ np.array(self.coef) + self.intercept))))

    def estimate(self, features: dict[str, float]) -> tuple[float, int]:
        """(predicted Dice, review 1/0) for one case's features."""
        poor = self.poor_probability(features)
        dice = float(np.interp(poor, *self.dice_at))
        return dice, int(poor >= self.review_threshold)

    def save(self, path: str | Path) -> None:
        write_text_atomic(Path(path), json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> QualityModel:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        fields = {**raw, "features": tuple(raw["features"]),
                  "dice_at": tuple(tuple(float(v) for v in part) for part in raw["dice_at"])}
        for name in ("mean", "scale", "coef"):
            fields[name] = tuple(float(v) for v in raw[name])
        model = cls(**fields)
        if set(model.features) - set(FEATURES) or not (
                len(model.features) == len(model.mean) == len(model.scale) == len(model.coef)):
            raise ValueError(f"{path}: features and coefficients do not match {FEATURES}")
        return model


def quality_beside(unet_path: str | Path) -> QualityModel | None:
    """The estimate shipped beside a U-Net file, or None when it has none."""
    path = Path(unet_path).with_name(QUALITY_FILE)
    return QualityModel.load(path) if path.is_file() else None


#: Share of poor cases (Dice < POOR_DICE) the review threshold must flag on the held-out
#: predictions it is chosen on.
TARGET_RECALL = 0.85


def _logistic(x: np.ndarray, poor: np.ndarray):
    from sklearn.linear_model import LogisticRegression

    # balanced: poor cases are few, and missing one costs more than a second look at a good one
    return LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000).fit(x, poor)


def fit_quality(table, fitted_on: str, features: tuple[str, ...] = FEATURES,
                target_recall: float = TARGET_RECALL) -> QualityModel:
    """Fit the estimate on ``table`` (one row per held-out case: the features, ``dice``, and
    ``fold``, the group no model of which saw the case). The review threshold and the map to
    Dice are chosen on out-of-fold probabilities (each fold's from a fit on the others); the
    coefficients shipped are then fitted on every row."""
    from sklearn.isotonic import IsotonicRegression

    x_all = table[list(features)].to_numpy(float)
    mean, scale = x_all.mean(axis=0), x_all.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)  # a feature constant here carries no weight
    x = (x_all - mean) / scale
    dice = table["dice"].to_numpy(float)
    poor = dice < POOR_DICE
    folds = table["fold"].to_numpy()
    held_out = np.zeros(len(table))
    for fold in np.unique(folds):
        inside = folds != fold
        if poor[inside].all() or not poor[inside].any():
            held_out[~inside] = poor[inside].mean()
            continue
        held_out[~inside] = _logistic(x[inside], poor[inside]).predict_proba(x[~inside])[:, 1]
    if poor.any():  # the largest threshold that still flags target_recall of the poor cases
        threshold = float(np.quantile(held_out[poor], 1.0 - target_recall, method="lower"))
    else:
        threshold = 1.0
    isotonic = IsotonicRegression(increasing=False, out_of_bounds="clip").fit(held_out, dice)
    final = _logistic(x, poor) if 0 < poor.sum() < len(poor) else None
    return QualityModel(
        features=tuple(features), mean=tuple(map(float, mean)), scale=tuple(map(float, scale)),
        coef=tuple(map(float, final.coef_[0])) if final is not None else (0.0,) * len(features),
        intercept=float(final.intercept_[0]) if final is not None else 0.0,
        review_threshold=threshold,
        dice_at=(tuple(map(float, isotonic.X_thresholds_)),
                 tuple(map(float, isotonic.y_thresholds_))),
        fitted_on=fitted_on)
