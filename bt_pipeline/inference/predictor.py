"""The two-stage predictor: classifier gate, then U-Net masks on the slices it lets through.

Models are loaded once, in Keras safe mode (no code from a model file runs) and without their
training state; each model's config is read from the JSON saved beside it. The predictor works
on one patient's volume at a time, slices in order: a 2.5D model (one whose input stacks
neighbouring slices) needs the neighbours, and the 3D post-processing needs the volume.
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
    GateConfig,
    Preprocessing,
    UNetConfig,
    load_json,
)
from bt_pipeline.data.preprocess import preprocess_image, standardise_volume, with_context
from bt_pipeline.inference.postprocess import finish_volume, slice_masks
from bt_pipeline.inference.quality import (
    QualityModel,
    case_features,
    quality_beside,
)
from bt_pipeline.models.batch_norm import with_fused_batch_norm
from bt_pipeline.models.gate import cut_layer_name, fingerprint
from bt_pipeline.models.precision import with_dtype_policy
from bt_pipeline.models.unet import split_unet


class ModelLoadError(ValueError):
    """A model file that is missing, corrupt or not a model; the message names the file."""


def load_model_file(path: str | os.PathLike) -> keras.Model:
    """Load a ``.keras`` file for inference (safe mode, not compiled, batch norm through the
    fused kernel)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: model file not found")
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many types for a damaged archive
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{path}: not a loadable Keras model ({reason[:200]})") from exc
    return with_fused_batch_norm(model)


def graph_forward(model: keras.Model):
    """``model``'s inference pass as one traced TensorFlow graph for any batch size: about 30%
    faster than calling the model eagerly on this CPU (``make bench``)."""
    size = tuple(int(d) for d in model.inputs[0].shape[1:])
    return tf.function(lambda batch: model(batch, training=False),
                       input_signature=[tf.TensorSpec((None, *size), tf.float32)])


def to_bfloat16(model: keras.Model) -> keras.Model:
    """A copy of ``model`` that computes in bfloat16 (weights, output and returned
    probabilities stay float32)."""
    return with_dtype_policy(model, "mixed_bfloat16")


def check_input(model: keras.Model, preprocessing: Preprocessing, path: str | os.PathLike) -> None:
    """Raise ModelLoadError unless ``model`` takes the input its config describes."""
    expected = (preprocessing.image_size, preprocessing.image_size, preprocessing.channels)
    actual = tuple(model.inputs[0].shape[1:])
    if actual != expected:
        raise ModelLoadError(f"{path}: the model takes input {actual} but its config describes "
                             f"{expected} (image size, image size, channels)")


def _config_beside(path: Path, cls):
    """The config saved beside a model (``<model>.json``); ``cls`` a config class or a tuple of
    those a model may have."""
    config_path = path.with_suffix(".json")
    if not config_path.is_file():
        raise ModelLoadError(f"{config_path}: config missing beside model {path.name}")
    classes = cls if isinstance(cls, tuple) else (cls,)
    names = " or ".join(c.__name__ for c in classes)
    try:
        config = load_json(config_path, None if len(classes) > 1 else classes[0])
    except (ValueError, TypeError) as exc:
        raise ModelLoadError(f"{config_path}: not a {names} ({exc})") from exc
    if not isinstance(config, classes):
        raise ModelLoadError(f"{config_path}: not a {names} (a {type(config).__name__})")
    return config


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
    #: Run the U-Net(s) in bfloat16 (weights and outputs stay float32; see cpu_has_bfloat16).
    #: A from-scratch classifier stays float32: it is cheap, and its val-chosen threshold sat
    #: where a bfloat16 rounding flipped a slice (``make bench``, docs/speed.md). A gate's head
    #: reads the shared encoder as the U-Net computes it (on the test split in bfloat16, one
    #: gate decision of 551 differs from float32's).
    bfloat16: bool = False
    #: Whether the U-Net trained with sequences replaced by FLAIR at random (its JSON's
    #: ``missing_sequence_p``), so that it serves FLAIR-only input.
    missing_sequence_training: bool = False
    #: Whether the U-Net trained with skull-stripped volumes too (its JSON's
    #: ``skull_strip_p``), so that it serves BraTS-style input.
    skull_strip_training: bool = False
    #: The patients the U-Net learnt from (its JSON's ``trained_on_patients``; empty when the
    #: JSON does not say), so that a score on one of them is not taken for a held-out one.
    trained_on_patients: frozenset[str] = frozenset()
    #: The per-case quality estimate shipped beside the U-Net (``quality.json``), if any.
    quality: QualityModel | None = None
    #: The files the models and their configs were loaded from (run.json hashes them; set by
    #: ``model_options.load_predictor``).
    files: tuple[Path, ...] = ()
    _classify: object = field(init=False, repr=False, compare=False)
    _segments: tuple = field(init=False, repr=False, compare=False)
    _shared: object = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        cast = to_bfloat16 if self.bfloat16 else (lambda model: model)
        self._classify = graph_forward(self.classifier)
        self._segments = tuple(graph_forward(cast(m)) for m in (self.unet, *self.extra_unets))
        self._shared = self._shared_trunk(cast) if isinstance(self.classifier_config,
                                                              GateConfig) else None
        shapes = {tuple(m.inputs[0].shape[1:]) for m in (self.unet, *self.extra_unets)}
        if len(shapes) > 1:
            raise ModelLoadError(f"U-Nets of different input shapes {sorted(shapes)} cannot be "
                                 "averaged")


    def _shared_trunk(self, cast):
        """For a gate on this U-Net's encoder: one traced graph from a batch of slices and the
        threshold to (P(tumour) per slice, indices of the passed slices, their probability
        maps), running the encoder once per slice for both stages and the decoder only on the
        slices the gate passes. Skip connections stay inside the graph in the U-Net's own
        precision. With ``tta_flips`` the passed slices' mirrored copies also go through the
        whole U-Net inside the same graph. None for an ensemble: then the gate runs on its
        own."""
        if self.extra_unets:
            return None
        mirrored = self.tta_flips
        k = self.classifier_config.fine_tune_blocks
        unet = cast(self.unet)
        encoder, decoder = split_unet(unet, () if k == 0 else (cut_layer_name(unet, k),))
        head = self.classifier.get_layer("gate_head")
        size = tuple(int(d) for d in encoder.inputs[0].shape[1:])

        @tf.function(input_signature=[tf.TensorSpec((None, *size), tf.float32),
                                      tf.TensorSpec((), tf.float32)])
        def gated(batch, threshold):
            outputs = encoder(batch, training=False)
            # k = 0: the head reads the bottleneck, the decoder's last input; otherwise the
            # encoder's extra output at the cut, which the decoder does not take
            parts = outputs[:-1] if k else outputs
            probability = tf.reshape(head(tf.cast(outputs[-1], tf.float32), training=False),
                                     [-1])
            passed = tf.where(probability >= threshold)[:, 0]

            def decode():
                maps = tf.cast(decoder([tf.gather(part, passed) for part in parts],
                                       training=False), tf.float32)[..., 0]
                if mirrored:  # width is axis 2: the left-right mirror, as mask_probabilities
                    flipped = unet(tf.reverse(tf.gather(batch, passed), axis=[2]),
                                   training=False)
                    maps = (maps + tf.reverse(tf.cast(flipped, tf.float32)[..., 0],
                                              axis=[2])) / 2
                return maps

            # the convolutions refuse an empty batch
            maps = tf.cond(tf.size(passed) > 0, decode, lambda: tf.zeros((0, *size[:2])))
            return probability, passed, maps

        return gated

    @classmethod
    def load(cls, classifier_path=SHIPPED_CLASSIFIER, unet_path=SHIPPED_UNET,
             mask_threshold: float = 0.5, extra_unet_paths=None,
             tta_flips: bool | None = None, bfloat16: bool = False) -> TwoStagePredictor:
        """Load both models and their configs. ``extra_unet_paths`` and ``tta_flips`` default
        to what the U-Net's config says (its ``ensemble`` and ``tta_flips``)."""
        classifier_path, unet_path = Path(classifier_path), Path(unet_path)
        classifier_config = _config_beside(classifier_path, (ClassifierConfig, GateConfig))
        unet_config = _config_beside(unet_path, UNetConfig)
        if extra_unet_paths is None:
            extra_unet_paths = [unet_path.parent / name for name in unet_config.ensemble]
        if tta_flips is None:
            tta_flips = unet_config.tta_flips
        extra = []
        for path in map(Path, extra_unet_paths):
            member_config = _config_beside(path, UNetConfig)
            if member_config.preprocessing != unet_config.preprocessing:
                raise ModelLoadError(f"{path}: ensemble member's preprocessing differs from "
                                     f"{unet_path.name}'s")
            extra.append(load_model_file(path))
            check_input(extra[-1], member_config.preprocessing, path)
        classifier, unet = load_model_file(classifier_path), load_model_file(unet_path)
        check_input(classifier, classifier_config.preprocessing, classifier_path)
        check_input(unet, unet_config.preprocessing, unet_path)
        if isinstance(classifier_config, GateConfig) and \
                classifier_config.unet_fingerprint != fingerprint(unet):
            raise ModelLoadError(f"{classifier_path}: this gate was built on another U-Net's "
                                 f"encoder than {unet_path}'s; retrain it on this U-Net "
                                 "(make tune) or load the U-Net it was built on")
        unet_json = unet_path.with_suffix(".json").read_text(encoding="utf-8")
        trained_on = json.loads(unet_json).get("extra", {})
        missing = trained_on.get("data", {}).get("missing_sequence_p") or 0
        stripped = trained_on.get("data", {}).get("skull_strip_p") or 0
        return cls(classifier, unet, classifier_config, unet_config, mask_threshold,
                   extra_unets=tuple(extra), tta_flips=tta_flips, bfloat16=bfloat16,
                   missing_sequence_training=missing > 0, skull_strip_training=stripped > 0,
                   trained_on_patients=frozenset(trained_on.get("trained_on_patients", [])),
                   quality=quality_beside(unet_path))

    def _run(self, forward, batch: np.ndarray) -> np.ndarray:
        outputs = [forward(batch[i:i + self.batch_size]).numpy()
                   for i in range(0, len(batch), self.batch_size)]
        return np.concatenate(outputs) if outputs else np.zeros((0,), np.float32)

    @staticmethod
    def _model_inputs(images: list[np.ndarray], preprocessing: Preprocessing,
                      indices=None) -> np.ndarray:
        """One volume's slices as a model's input batch: each slice preprocessed, stacked with
        its neighbours for a 2.5D model, then the slices at ``indices`` (default all)."""
        size, tv_weight = preprocessing.image_size, preprocessing.tv_weight
        if preprocessing.context_slices == 0 and indices is not None \
                and preprocessing.intensity == "raw":  # only those slices
            images, indices = [images[int(i)] for i in indices], None
        volume = np.stack([preprocess_image(image, size, tv_weight) for image in images])
        # the intensity rule reads the whole volume, so every slice is preprocessed first
        volume = standardise_volume(volume, preprocessing.intensity)
        volume = with_context(volume, preprocessing.context_slices)
        return volume if indices is None else volume[np.asarray(indices, dtype=int)]

    def tumour_probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        """P(tumour) per uint8 RGB slice of one volume (slices in order)."""
        if not images:
            return np.zeros((0,), np.float32)
        batch = self._model_inputs(images, self.classifier_config.preprocessing)
        return self._run(self._classify, batch).reshape(-1)

    def mask_probabilities(self, images: list[np.ndarray], indices=None) -> list[np.ndarray]:
        """U-Net tumour probability per pixel for the slices at ``indices`` (default all) of
        one volume (slices in order), resized back to each slice's own grid."""
        chosen = range(len(images)) if indices is None else [int(i) for i in indices]
        if not images or not len(chosen):
            return []
        batch = self._model_inputs(images, self.unet_config.preprocessing, chosen)
        runs = [self._run(segment, batch) for segment in self._segments]
        if self.tta_flips:
            mirrored = np.ascontiguousarray(batch[:, :, ::-1])
            runs += [self._run(segment, mirrored)[:, :, ::-1] for segment in self._segments]
        maps = np.mean(runs, axis=0)[..., 0]
        return [to_grid(prob, images[i].shape[0], images[i].shape[1])
                for prob, i in zip(maps, chosen, strict=True)]

    def mirrored_maps(self, images: list[np.ndarray], indices) -> list[np.ndarray | None]:
        """One entry per slice: at ``indices``, :meth:`mask_probabilities` of the left-right
        mirrored slice, mirrored back (where the U-Net agrees with itself: the quality
        estimate's ``mirror_dice``); None elsewhere."""
        chosen = [int(i) for i in indices]
        mirrored: list[np.ndarray | None] = [None] * len(images)
        if not chosen:
            return mirrored
        batch = np.ascontiguousarray(
            self._model_inputs(images, self.unet_config.preprocessing, chosen)[:, :, ::-1])
        maps = np.mean([self._run(segment, batch)[:, :, ::-1] for segment in self._segments],
                       axis=0)[..., 0]
        for prob, i in zip(maps, chosen, strict=True):
            mirrored[i] = to_grid(prob, images[i].shape[0], images[i].shape[1])
        return mirrored

    def assess(self, images: list[np.ndarray], probabilities: np.ndarray,
               maps: list[np.ndarray | None], masks: list[np.ndarray], stripped: bool,
               flair_only: bool) -> tuple[float, int] | None:
        """(predicted Dice, review 1/0) of one case from its outputs (``maps`` None where stage
        1 did not pass a slice), or None when no estimate ships with the U-Net."""
        if self.quality is None:
            return None
        mirrored = self.mirrored_maps(images, [k for k, m in enumerate(maps) if m is not None])
        return self.quality.estimate(case_features(maps, mirrored, masks, self.mask_threshold,
                                                   stripped, flair_only))

    def masks(self, maps: list[np.ndarray], mask_threshold: float | None = None,
              min_pixels: int | None = None) -> list[np.ndarray]:
        """Per-slice masks from probability maps (:func:`postprocess.slice_masks`), by default
        with this predictor's threshold and its U-Net config's small-component rule."""
        threshold = self.mask_threshold if mask_threshold is None else mask_threshold
        pixels = self.unet_config.min_component_pixels if min_pixels is None else min_pixels
        return slice_masks(maps, threshold, pixels)

    def volume_masks(self, maps: list[np.ndarray | None], mask_threshold: float | None = None,
                     min_pixels: int | None = None, largest_3d: bool | None = None,
                     gate_probabilities: np.ndarray | None = None,
                     largest_3d_by: str | None = None,
                     share: float | None = None) -> list[np.ndarray | None]:
        """One volume's masks (slices in order) from its probability maps, None where the
        classifier let no slice through: :meth:`masks`, then the volume rule (see
        :meth:`finish_volume` for ``gate_probabilities``)."""
        given = [m for m in maps if m is not None]
        found = iter(self.masks(given, mask_threshold, min_pixels))
        return self.finish_volume([next(found) if m is not None else None for m in maps],
                                  largest_3d, gate_probabilities, largest_3d_by, share)

    def finish_volume(self, masks: list[np.ndarray | None], largest_3d: bool | None = None,
                      gate_probabilities: np.ndarray | None = None,
                      largest_3d_by: str | None = None,
                      share: float | None = None) -> list[np.ndarray | None]:
        """:func:`postprocess.finish_volume` with the U-Net config's ``keep_largest_3d``,
        ``largest_3d_by`` and ``component_share`` by default. Sizing by "gate" weights each slice by
        ``gate_probabilities`` (stage 1's P(tumour) per slice); where no gate chose the slices
        (None: every slice, or the true tumour slices) every voxel counts 1."""
        config = self.unet_config
        largest_3d = config.keep_largest_3d if largest_3d is None else largest_3d
        largest_3d_by = config.largest_3d_by if largest_3d_by is None else largest_3d_by
        weights = gate_probabilities if largest_3d_by == "gate" else None
        share = config.component_share if share is None else share
        return finish_volume(masks, largest_3d, weights, share)

    def _through_shared_trunk(self, images: list[np.ndarray]):
        """The gate and the U-Net sharing one encoder pass: (probabilities, passed slices,
        their probability maps on each slice's grid)."""
        batch = self._model_inputs(images, self.unet_config.preprocessing)
        threshold = tf.constant(self.classifier_config.threshold, tf.float32)
        probabilities, chosen, maps = [], [], []
        for start in range(0, len(batch), self.batch_size):
            probability, passed, found = self._shared(batch[start:start + self.batch_size],
                                                      threshold)
            probabilities.append(probability.numpy())
            chosen.append(passed.numpy() + start)
            maps.extend(found.numpy())
        chosen = np.concatenate(chosen).astype(int)
        return np.concatenate(probabilities), chosen, [
            to_grid(prob, images[i].shape[0], images[i].shape[1])
            for prob, i in zip(maps, chosen, strict=True)]

    def predict(self, images: list[np.ndarray], with_maps: bool = False):
        """Both stages on one volume's uint8 RGB slices, in slice order.

        Returns ``(probabilities, masks)``: P(tumour) per slice and a uint8 {0, 1} mask per
        slice at its own size, empty where the classifier says no tumour. ``with_maps`` adds a
        third item: the U-Net's float32 probability map per slice before post-processing, 0 on
        slices the classifier did not pass.
        """
        if self._shared is not None and images:
            probabilities, chosen, found = self._through_shared_trunk(images)
        else:
            probabilities = self.tumour_probabilities(images)
            chosen = np.flatnonzero(probabilities >= self.classifier_config.threshold)
            found = self.mask_probabilities(images, chosen)
        maps: list[np.ndarray | None] = [None] * len(images)
        for index, prob in zip(chosen, found, strict=True):
            maps[index] = prob
        masks = self.volume_masks(maps, gate_probabilities=probabilities)
        masks = [m if m is not None else np.zeros(image.shape[:2], np.uint8)
                 for m, image in zip(masks, images, strict=True)]
        if not with_maps:
            return probabilities, masks
        return probabilities, masks, [
            m.astype(np.float32) if m is not None else np.zeros(image.shape[:2], np.float32)
            for m, image in zip(maps, images, strict=True)]


def to_grid(probability: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a probability map to (height, width) bilinearly; thresholding comes after, so
    outlines at the original resolution are smooth rather than blocky."""
    if probability.shape == (height, width):
        return probability
    return cv2.resize(probability, (width, height), interpolation=cv2.INTER_LINEAR)
