"""The one place that turns a slice file into model input.

Training, evaluation and inference all call :func:`load_slice` (images) and
:func:`load_mask` (ground truth); nothing else decodes, normalises or resizes a slice.

Normalisation: pixel values are divided by 255, giving float32 in [0, 1]. The LGG slices are
8-bit and were already windowed per volume when the dataset was built, so a fixed scale keeps
the contrast the annotators saw and treats every slice of a volume alike. Per-slice z-scoring
was rejected: it stretches the near-empty slices at the top and bottom of the head into noise
and makes a slice's values depend on how much brain it happens to show.

The per-volume windowing is not uniform, though: over the 100 patients the 99th percentile of
FLAIR over the brain runs from 48 to 223 (of 255), and the darkest volumes were the U-Net's
worst misses. :func:`standardise_volume` (a model's ``intensity`` setting, "volume_p99") scales
each channel of one patient's volume so that its 99th percentile over the brain lands on one
value; "raw" leaves the volume as :func:`preprocess_image` made it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import cv2
import numpy as np

from bt_pipeline.config import INTENSITY_RULES

# A broken file is reported once, by SliceReadError; OpenCV's own codec chatter on stderr
# (libtiff "TIFFReadDirectory: ..." lines) would only bury that message.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)

#: Channels of a slice as :func:`read_image` returns it: pre-contrast, FLAIR, post-contrast.
PRE, FLAIR, POST = 0, 1, 2

#: Smallest and largest accepted slice side, in pixels.
MIN_SIDE = 32
MAX_SIDE = 2048
#: Largest accepted slice file (a 2048x2048 RGB uncompressed TIFF is ~12 MiB).
MAX_FILE_BYTES = 64 * 1024 * 1024


class SliceReadError(ValueError):
    """A slice or mask file that cannot be used; the message names the file."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _check_header(path: Path) -> None:
    """Refuse, from the file header alone, a slice that declares sides over MAX_SIDE or more
    than one page: a small compressed file can declare a huge image, and decoding it first
    would cost gigabytes. Headers Pillow cannot parse are left to the decoder's own checks."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's remarks on odd tags are not ours to print
            with Image.open(path) as image:
                width, height = image.size
                pages = getattr(image, "n_frames", 1)
    except Image.DecompressionBombError as exc:
        raise SliceReadError(path, "declares an image too large to decode") from exc
    except Exception:  # noqa: BLE001 - unparsable header: the decoder reports it
        return
    if max(width, height) > MAX_SIDE:
        raise SliceReadError(path, f"declares size {width}x{height}, over the {MAX_SIDE} px "
                                   "limit (not decoded)")
    if pages > 1:
        raise SliceReadError(path, f"multi-page image ({pages} pages); one slice per file is "
                                   "expected")


def _decode(path: str | os.PathLike) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        what = "not a regular file (a FIFO, device or folder)" if path.exists() else \
            "file not found"
        raise SliceReadError(path, what)
    size = path.stat().st_size
    if size == 0:
        raise SliceReadError(path, "empty file")
    if size > MAX_FILE_BYTES:
        raise SliceReadError(path, f"file too large ({size} bytes)")
    _check_header(path)
    try:
        raw = np.fromfile(path, dtype=np.uint8)
        array = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED)
    except (OSError, cv2.error) as exc:
        raise SliceReadError(path, f"cannot read image ({exc.__class__.__name__})") from exc
    if array is None:
        raise SliceReadError(path, "not a readable image (corrupt, truncated or not an image)")
    if array.dtype != np.uint8:
        raise SliceReadError(path, f"expected 8-bit pixels, got {array.dtype}")
    if array.ndim not in (2, 3):
        raise SliceReadError(path, f"unexpected array shape {array.shape}")
    height, width = array.shape[:2]
    if not (MIN_SIDE <= height <= MAX_SIDE and MIN_SIDE <= width <= MAX_SIDE):
        raise SliceReadError(path, f"size {width}x{height} outside {MIN_SIDE}..{MAX_SIDE} pixels")
    return array


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an MR slice to uint8 RGB (H, W, 3): pre-contrast, FLAIR, post-contrast.

    A single-channel slice is FLAIR alone: it fills all three channels, as the dataset fills a
    missing sequence (see :func:`replaced_sequences`).

    Raises:
        SliceReadError: missing, empty, corrupt or truncated file, wrong depth or channels.
    """
    array = _decode(path)
    if array.ndim == 2 or array.shape[2] == 1:
        return np.repeat(array.reshape(*array.shape[:2], 1), 3, axis=2)
    if array.shape[2] == 4:  # an alpha channel carries no signal
        array = array[:, :, :3]
    if array.shape[2] != 3:
        raise SliceReadError(path, f"expected 3 channels, got {array.shape[2]}")
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)


def flair_only(image_rgb: np.ndarray) -> np.ndarray:
    """The slice as a FLAIR-only input shows it: FLAIR in all three channels."""
    return np.repeat(image_rgb[..., FLAIR:FLAIR + 1], 3, axis=2)


def replaced_sequences(images: list[np.ndarray]) -> list[str]:
    """Which of "pre" and "post" one volume's RGB slices carry as a copy of FLAIR (the
    dataset's stand-in for a missing sequence, and what a single-channel slice becomes)."""
    replaced = []
    for name, channel in (("pre", PRE), ("post", POST)):
        if all(np.array_equal(image[..., channel], image[..., FLAIR]) for image in images):
            replaced.append(name)
    return replaced


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Decode a ground-truth mask to uint8 {0, 1} (H, W); any value > 127 is tumour."""
    array = _decode(path)
    if array.ndim == 3:
        array = array[:, :, 0]
    return (array > 127).astype(np.uint8)


def preprocess_image(image_rgb: np.ndarray, image_size: int, tv_weight: float = 0.0) -> np.ndarray:
    """uint8 RGB slice -> float32 (image_size, image_size, 3) in [0, 1] (before the volume's
    intensity rule, :func:`standardise_volume`).

    ``tv_weight`` > 0 applies Total Variation denoising (Chambolle, scikit-image) to the resized
    slice, each channel on its own; 0 (the default) leaves it as it is.
    """
    if image_rgb.shape[:2] != (image_size, image_size):
        shrink = image_rgb.shape[0] > image_size
        interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        image_rgb = cv2.resize(image_rgb, (image_size, image_size), interpolation=interpolation)
    image = image_rgb.astype(np.float32) * np.float32(1.0 / 255.0)
    if tv_weight > 0:
        from skimage.restoration import denoise_tv_chambolle

        image = denoise_tv_chambolle(image, weight=tv_weight, channel_axis=-1).astype(np.float32)
    return image


#: Where "volume_p99" puts each channel's 99th percentile over the brain: 0.6 (153 of 255),
#: about the median FLAIR value of the 86 development patients (153.5). One value for every
#: channel, so that a channel replaced by FLAIR (FLAIR-only input) keeps its scale.
VOLUME_P99_TARGET = 0.6
#: A pixel is brain when its FLAIR value is above this (10 of 255): background is near 0.
BRAIN_FLAIR_FLOOR = 10 / 255


def brain_p99(volume: np.ndarray, flair_floor: float) -> np.ndarray | None:
    """Each channel's 99th percentile over the brain pixels of one volume (..., 3): those
    whose FLAIR (channel 1) is above ``flair_floor``, in the volume's own units; None when the
    volume has no brain pixel."""
    brain = volume[..., 1] > flair_floor
    if not brain.any():
        return None
    # channel by channel: a percentile over one contiguous selection is 2-3x faster than
    # over the columns of an (N, 3) selection, and inference pays it on every volume
    return np.array([np.percentile(volume[..., c][brain], 99) for c in range(volume.shape[-1])])


def standardise_volume(volume: np.ndarray, intensity: str) -> np.ndarray:
    """One patient's preprocessed slices (N, S, S, 3), float32, on the scale ``intensity``
    asks for. "volume_p99": each channel multiplied by one gain for the whole volume, the gain
    that brings its 99th percentile over the brain pixels (FLAIR above BRAIN_FLAIR_FLOOR) to
    VOLUME_P99_TARGET, the result clipped to [0, 1]; a volume without brain pixels is left as it
    is. Gains act on whole volumes, so the slices of one patient keep their contrast to each
    other."""
    if intensity == "raw":
        return volume
    if intensity != "volume_p99":
        raise ValueError(f"unknown intensity rule {intensity!r}; known: {INTENSITY_RULES}")
    level = brain_p99(volume, BRAIN_FLAIR_FLOOR)
    if level is None:
        return volume
    gains = np.where(level > BRAIN_FLAIR_FLOOR, VOLUME_P99_TARGET / np.maximum(level, 1e-6), 1.0)
    scaled = volume * gains.astype(np.float32)
    # clipped like every training image after augmentation (data.augment): a dark volume's
    # brightest 1 % would otherwise reach values no model saw
    return np.clip(scaled, 0.0, 1.0, out=scaled)


def with_context(volume: np.ndarray, context_slices: int) -> np.ndarray:
    """Stack each slice of one volume with its neighbours as channels (2.5D input).

    ``volume`` holds one patient's preprocessed slices in slice order, (N, S, S, C). Returns
    (N, S, S, C * (2k + 1)) for k = ``context_slices``: channels are the slices k below to k
    above, the slice itself in the middle; past either end the edge slice repeats.
    """
    if context_slices <= 0:
        return volume
    n = len(volume)
    offsets = np.arange(-context_slices, context_slices + 1)
    neighbours = np.clip(np.arange(n)[:, None] + offsets[None, :], 0, n - 1)
    stacked = np.moveaxis(volume[neighbours], 1, 3)  # (N, S, S, 2k+1, C)
    return np.ascontiguousarray(stacked.reshape(*volume.shape[:3], -1))


MASK_RESIZE = {"nearest": cv2.INTER_NEAREST, "area": cv2.INTER_AREA}


def preprocess_mask(mask: np.ndarray, image_size: int, resize: str = "nearest") -> np.ndarray:
    """{0, 1} mask -> float32 (image_size, image_size, 1).

    ``resize="nearest"`` keeps it binary: each output cell copies one source pixel (its
    top-left one when shrinking by 2, half a source pixel off the cell centre). ``"area"``
    gives each cell the fraction of it that is tumour, in [0, 1], centred on the cell like the
    area-resized image.
    """
    if resize not in MASK_RESIZE:
        raise ValueError(f"mask resize must be one of {sorted(MASK_RESIZE)}, got {resize!r}")
    mask = mask.astype(np.float32)
    if mask.shape[:2] != (image_size, image_size):
        mask = cv2.resize(mask, (image_size, image_size), interpolation=MASK_RESIZE[resize])
    return mask[:, :, None]


def load_slice(path: str | os.PathLike, image_size: int, tv_weight: float = 0.0) -> np.ndarray:
    """Slice file -> model input: decode, RGB order, scale to [0, 1], resize (, denoise)."""
    return preprocess_image(read_image(path), image_size, tv_weight)


def load_mask(path: str | os.PathLike, image_size: int, resize: str = "nearest") -> np.ndarray:
    """Mask file -> float32 (image_size, image_size, 1); see :func:`preprocess_mask`."""
    return preprocess_mask(read_mask(path), image_size, resize)

