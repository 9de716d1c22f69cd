"""Brain masks of head volumes: made, stored, and used to remove the skull.

The LGG volumes keep scalp and skull; the glioma data most research uses (BraTS) are
skull-stripped. A model trained only on heads took the skull as context (tumour touching the
brain's edge was read as scalp), so training strips a share of its volumes with these masks
(``DataConfig.skull_strip_p``) and the stripped cross-validation scores held-out patients with
their skull removed.

:func:`brain_mask` is morphology on one volume's 8-bit slices (scikit-image, SciPy), chosen
over the candidates the package index offers by measurement: ``brainextractor`` (FSL BET's
surface model) collapsed on these thick, partial stacks (23-88 slices of 3 mm; 7 % of one
patient's tumour kept) at 30 s a patient, and the CNN strippers need PyTorch and whole-head 1 mm
T1 input. The rule: tissue is what is brighter than a share of the deep tissue's level (more
than :data:`CORE_DEPTH_PX` inside the head's outline) and, where a real pre-contrast T1 exists,
not as bright in it as scalp fat; an in-plane erosion cuts the thin bridges to the scalp; the
3D component holding most deep tissue is the brain, dilated back, closed, holes filled, with a
margin of :data:`MARGIN_PX` pixels. ``make brain-masks`` writes the masks, each patient's
tumour coverage (``reports/brain_masks/coverage.csv``) and a montage.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

#: Deep tissue lies this many pixels (of 256 across the field of view) inside the head.
CORE_DEPTH_PX = 25
#: Tissue is brighter than this share of the deep tissue's median (channel mean).
TISSUE_FRACTION = 0.3
#: Tissue brighter in pre-contrast T1 than the deep tissue's mean + this many SDs is fat.
FAT_SD = 2.5
#: In-plane erosion that cuts the thin bridges between brain and scalp, undone afterwards.
BRIDGE_PX = 3
#: The final mask's margin: tumour reaching the brain's edge stays inside.
MARGIN_PX = 3
#: Where ``make brain-masks`` writes the LGG patients' masks (committed).
BRAIN_MASKS = Path("reports/brain_masks/brain_masks.npz")


def brain_mask(volume: np.ndarray) -> np.ndarray:
    """Brain mask of one head volume.

    Args:
        volume: (N, H, W, 3) uint8 slices in slice order, channels pre-contrast T1, FLAIR,
            post-contrast T1 (a missing sequence replaced by FLAIR).

    Returns:
        bool (N, H, W), True inside the brain; all False for a blank volume.
    """
    from scipy import ndimage
    from skimage.morphology import disk

    values = volume.astype(np.float32)
    mean, pre = values.mean(axis=-1), values[..., 0]
    foreground = mean > 10
    if foreground.sum() < 100:
        return np.zeros(mean.shape, bool)
    heads = np.stack([ndimage.binary_fill_holes(ndimage.binary_opening(s, iterations=2))
                      for s in foreground])
    depth = np.stack([ndimage.distance_transform_edt(head) for head in heads])
    deep = depth > CORE_DEPTH_PX
    if (deep & foreground).sum() < 100:  # a small head (or field of view)
        deep = depth > CORE_DEPTH_PX / 2
    if not (deep & foreground).any():
        return np.zeros(mean.shape, bool)
    tissue = (mean > TISSUE_FRACTION * np.median(mean[deep & foreground])) & (depth > 2)
    if not np.array_equal(volume[..., 0], volume[..., 1]):  # a real pre-contrast T1
        core = deep & tissue
        if core.any():
            tissue &= pre < pre[core].mean() + FAT_SD * pre[core].std()
    # in-plane structure: slices are 3-4 times thicker than their pixels
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    eroded = ndimage.binary_erosion(tissue, in_plane, iterations=BRIDGE_PX)
    labels, n = ndimage.label(eroded)
    if n == 0:
        return np.zeros(mean.shape, bool)
    deepest = 1 + int(np.argmax(ndimage.sum(deep, labels, range(1, n + 1))))
    brain = ndimage.binary_dilation(labels == deepest, in_plane, iterations=BRIDGE_PX + 1)
    brain &= tissue
    return np.stack([ndimage.binary_dilation(
        ndimage.binary_fill_holes(ndimage.binary_closing(s, disk(5))), disk(1),
        iterations=MARGIN_PX) & head for s, head in zip(brain, heads, strict=True)])


#: A volume looks skull-stripped when over this share of its voxels is exactly background
#: (0 in every channel; 0-0.58 on the 100 LGG heads, 0.81-0.86 on BraTS volumes) ...
STRIPPED_BACKGROUND_SHARE = 0.3
#: ... and the outermost 4 pixels of its foreground are, on the median sampled slice, at
#: least this share of the slice's deep median in FLAIR: brain tissue, not air and noise
#: beyond a scalp (0.01-0.50 on the LGG heads, 0.40-0.59 on BraTS volumes). Together: none
#: of the 100 LGG heads flagged, 98 of them stripped by their brain masks flagged.
STRIPPED_RIM_RATIO = 0.3
#: Slices sampled from the middle half of a volume for the rim test.
RIM_SAMPLES = 8


def looks_skull_stripped(volume: np.ndarray) -> bool:
    """Whether ``volume`` (N, H, W, 3) uint8, on the model grid, looks skull-stripped: most of
    it exactly 0 and its foreground's edge brain-bright. Cheap: every second pixel, a few
    sampled slices."""
    from scipy import ndimage

    if volume.size == 0:
        return False
    # every second row and column; channels OR-ed (a max over the last axis is 5x slower)
    coarse = volume[:, ::2, ::2]
    foreground = (coarse[..., 0] | coarse[..., 1] | coarse[..., 2]) > 0
    if 1.0 - float(foreground.mean()) < STRIPPED_BACKGROUND_SHARE:
        return False
    n = len(volume)
    picks = np.unique(np.linspace(n // 4, max(n // 4, 3 * n // 4), RIM_SAMPLES).astype(int))
    ratios = []
    for k in picks:
        flair = coarse[k, ..., 1].astype(np.float32)
        # depths in coarse pixels: 2 and 7.5 are 4 and 15 model-grid pixels
        depth = ndimage.distance_transform_edt(ndimage.binary_fill_holes(foreground[k]))
        rim, inner = (depth > 0) & (depth <= 2), depth > 7.5
        if rim.sum() < 12 or inner.sum() < 25:
            continue
        ratios.append(flair[rim].mean() / max(1.0, float(np.median(flair[inner]))))
    return bool(ratios) and float(np.median(ratios)) >= STRIPPED_RIM_RATIO


def strip(images: np.ndarray, mask: np.ndarray, background: float = 0.0) -> np.ndarray:
    """``images`` (N, H, W, C) with every pixel outside ``mask`` (N, H, W) set to
    ``background``, as skull-stripped data are; a new array."""
    return np.where(mask[..., None], images, np.asarray(background, images.dtype))


def morphed(mask: np.ndarray, pixels: int) -> np.ndarray:
    """``mask`` (N, H, W) eroded (``pixels`` < 0) or dilated (> 0) in-plane by that many
    pixels: strippers disagree by a few millimetres on where the brain ends."""
    from scipy import ndimage

    if pixels == 0:
        return mask
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    operation = ndimage.binary_dilation if pixels > 0 else ndimage.binary_erosion
    return operation(mask, structure, iterations=abs(pixels))


def resized_mask(mask: np.ndarray, image_size: int) -> np.ndarray:
    """``mask`` (N, H, W) on an ``image_size`` square grid: each cell inside when most of it
    is (area resampling, as :func:`~bt_pipeline.data.preprocess.preprocess_image` shrinks the
    slices)."""
    import cv2

    if mask.shape[1:] == (image_size, image_size):
        return mask.astype(bool)
    return np.stack([cv2.resize(s.astype(np.float32), (image_size, image_size),
                                interpolation=cv2.INTER_AREA) >= 0.5 for s in mask])


def save_masks(masks: dict[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write patient -> bool (N, H, W) masks as one compressed ``.npz`` (bits packed),
    atomically."""
    from bt_pipeline.atomic import write_with

    arrays = {}
    for patient, mask in sorted(masks.items()):
        arrays[f"{patient}/shape"] = np.asarray(mask.shape, np.int32)
        arrays[f"{patient}/bits"] = np.packbits(mask.astype(bool).ravel())
    write_with(Path(path), lambda tmp: np.savez_compressed(tmp, **arrays), suffix=".npz")


def load_masks(path: str | os.PathLike = BRAIN_MASKS) -> dict[str, np.ndarray]:
    """Read what :func:`save_masks` wrote: patient -> bool (N, H, W)."""
    with np.load(path) as stored:
        patients = sorted({key.rsplit("/", 1)[0] for key in stored.files})
        masks = {}
        for patient in patients:
            shape = tuple(int(v) for v in stored[f"{patient}/shape"])
            bits = np.unpackbits(stored[f"{patient}/bits"], count=int(np.prod(shape)))
            masks[patient] = bits.reshape(shape).astype(bool)
    return masks
