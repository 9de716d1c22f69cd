"""What ``infer`` says about an input that lies outside what the models trained on.

Each finding is one line: printed on stderr, written to ``patients.csv``'s ``notes`` column
and shown in the viewer. It is a finding about the input, not a refusal: the case is still
segmented.
"""

from __future__ import annotations

import numpy as np

from bt_pipeline.data.brain_mask import looks_skull_stripped

#: Where the accuracy measured on each input domain is written (by code, from reports/).
MEASURED_IN = "docs/model-card.md, Domains"


def is_skull_stripped(images: list[np.ndarray]) -> bool:
    """Whether one case's slices (uint8 RGB on the model grid) look skull-stripped."""
    return bool(images) and len({image.shape for image in images}) == 1 and \
        looks_skull_stripped(np.stack(images))


def domain_notes(images: list[np.ndarray], predictor, stripped: bool | None = None
                 ) -> list[str]:
    """Notes on one case's slices (uint8 RGB on the model grid) for ``predictor``'s models;
    ``stripped``: :func:`is_skull_stripped`'s answer when already known."""
    notes = []
    if is_skull_stripped(images) if stripped is None else stripped:
        if predictor.skull_strip_training:
            notes.append("skull-stripped input (no scalp or skull around the brain): the U-Net "
                         "trained on skull-stripped volumes too; accuracy measured on such "
                         f"data: {MEASURED_IN}")
        else:
            notes.append("skull-stripped input (no scalp or skull around the brain): this "
                         "U-Net trained only on heads with scalp and skull and misses tumour at "
                         f"the brain's edge on such input; accuracy there: {MEASURED_IN}")
    return notes
