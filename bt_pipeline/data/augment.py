"""Training-time augmentation on whole batches, image and mask kept aligned.

Left-right flips (brains are roughly symmetric; up-down flips are not anatomical), a rotation
and scale about the centre applied by one projective transform to the image and the mask
together, and a contrast/brightness jitter on the image only. Optional, each off by default
(DataConfig): gamma, Gaussian noise, Gaussian blur and simulated low resolution on the image
(nnU-Net's 2D intensity list), and missing-sequence augmentation. Randomness is stateless and
seeded per batch, so a seeded pipeline yields the same batches run after run.
"""

from __future__ import annotations

import math

import tensorflow as tf

from bt_pipeline.config import DataConfig
from bt_pipeline.data.preprocess import FLAIR, POST, PRE


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
    image = _intensity_augment(image, tf.random.experimental.stateless_fold_in(seed, 7), config)
    if config.missing_sequence_p > 0:
        image = missing_sequences(image, tf.random.experimental.stateless_fold_in(seed, 8),
                                  config.missing_sequence_p)
    return image, mask


def _chosen(batch, seed, probability: float) -> tf.Tensor:
    """(B, 1, 1, 1) bool: which images of the batch a transform applies to."""
    return (tf.random.stateless_uniform([batch], seed) < probability)[:, None, None, None]


def _intensity_augment(image: tf.Tensor, seed, config: DataConfig) -> tf.Tensor:
    """Gamma, noise, blur and low resolution, each on a random share of the images."""
    batch, size = tf.shape(image)[0], tf.shape(image)[1]
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 8))
    p = config.extra_augment_p
    if config.gamma_range > 0:
        gamma = tf.random.stateless_uniform([batch, 1, 1, 1], seeds[0], 1 - config.gamma_range,
                                            1 + config.gamma_range)
        image = tf.where(_chosen(batch, seeds[1], p), tf.pow(image + 1e-7, gamma), image)
    if config.noise_std > 0:
        sigma = tf.random.stateless_uniform([batch, 1, 1, 1], seeds[2], 0.0, config.noise_std)
        noisy = image + sigma * tf.random.stateless_normal(tf.shape(image), seeds[3])
        image = tf.where(_chosen(batch, seeds[4], p), noisy, image)
    if config.blur_sigma > 0:
        sigma = tf.random.stateless_uniform([], seeds[5], 0.5, max(0.5, config.blur_sigma))
        image = tf.where(_chosen(batch, seeds[5] + 1, p), gaussian_blur(image, sigma), image)
    if config.low_res_scale > 0:
        factor = tf.random.stateless_uniform([], seeds[6], config.low_res_scale, 1.0)
        small = tf.cast(tf.math.ceil(tf.cast(size, tf.float32) * factor), tf.int32)
        coarse = tf.image.resize(tf.image.resize(image, [small, small], method="nearest"),
                                 [size, size], method="bilinear")
        image = tf.where(_chosen(batch, seeds[7], p), coarse, image)
    return tf.clip_by_value(image, 0.0, 1.0)


def gaussian_blur(image: tf.Tensor, sigma: tf.Tensor) -> tf.Tensor:
    """Each channel blurred by a separable Gaussian of ``sigma`` pixels (radius 3 px)."""
    offsets = tf.range(-3.0, 4.0)
    kernel = tf.exp(-0.5 * tf.square(offsets / sigma))
    kernel /= tf.reduce_sum(kernel)
    channels = tf.shape(image)[-1]
    rows = tf.tile(tf.reshape(kernel, [7, 1, 1, 1]), [1, 1, channels, 1])
    columns = tf.tile(tf.reshape(kernel, [1, 7, 1, 1]), [1, 1, channels, 1])
    image = tf.nn.depthwise_conv2d(image, rows, [1, 1, 1, 1], "SAME")
    return tf.nn.depthwise_conv2d(image, columns, [1, 1, 1, 1], "SAME")


def missing_sequences(image: tf.Tensor, seed, probability: float) -> tf.Tensor:
    """With ``probability`` per image, replace the pre-contrast channel, the post-contrast
    channel, or both (a third each) by FLAIR, in every stacked slice of the input, as the
    dataset itself fills a missing sequence. Trains one model that also takes FLAIR alone."""
    batch = tf.shape(image)[0]
    seed_apply, seed_which = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    apply = tf.random.stateless_uniform([batch], seed_apply) < probability
    which = tf.random.stateless_uniform([batch], seed_which, 0, 3, dtype=tf.int32)
    shape = tf.shape(image)
    slices = tf.reshape(image, tf.concat([shape[:3], [-1, 3]], axis=0))  # (B, S, S, n, 3)
    flair = slices[..., FLAIR]
    pre = tf.where((apply & (which != 1))[:, None, None, None], flair, slices[..., PRE])
    post = tf.where((apply & (which != 0))[:, None, None, None], flair, slices[..., POST])
    return tf.reshape(tf.stack([pre, flair, post], axis=-1), shape)
