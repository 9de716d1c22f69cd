"""The two-stage predictor: classifier gate, then U-Net masks on the slices it lets through.

Models are loaded once, in Keras safe mode (no code from a model file runs) and without their
training state; each model's config is read from the JSON saved beside it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import keras
import numpy as np

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


def _config_beside(path: Path, cls):
    config_path = path.with_suffix(".json")
    if not config_path.is_file():
        raise ModelLoadError(f"{config_path}: config missing beside model {path.name}")
    return load_json(config_path, cls)


@dataclass
class TwoStagePredictor:
    classifier: keras.Model
    unet: keras.Model
    classifier_config: ClassifierConfig
    unet_config: UNetConfig
    mask_threshold: float = 0.5
    batch_size: int = 32

    @classmethod
    def load(cls, classifier_path=SHIPPED_CLASSIFIER, unet_path=SHIPPED_UNET,
             mask_threshold: float = 0.5) -> TwoStagePredictor:
        classifier_path, unet_path = Path(classifier_path), Path(unet_path)
        return cls(load_model_file(classifier_path), load_model_file(unet_path),
                   _config_beside(classifier_path, ClassifierConfig),
                   _config_beside(unet_path, UNetConfig), mask_threshold)

    def _run(self, model: keras.Model, batch: np.ndarray) -> np.ndarray:
        outputs = [model(batch[i:i + self.batch_size], training=False).numpy()
                   for i in range(0, len(batch), self.batch_size)]
        return np.concatenate(outputs) if outputs else np.zeros((0,), np.float32)

    def tumour_probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        """P(tumour) per uint8 RGB slice."""
        size = self.classifier_config.image_size
        batch = np.stack([preprocess_image(image, size) for image in images])
        return self._run(self.classifier, batch).reshape(-1)

    def mask_probabilities(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """U-Net tumour probability per pixel, resized back to each slice's own grid."""
        if not images:
            return []
        size = self.unet_config.image_size
        batch = np.stack([preprocess_image(image, size) for image in images])
        maps = self._run(self.unet, batch)[..., 0]
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
