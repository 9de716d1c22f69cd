"""Tumour shape and size features of one patient's mask volume, after Buda, Saha & Mazurowski
(2019) and the study it follows (Mazurowski et al. 2017, J Neuro-Oncol).

The papers describe their features in words; the definitions below are this project's reading
of them, written down so that anyone can check or change them:

* **Angular standard deviation (ASD)**, 2D. The papers: the variation of the tumour margin's
  distance from the centre, measured within angular sectors, so that an elongated but smooth
  shape and an irregular one can be told apart. Here: on the slice of largest tumour area, the
  boundary of its largest component is traced (marching squares); each boundary point's
  distance from the component's centroid is binned into ``ANGULAR_BINS`` equal angular sectors
  around the centroid; ASD is the mean over sectors of the standard deviation of the distances
  in each sector, divided by the mean distance. 0 for a circle.
* **Margin fluctuation (MF)**, 2D. The papers: how much the margin departs from a smoothed
  version of itself, i.e. its small-scale irregularity. Here: the radial distance along the same
  boundary, minus its circular moving average over ``SMOOTHING_FRACTION`` of the boundary's
  points; MF is the standard deviation of that difference divided by the mean distance. Near 0
  for any smooth shape, large for a spiky one.
* **Bounding ellipsoid volume ratio (BEVR)**, 3D. The papers: the tumour's volume divided by the
  volume of the smallest ellipsoid that contains it. Here: the tumour is the union of its voxels
  as unit cubes, the ellipsoid is the minimum-volume enclosing ellipsoid of the cubes' corners
  (Khachiyan's algorithm on their convex hull). 1 for an ellipsoid, 2 / (pi sqrt 3) = 0.368 for
  a cube, small for spiky or scattered shapes. An affine map scales both volumes by its
  determinant, so BEVR needs no voxel spacing: the dataset's slices carry none.

Besides: ``volume_voxels`` (every voxel of the mask; the dataset gives no spacing, so not mL) and
``slice_extent`` (slices from the first to the last tumour slice). The 2D features are ratios of
lengths, so in-plane pixel size cancels too.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from skimage import measure

ANGULAR_BINS = 10
SMOOTHING_FRACTION = 0.1
#: The features, in the order of the report's tables.
FEATURES = ("angular_sd", "margin_fluctuation", "bounding_ellipsoid_volume_ratio",
            "volume_voxels", "slice_extent")


def _boundary(mask2d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(boundary points (n, 2), centroid (2,)) of the largest 8-connected component."""
    labels, count = ndimage.label(mask2d, structure=np.ones((3, 3), bool))
    if count == 0:
        raise ValueError("empty mask: no boundary to measure")
    sizes = np.bincount(labels.ravel())[1:]
    component = labels == 1 + int(np.argmax(sizes))
    padded = np.pad(component, 1).astype(float)  # a closed contour even at the image edge
    contour = max(measure.find_contours(padded, 0.5), key=len) - 1
    return contour, np.argwhere(component).mean(axis=0)


def _radial(mask2d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    points, centre = _boundary(mask2d)
    offsets = points - centre
    return np.hypot(offsets[:, 0], offsets[:, 1]), np.arctan2(offsets[:, 0], offsets[:, 1])


def angular_standard_deviation(mask2d: np.ndarray, bins: int = ANGULAR_BINS) -> float:
    """ASD of a 2D binary mask (see the module docstring)."""
    distance, angle = _radial(mask2d)
    sector = np.minimum(((angle + math.pi) / (2 * math.pi) * bins).astype(int), bins - 1)
    spreads = [distance[sector == k].std() for k in range(bins) if (sector == k).any()]
    return float(np.mean(spreads) / distance.mean())


def margin_fluctuation(mask2d: np.ndarray, fraction: float = SMOOTHING_FRACTION) -> float:
    """MF of a 2D binary mask (see the module docstring)."""
    distance, _ = _radial(mask2d)
    window = max(3, int(round(fraction * len(distance))))
    smooth = ndimage.uniform_filter1d(distance, window, mode="wrap")
    return float((distance - smooth).std() / distance.mean())


def minimum_volume_ellipsoid(points: np.ndarray, tolerance: float = 1e-5,
                             max_iterations: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
    """Khachiyan's algorithm: ``(A, c)`` of the smallest ellipsoid ``(x-c)^T A (x-c) <= 1``
    holding every row of ``points`` (n, d), to relative ``tolerance``."""
    n, d = points.shape
    lifted = np.vstack([points.T, np.ones(n)])
    weights = np.full(n, 1.0 / n)
    for _ in range(max_iterations):
        scatter = (lifted * weights) @ lifted.T
        reach = np.einsum("ij,ij->j", lifted, np.linalg.solve(scatter, lifted))
        j = int(np.argmax(reach))
        step = (reach[j] - d - 1) / ((d + 1) * (reach[j] - 1))
        updated = (1 - step) * weights
        updated[j] += step
        converged = np.linalg.norm(updated - weights) < tolerance
        weights = updated
        if converged:
            break
    centre = points.T @ weights
    shape = np.linalg.inv((points.T * weights) @ points - np.outer(centre, centre)) / d
    return shape, centre


def _cube_corners(volume: np.ndarray) -> np.ndarray:
    """Corners of the voxels that can touch the convex hull of the voxel cubes."""
    centres = np.argwhere(volume).astype(float)
    if len(centres) >= 5:
        try:
            centres = centres[ConvexHull(centres).vertices]
        except QhullError:  # flat (one slice, one row): every centre may be extreme
            pass
    offsets = np.array([[dz, dy, dx] for dz in (-.5, .5) for dy in (-.5, .5) for dx in (-.5, .5)])
    corners = np.unique((centres[:, None, :] + offsets).reshape(-1, 3), axis=0)
    return corners[ConvexHull(corners).vertices]


def bounding_ellipsoid_volume_ratio(volume: np.ndarray) -> float:
    """BEVR of a 3D binary mask (see the module docstring)."""
    if not volume.any():
        raise ValueError("empty mask: no volume to bound")
    shape, _ = minimum_volume_ellipsoid(_cube_corners(volume))
    ellipsoid = 4.0 / 3.0 * math.pi / math.sqrt(np.linalg.det(shape))
    return float(volume.sum() / ellipsoid)


def shape_features(volume: np.ndarray) -> dict[str, float]:
    """Every feature of FEATURES for one (slices, H, W) binary mask volume; NaN for all but
    the size features when the mask is empty."""
    volume = np.asarray(volume).astype(bool)
    areas = volume.reshape(len(volume), -1).sum(axis=1)
    tumour = np.flatnonzero(areas)
    if not len(tumour):
        return {**dict.fromkeys(FEATURES, float("nan")), "volume_voxels": 0.0, "slice_extent": 0.0}
    largest = volume[int(np.argmax(areas))]
    return {
        "angular_sd": angular_standard_deviation(largest),
        "margin_fluctuation": margin_fluctuation(largest),
        "bounding_ellipsoid_volume_ratio": bounding_ellipsoid_volume_ratio(volume),
        "volume_voxels": float(volume.sum()),
        "slice_extent": float(tumour[-1] - tumour[0] + 1),
    }
