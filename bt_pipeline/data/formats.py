"""The single-file volume formats a case may come in, one entry each: how a file is recognised,
its name without the suffix, and the names of the outputs written back in that format.

SimpleITK reads and writes all of them (nnU-Net's ``SimpleITKIO`` covers the same). NIfTI's
mask reuses the input's own header field for field (``inference/outputs.py``); the others are
written by SimpleITK with the input FLAIR's size, spacing, origin and direction. DICOM series
(folders) and the dataset's slice folders are found by ``data/layout.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple


class VolumeFormat(NamedTuple):
    name: str
    suffixes: tuple[str, ...]  # lower-case, longest first
    output_suffix: str  # the single-file suffix outputs take (mask, image copy, probabilities)

    def matches(self, path: Path) -> bool:
        return path.name.lower().endswith(self.suffixes)

    def stem(self, path: Path) -> str:
        suffix = next(s for s in self.suffixes if path.name.lower().endswith(s))
        return path.name[: -len(suffix)]


NIFTI = VolumeFormat("NIfTI", (".nii.gz", ".nii"), ".nii.gz")
NRRD = VolumeFormat("NRRD", (".nrrd", ".nhdr"), ".nrrd")
METAIMAGE = VolumeFormat("MetaImage", (".mha", ".mhd"), ".mha")
#: Every single-file volume format, in the order a name is tried.
FORMATS = (NIFTI, NRRD, METAIMAGE)


def volume_format(path: Path) -> VolumeFormat | None:
    """The format ``path``'s name says, or None when it is no volume file."""
    return next((f for f in FORMATS if f.matches(path)), None)


def is_volume_file(path: Path) -> bool:
    return volume_format(path) is not None


def volume_stem(path: Path) -> str:
    """The file's name without its format's suffix (``case_flair.nii.gz`` -> ``case_flair``)."""
    return volume_format(path).stem(path)
