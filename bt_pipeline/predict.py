"""The two-stage predictor: classifier gate, then U-Net masks on the slices it lets through.

Models are loaded once, in Keras safe mode (no code from a model file runs) and without their
training state; each model's config is read from the JSON saved beside it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import keras
import numpy as np
import tensorflow as tf

from bt_pipeline.config import (
    SHIPPED_CLASSIFIER,
    SHIPPED_UNET,
    ClassifierConfig,
    UNetConfig,
    load_json,
)
from bt_pipeline.data.preprocess import preprocess_image


class ModelLoadError(RuntimeError):
    """A model file that is missing, corrupt or not a model; the message names the file."""


def load_model_file(path: str | os.PathLike) -> keras.Model:
    """Load a ``.keras`` file for inference (safe mode, not compiled)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: model file not found")
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many types for a damaged archive
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{path}: not a loadable Keras model ({reason[:200]})") from exc


def graph_forward(model: keras.Model):
    """``model``'s inference pass as one traced TensorFlow graph for any batch size: about 30%
    faster than calling the model eagerly on this CPU (``make bench``)."""
    size = tuple(int(d) for d in model.inputs[0].shape[1:])
    return tf.function(lambda batch: model(batch, training=False),
                       input_signature=[tf.TensorSpec((None, *size), tf.float32)])


def cpu_has_bfloat16() -> bool:
    """True where the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); elsewhere oneDNN
    emulates it, slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def to_bfloat16(model: keras.Model) -> keras.Model:
    """A copy of ``model`` that computes in bfloat16 (weights stay float32, the output layer
    and the returned probabilities float32)."""
    config = model.get_config()
    last = config["layers"][-1]["name"]
    for layer in config["layers"]:
        if layer["class_name"] != "InputLayer" and layer["name"] != last:
            layer["config"]["dtype"] = "mixed_bfloat16"
    clone = model.__class__.from_config(config)
    clone.set_weights(model.get_weights())
    return clone


def _config_beside(path: Path, cls):
    """The config saved beside a model, and the input denoising the model was trained with
    (the JSON's ``extra.data.tv_weight``; 0 when absent)."""
    config_path = path.with_suffix(".json")
    if not config_path.is_file():
        raise ModelLoadError(f"{config_path}: config missing beside model {path.name}")
    extra = json.loads(config_path.read_text()).get("extra", {})
    return load_json(config_path, cls), float(extra.get("data", {}).get("tv_weight", 0.0))


@dataclass
class TwoStagePredictor:
    classifier: keras.Model
    unet: keras.Model
    classifier_config: ClassifierConfig
    unet_config: UNetConfig
    mask_threshold: float = 0.5
    batch_size: int = 32
    #: More U-Nets of the same input size; the mask probability is the mean over all of them.
    extra_unets: tuple[keras.Model, ...] = ()
    #: Test-time augmentation: also segment the left-right mirrored slice, average the two.
    tta_flips: bool = False
    #: Total Variation denoising of each stage's input, as its model was trained with.
    classifier_tv_weight: float = 0.0
    unet_tv_weight: float = 0.0
    #: Run the U-Net(s) in bfloat16 (weights and outputs stay float32; see cpu_has_bfloat16).
    #: The classifier stays float32: it is cheap, and its val-chosen threshold sits where a
    #: bfloat16 rounding flipped a slice (``make bench``, README "Speed").
    bfloat16: bool = False
    _classify: object = field(init=False, repr=False, compare=False)
    _segments: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        cast = to_bfloat16 if self.bfloat16 else (lambda model: model)
        self._classify = graph_forward(self.classifier)
        self._segments = tuple(graph_forward(cast(m)) for m in (self.unet, *self.extra_unets))

    @classmethod
    def load(cls, classifier_path=SHIPPED_CLASSIFIER, unet_path=SHIPPED_UNET,
             mask_threshold: float = 0.5, extra_unet_paths=None,
             tta_flips: bool | None = None, bfloat16: bool = False) -> TwoStagePredictor:
        """Load both models and their configs. ``extra_unet_paths`` and ``tta_flips`` default
        to what the U-Net's config says (its ``ensemble`` and ``tta_flips``)."""
        classifier_path, unet_path = Path(classifier_path), Path(unet_path)
        classifier_config, classifier_tv = _config_beside(classifier_path, ClassifierConfig)
        unet_config, unet_tv = _config_beside(unet_path, UNetConfig)
        if extra_unet_paths is None:
            extra_unet_paths = [unet_path.parent / name for name in unet_config.ensemble]
        if tta_flips is None:
            tta_flips = unet_config.tta_flips
        extra = []
        for path in map(Path, extra_unet_paths):
            member_config, member_tv = _config_beside(path, UNetConfig)
            if member_config.image_size != unet_config.image_size or member_tv != unet_tv:
                raise ModelLoadError(f"{path}: ensemble member's input size or denoising "
                                     f"differs from {unet_path.name}'s")
            extra.append(load_model_file(path))
        return cls(load_model_file(classifier_path), load_model_file(unet_path),
                   classifier_config, unet_config, mask_threshold, extra_unets=tuple(extra),
                   tta_flips=tta_flips, bfloat16=bfloat16, classifier_tv_weight=classifier_tv,
                   unet_tv_weight=unet_tv)

    def _run(self, forward, batch: np.ndarray) -> np.ndarray:
        outputs = [forward(batch[i:i + self.batch_size]).numpy()
                   for i in range(0, len(batch), self.batch_size)]
        return np.concatenate(outputs) if outputs else np.zeros((0,), np.float32)

    def tumour_probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        """P(tumour) per uint8 RGB slice."""
        size = self.classifier_config.image_size
        batch = np.stack([preprocess_image(image, size, self.classifier_tv_weight)
                          for image in images])
        return self._run(self._classify, batch).reshape(-1)

    def mask_probabilities(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """U-Net tumour probability per pixel, resized back to each slice's own grid."""
        if not images:
            return []
        size = self.unet_config.image_size
        batch = np.stack([preprocess_image(image, size, self.unet_tv_weight) for image in images])
        runs = [self._run(segment, batch) for segment in self._segments]
        if self.tta_flips:
            mirrored = np.ascontiguousarray(batch[:, :, ::-1])
            runs += [self._run(segment, mirrored)[:, :, ::-1] for segment in self._segments]
        maps = np.mean(runs, axis=0)[..., 0]
        return [to_grid(prob, image.shape[0], image.shape[1]) for prob, image in zip(maps, images,
                                                                                      strict=True)]

    def masks(self, maps: list[np.ndarray], mask_threshold: float | None = None,
              min_pixels: int | None = None) -> list[np.ndarray]:
        """The one rule that turns probability maps into uint8 {0, 1} masks: threshold, then
        drop small components. Defaults to this predictor's own settings."""
        threshold = self.mask_threshold if mask_threshold is None else mask_threshold
        pixels = self.unet_config.min_component_pixels if min_pixels is None else min_pixels
        return [remove_small_components(m > threshold, pixels) for m in maps]

    def predict(self, images: list[np.ndarray]):
        """Both stages on one volume's uint8 RGB slices.

        Returns ``(probabilities, masks)``: P(tumour) per slice and a uint8 {0, 1} mask per
        slice at its own size, empty where the classifier says no tumour.
        """
        probabilities = self.tumour_probabilities(images)
        masks = [np.zeros(image.shape[:2], np.uint8) for image in images]
        chosen = np.flatnonzero(probabilities >= self.classifier_config.threshold)
        found = self.masks(self.mask_probabilities([images[i] for i in chosen]))
        for index, mask in zip(chosen, found, strict=True):
            masks[index] = mask
        return probabilities, masks

def remove_small_components(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """uint8 {0, 1} copy of a binary mask without 8-connected components under ``min_pixels``."""
    mask = mask.astype(np.uint8)
    if min_pixels <= 0 or not mask.any():
        return mask
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = np.zeros(count, np.uint8)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_pixels
    return keep[labels]


def to_grid(probability: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a probability map to (height, width) bilinearly; thresholding comes after, so
    outlines at the original resolution are smooth rather than blocky."""
    if probability.shape == (height, width):
        return probability
    return cv2.resize(probability, (width, height), interpolation=cv2.INTER_LINEAR)
