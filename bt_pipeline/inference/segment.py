"""Segment one case from Python: SimpleITK images (or their files) in, the mask on the FLAIR's
grid out, nothing written.

The path ``infer`` takes for a NIfTI or DICOM case: onto the model grid
(:func:`volumes.case_on_model_grid`), both stages (:meth:`TwoStagePredictor.predict`), back
onto the input FLAIR's grid (:func:`volumes.mask_on_input_grid`). For a pipeline that holds its
volumes in memory, or a notebook.
"""

from __future__ import annotations

import argparse
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bt_pipeline.data.layout import ROLES
from bt_pipeline.inference.domain import domain_notes, is_skull_stripped
from bt_pipeline.inference.model_options import add_model_arguments, load_predictor
from bt_pipeline.inference.pipeline import BLANK, is_blank


@dataclass(frozen=True)
class Segmentation:
    """What :func:`segment` found in one case."""

    #: uint8 {0, 1} SimpleITK image on the input FLAIR's grid (size, spacing, origin, direction).
    mask: object
    #: float32 SimpleITK image on the same grid: the U-Net's probabilities before
    #: post-processing, 0 on slices stage 1 did not pass.
    probability: object
    #: Stage 1's P(tumour) per axial slice of the model grid, inferior to superior.
    slice_probabilities: np.ndarray
    #: The sequences given, ``pre+flair+post`` or fewer; a missing one was replaced by FLAIR.
    sequences: str
    #: What ``infer`` would print as notes for the case (a coarse axial plane, a
    #: skull-stripped input), else empty.
    notes: tuple[str, ...] = ()
    #: The quality estimate's predicted Dice and whether to check the mask by eye (1/0); None
    #: when the U-Net ships without an estimate.
    predicted_dice: float | None = None
    review: int | None = None

    @property
    def tumour_voxels(self) -> int:
        import SimpleITK as sitk

        return int(sitk.GetArrayViewFromImage(self.mask).sum())

    @property
    def tumour_volume_ml(self) -> float:
        """Tumour volume in mL, from the FLAIR's voxel size in mm."""
        return self.tumour_voxels * float(np.prod(self.mask.GetSpacing())) / 1000.0


@functools.cache
def shipped_predictor():
    """The models ``infer`` runs by default (the shipped ones, ``--precision auto``), loaded
    once per process."""
    parser = argparse.ArgumentParser()
    add_model_arguments(parser, precision="auto")
    return load_predictor(parser.parse_args([]))


def segment(flair, pre=None, post=None, *, predictor=None) -> Segmentation:
    """Find and outline the tumour in one case.

    Args:
        flair, pre, post: FLAIR, pre-contrast and post-contrast T1, each a 3D SimpleITK image
            or the path of a NIfTI file or DICOM series folder; pre and post may be left out
            (FLAIR takes their place, as the dataset does). The sequences of one case are
            resampled onto the FLAIR's axial grid in world coordinates, not registered.
        predictor: a :class:`TwoStagePredictor` (default: :func:`shipped_predictor`).

    Raises:
        VolumeReadError: naming the image or file that cannot be used.
    """
    import SimpleITK as sitk

    from bt_pipeline.data.volumes import (
        VolumeReadError,
        case_on_model_grid,
        check_image,
        mask_on_input_grid,
        probability_on_input_grid,
        read_volume,
    )

    given = {role: value for role, value in zip(ROLES, (pre, flair, post), strict=True)
             if value is not None}
    if "flair" not in given:
        raise VolumeReadError("flair", "FLAIR is required")
    volumes, sources = {}, {}
    for role, value in given.items():
        if isinstance(value, sitk.Image):
            sources[role] = f"<{role} image>"
            check_image(sources[role], value)
            volumes[role] = value
        elif isinstance(value, str | os.PathLike):
            sources[role] = Path(value)
            if not sources[role].exists():
                raise VolumeReadError(sources[role], "no such file or folder")
            volumes[role] = read_volume(sources[role])
        else:
            raise VolumeReadError(f"<{role}>", f"a {type(value).__name__}; a SimpleITK image or "
                                  "a path is expected")
    case = case_on_model_grid(volumes, sources)
    if is_blank(case.images):
        raise VolumeReadError(sources["flair"], BLANK)
    predictor = shipped_predictor() if predictor is None else predictor
    probabilities, masks, maps = predictor.predict(case.images, with_maps=True)
    stripped = is_skull_stripped(case.images)
    notes = (*case.notes, *domain_notes(case.images, predictor, stripped))
    threshold = predictor.classifier_config.threshold
    quality = predictor.assess(
        case.images, probabilities,
        [m if p >= threshold else None for m, p in zip(maps, probabilities, strict=True)],
        masks, stripped, flair_only=case.sequences == "flair") or (None, None)
    return Segmentation(mask_on_input_grid(masks, case), probability_on_input_grid(maps, case),
                        np.asarray(probabilities), case.sequences, notes, *quality)
