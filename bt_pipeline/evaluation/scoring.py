"""Per-patient segmentation scores at the original 256x256 grid.

Two views per patient, both scored on masks brought back to each slice's own size:

* ``unet``: the U-Net alone on the slices that truly show tumour (the segmenter's own quality);
  other slices count as empty;
* ``pipeline``: the classifier gate then the U-Net, on every slice of the volume (what a user
  gets from ``bt_pipeline.infer``).

Both views go through the predictor's one mask rule (:meth:`TwoStagePredictor.volume_masks`),
post-processing included; only the pipeline view has a gate whose probabilities can size 3D
components (``largest_3d_by="gate"``), the others count voxels.

Dice per patient is computed over the whole volume (all voxels of the slices in view pooled,
as brain-segmentation-pytorch's ``dsc_per_volume``); IoU is reported per tumour slice. Empty
truth with an empty prediction scores 1.0 (see ``models/losses.py``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from bt_pipeline.config import LARGEST_3D_BY
from bt_pipeline.data.brain_mask import strip
from bt_pipeline.data.preprocess import (
    MASK_RESIZE,
    flair_only,
    preprocess_mask,
    read_image,
    read_mask,
)
from bt_pipeline.evaluation.metrics import dice_score, iou_score
from bt_pipeline.inference.predictor import TwoStagePredictor, to_grid


@dataclass
class PatientPrediction:
    """One patient's truth and raw model outputs, computed once and scored many ways."""

    rows: pd.DataFrame  # manifest rows in slice order
    truths: list[np.ndarray]  # bool masks at each slice's own size
    probabilities: np.ndarray  # classifier P(tumour) per slice
    maps: list[np.ndarray]  # U-Net probability maps at each slice's own size
    #: the maps of the mirrored slices (mirrored back) on the slices stage 1 passed, None on
    #: the others; only when asked for (the quality estimate's features)
    mirrored: list[np.ndarray | None] | None = None


def predict_split(predictor: TwoStagePredictor, manifest: pd.DataFrame, split: str,
                  data_root: str | Path, flair_alone: bool = False,
                  brain_masks: dict[str, np.ndarray] | None = None,
                  mirrored: bool = False) -> list[PatientPrediction]:
    """Run both models once over every slice of every patient of ``split``; ``flair_alone``:
    as a FLAIR-only user would, FLAIR in all three channels; ``brain_masks`` (patient -> bool
    (slices, H, W)): each volume skull-stripped by its mask first, as BraTS-style data come;
    ``mirrored``: also the U-Net on the mirrored slices stage 1 passes."""
    root = Path(data_root)
    rows = manifest[manifest["split"] == split].sort_values(["patient_id", "slice"])
    predictions = []
    for patient, group in tqdm(rows.groupby("patient_id", sort=True), desc=f"predicting {split}",
                               unit="patient"):
        images = [read_image(root / p) for p in group["image"]]
        if brain_masks is not None:
            images = list(strip(np.stack(images), brain_masks[patient]))
        if flair_alone:
            images = [flair_only(image) for image in images]
        probabilities = predictor.tumour_probabilities(images)
        mirror = predictor.mirrored_maps(images, np.flatnonzero(
            probabilities >= predictor.classifier_config.threshold)) if mirrored else None
        predictions.append(PatientPrediction(
            rows=group.reset_index(drop=True),
            truths=[read_mask(root / p).astype(bool) for p in group["mask"]],
            probabilities=probabilities, maps=predictor.mask_probabilities(images),
            mirrored=mirror))
    return predictions


def score_patient(predictor: TwoStagePredictor, prediction: PatientPrediction):
    """Score one patient with the predictor's thresholds. Returns ``(patient_row, slice_rows)``."""
    rows, truths, probabilities = prediction.rows, prediction.truths, prediction.probabilities
    gate = probabilities >= predictor.classifier_config.threshold
    has_tumour = np.array([t.any() for t in truths])
    unet_masks = gated_volume(predictor, prediction.maps, has_tumour, truths)
    pipeline_masks = pipeline_volume(predictor, prediction)
    every_slice = gated_volume(predictor, prediction.maps, np.ones(len(truths), bool), truths)
    tumour_idx = np.flatnonzero(has_tumour)
    slice_rows = []
    for k, row in enumerate(rows.itertuples(index=False)):
        slice_rows.append({
            "patient_id": row.patient_id, "institution": row.institution, "slice": row.slice,
            "n_slices": row.n_slices, "has_tumor": int(has_tumour[k]),
            "classifier_probability": float(probabilities[k]), "classifier_positive": int(gate[k]),
            "truth_pixels": int(truths[k].sum()),
            "unet_pixels": int(unet_masks[k].sum()),
            "pipeline_pixels": int(pipeline_masks[k].sum()),
            "iou_unet": iou_score(truths[k], unet_masks[k]),
            "iou_pipeline": iou_score(truths[k], pipeline_masks[k]),
            "union_unet": int((truths[k] | unet_masks[k]).sum()),
            "union_pipeline": int((truths[k] | pipeline_masks[k]).sum()),
            "intersection_unet": int((truths[k] & unet_masks[k]).sum()),
            "intersection_pipeline": int((truths[k] & pipeline_masks[k]).sum()),
            "dice_pipeline": dice_score(truths[k], pipeline_masks[k]),
        })
    patient = {
        "patient_id": rows["patient_id"].iloc[0], "institution": rows["institution"].iloc[0],
        "n_slices": len(rows), "n_tumor_slices": int(has_tumour.sum()),
        "dice_unet": dice_score(np.stack([truths[i] for i in tumour_idx]),
                                np.stack([unet_masks[i] for i in tumour_idx]))
        if len(tumour_idx) else float("nan"),
        "dice_pipeline": dice_score(np.stack(truths), np.stack(pipeline_masks)),
        # what stage 1 adds: the same U-Net and rule on every slice, no gate
        "dice_no_gate": dice_score(np.stack(truths), np.stack(every_slice)),
    }
    return patient, slice_rows


def gated_volume(predictor: TwoStagePredictor, maps: list[np.ndarray], chosen: np.ndarray,
                 truths: list[np.ndarray], **rule) -> list[np.ndarray]:
    """Bool masks of one volume segmented on the ``chosen`` slices only (others empty); pass
    ``gate_probabilities`` when a gate chose them (see ``TwoStagePredictor.finish_volume``)."""
    masks = predictor.volume_masks([m if c else None for m, c in zip(maps, chosen, strict=True)],
                                   **rule)
    return _filled(masks, truths)


def _filled(masks: list[np.ndarray | None], truths: list[np.ndarray]) -> list[np.ndarray]:
    """Bool masks, an empty one of the truth's size where a slice was not segmented (None)."""
    return [m.astype(bool) if m is not None else np.zeros(t.shape, bool)
            for m, t in zip(masks, truths, strict=True)]


def pipeline_volume(predictor: TwoStagePredictor,
                    prediction: PatientPrediction) -> list[np.ndarray]:
    """The two-stage pipeline's bool masks for one patient, as ``infer`` would write them."""
    gate = prediction.probabilities >= predictor.classifier_config.threshold
    return gated_volume(predictor, prediction.maps, gate, prediction.truths,
                        gate_probabilities=prediction.probabilities)


def score_split(predictor: TwoStagePredictor, predictions: list[PatientPrediction],
                split: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-patient and per-slice tables for the predictions of one split."""
    patients, slices = [], []
    for prediction in predictions:
        patient, slice_rows = score_patient(predictor, prediction)
        patients.append({"split": split, **patient})
        slices.extend({"split": split, **r} for r in slice_rows)
    return pd.DataFrame(patients), pd.DataFrame(slices)


def evaluate_split(predictor: TwoStagePredictor, manifest: pd.DataFrame, split: str,
                   data_root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-patient and per-slice tables for every patient of ``split``."""
    return score_split(predictor, predict_split(predictor, manifest, split, data_root), split)


def summarise(patients: pd.DataFrame, slices: pd.DataFrame) -> pd.DataFrame:
    """One row per split: mean/median per-patient Dice; IoU on tumour slices both as the mean
    of per-slice IoUs and pooled (all tumour-slice pixels of the split together)."""
    out = []
    for split, group in patients.groupby("split", sort=False):
        tumour = slices[(slices["split"] == split) & (slices["has_tumor"] == 1)]
        out.append({
            "split": split, "patients": len(group), "tumour_slices": len(tumour),
            "dice_unet_mean": group["dice_unet"].mean(),
            "dice_unet_median": group["dice_unet"].median(),
            "iou_unet_tumour_slices": tumour["iou_unet"].mean(),
            "iou_unet_pooled": tumour["intersection_unet"].sum() / tumour["union_unet"].sum(),
            "dice_pipeline_mean": group["dice_pipeline"].mean(),
            "dice_pipeline_median": group["dice_pipeline"].median(),
            "iou_pipeline_tumour_slices": tumour["iou_pipeline"].mean(),
            "iou_pipeline_pooled": (tumour["intersection_pipeline"].sum()
                                    / tumour["union_pipeline"].sum()),
        })
    return pd.DataFrame(out)


def input_size_ceiling(predictions: list[PatientPrediction], image_size: int,
                       mask_threshold: float = 0.5) -> dict[str, float]:
    """Pooled IoU over the tumour slices that a flawless U-Net working at ``image_size`` could
    reach: each truth mask is shrunk as training shrinks it (each way in ``MASK_RESIZE``),
    brought back with :func:`~bt_pipeline.inference.predictor.to_grid` and cut at
    ``mask_threshold``, exactly as a predicted map is. Returns ``{resize: IoU}``."""
    overlap = {resize: [0, 0] for resize in MASK_RESIZE}
    for prediction in predictions:
        for truth in prediction.truths:
            if not truth.any():
                continue
            for resize, counts in overlap.items():
                small = preprocess_mask(truth, image_size, resize)[..., 0]
                back = to_grid(small, *truth.shape) > mask_threshold
                counts[0] += int((back & truth).sum())
                counts[1] += int((back | truth).sum())
    return {resize: i / u if u else 1.0 for resize, (i, u) in overlap.items()}


def sweep_thresholds(predictor: TwoStagePredictor, predictions: list[PatientPrediction],
                     mask_thresholds=(0.3, 0.4, 0.5, 0.6, 0.7),
                     classifier_thresholds=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
                     min_pixels=(0, 25, 50, 100, 200),
                     largest_3d=(False, True),
                     largest_3d_by=LARGEST_3D_BY,
                     component_shares=(1.0, 0.25)) -> pd.DataFrame:
    """Mean per-patient pipeline Dice (and slice sensitivity) over ``predictions`` for every
    combination of mask threshold, classifier threshold, small-component removal and keeping
    the largest 3D component (sized each way in ``largest_3d_by``, with the components at
    least each of ``component_shares`` of its size).

    Reuses the models' outputs; only the thresholds vary. Meant for val only.
    """
    rows = []
    classifier_thresholds = sorted({*classifier_thresholds,
                                    predictor.classifier_config.threshold})
    # sizing by voxels or by gate only matters when the largest component is kept
    volume_rules = [(largest, by, share) for largest in largest_3d
                    for by in (largest_3d_by if largest else ("voxels",))
                    for share in (component_shares if largest else (1.0,))]
    for prediction in predictions:
        truth = np.stack(prediction.truths)
        probabilities = prediction.probabilities
        has_tumour = truth.reshape(len(truth), -1).any(axis=1)
        for mask_threshold in mask_thresholds:
            for pixels in min_pixels:
                slice_masks = predictor.masks(prediction.maps, mask_threshold, pixels)
                for (largest, by, share), threshold in itertools.product(volume_rules,
                                                                         classifier_thresholds):
                    gate = probabilities >= threshold
                    masks = _filled(predictor.finish_volume(
                        [m if g else None for m, g in zip(slice_masks, gate, strict=True)],
                        largest, probabilities, by, share), prediction.truths)
                    rows.append({
                        "patient_id": prediction.rows["patient_id"].iloc[0],
                        "mask_threshold": mask_threshold,
                        "min_component_pixels": pixels, "keep_largest_3d": largest,
                        "largest_3d_by": by, "component_share": share,
                        "classifier_threshold": threshold,
                        "dice_pipeline": dice_score(truth, np.stack(masks)),
                        "slice_sensitivity": float(gate[has_tumour].mean())
                        if has_tumour.any() else float("nan"),
                    })
    table = pd.DataFrame(rows)
    keys = ["mask_threshold", "min_component_pixels", "keep_largest_3d", "largest_3d_by",
            "component_share", "classifier_threshold"]
    return table.groupby(keys).agg(dice_pipeline_mean=("dice_pipeline", "mean"),
                                   slice_sensitivity=("slice_sensitivity", "mean")).reset_index()
