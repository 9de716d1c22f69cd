"""Post-processing: the rules that turn U-Net probability maps into masks, the code that
chooses them from held-out predictions, and the code that writes the choice into the U-Net's
JSON, which inference then reads. No post-processing setting of a shipped model is set by hand.

Rules, in order: threshold each slice's map; drop 8-connected components smaller than
``min_component_pixels`` (0 = off); if ``keep_largest_3d``, keep the largest 26-connected
component of the patient's volume and every other one at least ``component_share`` of its size
(1 = the largest alone), sizes counted as ``largest_3d_by`` says: in voxels, or each voxel
weighted by the stage-1 probability of its slice ("gate").
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage

from bt_pipeline.config import UNetConfig, load_json, save_json

#: A rule is adopted only if it lifts the mean held-out pipeline Dice by at least this much.
MIN_POSTPROCESS_GAIN = 0.005



def remove_small_components(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """uint8 {0, 1} copy of a binary mask without 8-connected components under ``min_pixels``."""
    mask = mask.astype(np.uint8)
    if min_pixels <= 0 or not mask.any():
        return mask
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = np.zeros(count, np.uint8)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_pixels
    return keep[labels]


def keep_largest_component_3d(volume: np.ndarray,
                              slice_weights: np.ndarray | None = None,
                              share: float = 1.0) -> np.ndarray:
    """uint8 {0, 1} copy of a binary (slices, H, W) volume keeping only its largest
    26-connected component (ties: the first found) and, with ``share`` < 1, every component at
    least ``share`` of its size; an empty volume stays empty. With ``slice_weights`` (one per
    slice) a component's size is the sum of its voxels' slice weights instead of its voxel
    count."""
    volume = np.asarray(volume)
    kept = np.zeros(volume.shape, np.uint8)
    # labelled inside the masks' bounding box only: a tumour fills a small corner of the
    # volume, and labelling and weighting every voxel took most of inference's post-processing
    box = ndimage.find_objects((volume > 0).astype(np.uint8))
    if not box:
        return kept
    box = box[0]
    labels, count = ndimage.label(volume[box], structure=np.ones((3, 3, 3), bool))
    if count <= 1:
        kept[box] = labels > 0
        return kept
    weights = None
    if slice_weights is not None:
        weights = np.broadcast_to(np.asarray(slice_weights, np.float64)[box[0], None, None],
                                  labels.shape).ravel()
    sizes = np.bincount(labels.ravel(), weights=weights)[1:]
    if share >= 1:
        kept[box] = labels == 1 + int(np.argmax(sizes))
        return kept
    keep = np.concatenate([[False], sizes >= share * sizes.max()])
    kept[box] = keep[labels]
    return kept


def slice_masks(maps: list[np.ndarray], threshold: float, min_pixels: int) -> list[np.ndarray]:
    """uint8 {0, 1} masks from probability maps: threshold, then drop small components."""
    return [remove_small_components(m > threshold, min_pixels) for m in maps]


def finish_volume(masks: list[np.ndarray | None], largest_3d: bool,
                  slice_weights: np.ndarray | None = None,
                  share: float = 1.0) -> list[np.ndarray | None]:
    """The volume rule on one patient's per-slice masks (None: not segmented), components
    sized by ``slice_weights`` (see :func:`keep_largest_component_3d`; None: voxels). A volume
    whose slices differ in size has no 3D neighbourhood and is left as it is."""
    shapes = {m.shape for m in masks if m is not None}
    if largest_3d and len(shapes) == 1:
        shape = shapes.pop()
        volume = keep_largest_component_3d(np.stack(
            [m if m is not None else np.zeros(shape, np.uint8) for m in masks]), slice_weights,
            share)
        masks = [v if m is not None else None for v, m in zip(volume, masks, strict=True)]
    return masks


@dataclasses.dataclass(frozen=True)
class PostprocessingChoice:
    """The rule chosen from a sweep, and the evidence for it."""

    min_component_pixels: int
    keep_largest_3d: bool
    largest_3d_by: str
    gain: float  # mean pipeline Dice of the best rule minus that of no post-processing
    chosen_on: str  # which held-out patients the sweep scored
    intensity: str | None = None  # the intensity rule it was chosen under; None: keep the JSON's
    component_share: float = 1.0


def choose_postprocessing(sweep: pd.DataFrame, classifier_threshold: float, chosen_on: str,
                          mask_threshold: float = 0.5) -> PostprocessingChoice:
    """The rule with the best mean pipeline Dice in ``sweep`` (a table from
    ``evaluation.scoring.sweep_thresholds`` over held-out patients) at the given thresholds;
    no post-processing unless it gains MIN_POSTPROCESS_GAIN over none."""
    rows = sweep[np.isclose(sweep["classifier_threshold"], classifier_threshold)
                 & np.isclose(sweep["mask_threshold"], mask_threshold)]
    plain = (rows["min_component_pixels"] == 0) & ~rows["keep_largest_3d"].astype(bool)
    baseline = rows.loc[plain, "dice_pipeline_mean"].iloc[0]
    best = rows.loc[rows["dice_pipeline_mean"].idxmax()]
    gain = float(best["dice_pipeline_mean"] - baseline)
    if gain < MIN_POSTPROCESS_GAIN:
        return PostprocessingChoice(0, False, "voxels", gain, chosen_on)
    share = float(best["component_share"]) if "component_share" in best else 1.0
    return PostprocessingChoice(int(best["min_component_pixels"]), bool(best["keep_largest_3d"]),
                                str(best["largest_3d_by"]), gain, chosen_on,
                                component_share=share)


def write_choice(unet_path: str | Path, choice: PostprocessingChoice) -> UNetConfig:
    """Write ``choice`` into the JSON beside ``unet_path`` (its config fields, with the intensity
    rule it was chosen under when it names one, and the evidence under
    ``extra.postprocessing``); every other key is kept. Returns the new config."""
    json_path = Path(unet_path).with_suffix(".json")
    extra = json.loads(json_path.read_text(encoding="utf-8")).get("extra", {})
    config = dataclasses.replace(load_json(json_path, UNetConfig),
                                 min_component_pixels=choice.min_component_pixels,
                                 keep_largest_3d=choice.keep_largest_3d,
                                 largest_3d_by=choice.largest_3d_by,
                                 component_share=choice.component_share)
    if choice.intensity is not None:
        config = dataclasses.replace(config, intensity=choice.intensity)
    extra["postprocessing"] = {"chosen_on": choice.chosen_on,
                               "mean_dice_gain": round(choice.gain, 4),
                               "min_gain_to_adopt": MIN_POSTPROCESS_GAIN}
    save_json(config, json_path, extra=extra)
    return config
