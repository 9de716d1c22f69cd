"""Training-time augmentation on whole batches, image and mask kept aligned.

Left-right flips (brains are roughly symmetric; up-down flips are not anatomical), a small
rotation and scale about the centre applied by one projective transform to the image and the
mask together, and a contrast/brightness jitter on the image only. Randomness is stateless and
seeded per batch, so a seeded pipeline yields the same batches run after run.
"""

from __future__ import annotations

import math

import tensorflow as tf

from bt_pipeline.config import DataConfig


def _rotation_scale_transforms(batch: tf.Tensor, size: tf.Tensor, seed, config: DataConfig):
    """Per-image 8-parameter projective transforms (output -> input coordinates)."""
    seed_angle, seed_scale = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    max_angle = config.max_rotation_deg * math.pi / 180.0
    angle = tf.random.stateless_uniform([batch], seed_angle, -max_angle, max_angle)
    scale = tf.random.stateless_uniform([batch], seed_scale, 1.0 - config.max_scale,
                                        1.0 + config.max_scale)
    centre = (tf.cast(size, tf.float32) - 1.0) / 2.0
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    a2 = centre - cos * centre + sin * centre
    b2 = centre - sin * centre - cos * centre
    zeros = tf.zeros_like(cos)
    return tf.stack([cos, -sin, a2, sin, cos, b2, zeros, zeros], axis=1)


def augment_batch(image: tf.Tensor, mask: tf.Tensor | None, seed: tf.Tensor, config: DataConfig):
    """Augment a batch ``image`` (B, S, S, C) and optional ``mask`` (B, S, S, 1).

    Returns the augmented ``(image, mask)``. A binary mask stays binary; a soft one
    (``config.mask_resize == "area"``) is resampled like the image and stays soft.
    """
    batch, size = tf.shape(image)[0], tf.shape(image)[1]
    seed_flip, seed_geometry, seed_contrast, seed_bright = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4))
    channels = image.shape[-1]
    stacked = image if mask is None else tf.concat([image, mask], axis=-1)
    flip = tf.random.stateless_uniform([batch], seed_flip) < 0.5
    stacked = tf.where(flip[:, None, None, None], tf.reverse(stacked, axis=[2]), stacked)
    transforms = _rotation_scale_transforms(batch, size, seed_geometry, config)
    stacked = tf.raw_ops.ImageProjectiveTransformV3(
        images=stacked, transforms=transforms, output_shape=tf.stack([size, size]),
        fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")
    image = stacked[..., :channels]
    if mask is not None:
        mask = stacked[..., channels:]
        if config.mask_resize == "nearest":
            mask = tf.cast(mask >= 0.5, image.dtype)
    jitter = config.intensity_jitter
    contrast = tf.random.stateless_uniform([batch, 1, 1, 1], seed_contrast, 1 - jitter, 1 + jitter)
    brightness = tf.random.stateless_uniform([batch, 1, 1, 1], seed_bright, -jitter / 2, jitter / 2)
    image = tf.clip_by_value(image * contrast + brightness, 0.0, 1.0)
    return image, mask
