"""Dice/IoU losses and Keras metrics for binary masks (NumPy scores: evaluation.metrics).

Scoring of empty masks: when both the truth and the thresholded prediction are empty, Dice and
IoU are 1.0 (the model was right that there is nothing there); when exactly one is empty they
are 0.0. The soft Dice *loss* adds a smoothing constant of 1 to numerator and denominator, which
gives the same behaviour in the limit and keeps gradients finite.
"""

from __future__ import annotations

import keras
from keras import ops

SMOOTH = 1.0


def _soft_dice_loss(y_true, y_pred, axis=None):
    """1 - soft Dice summed over ``axis`` (None: every pixel of the batch pooled)."""
    y_true = ops.cast(y_true, y_pred.dtype)
    intersection = ops.sum(y_true * y_pred, axis=axis)
    total = ops.sum(y_true, axis=axis) + ops.sum(y_pred, axis=axis)
    return 1.0 - (2.0 * intersection + SMOOTH) / (total + SMOOTH)


def _bce(y_true, y_pred):
    return ops.mean(keras.losses.binary_crossentropy(ops.cast(y_true, y_pred.dtype), y_pred))


@keras.saving.register_keras_serializable(package="bt_pipeline")
def soft_dice_loss(y_true, y_pred):
    """1 - soft Dice over the whole batch (pixels of all images pooled)."""
    return _soft_dice_loss(y_true, y_pred)


@keras.saving.register_keras_serializable(package="bt_pipeline")
def bce_dice_loss(y_true, y_pred):
    """Binary cross-entropy plus soft Dice loss."""
    return _bce(y_true, y_pred) + soft_dice_loss(y_true, y_pred)


@keras.saving.register_keras_serializable(package="bt_pipeline")
def bce_dice_per_image_loss(y_true, y_pred):
    """Binary cross-entropy plus the mean over images of each image's soft Dice loss.

    Pooling the batch (:func:`soft_dice_loss`) lets large lesions outweigh small ones; here
    every slice counts once, so a small lesion weighs as much as a large one, and a tumour-free
    slice is pushed to an empty prediction (its Dice loss is 1 - 1 / (1 + sum of p)).
    """
    per_image = _soft_dice_loss(y_true, y_pred, axis=tuple(range(1, len(y_pred.shape))))
    return _bce(y_true, y_pred) + ops.mean(per_image)


def _lovasz_hinge_per_image(y_true, y_pred):
    """Lovasz hinge of each image (Berman et al., CVPR 2018): the convex surrogate of
    1 - IoU, built from the pixels' hinge errors sorted from worst to best.

    ``y_pred`` holds probabilities; their logits are clipped to +-16 (float32's sigmoid is
    flat beyond that). With every logit at +-1 it equals 2 x (1 - IoU of logit > 0).
    """
    batch = ops.shape(y_pred)[0]
    labels = ops.reshape(ops.cast(y_true > 0.5, y_pred.dtype), (batch, -1))
    probability = ops.clip(ops.reshape(y_pred, (batch, -1)), 1e-7, 1.0 - 1e-7)
    logits = ops.log(probability) - ops.log(1.0 - probability)
    errors = 1.0 - logits * (2.0 * labels - 1.0)
    order = ops.argsort(-errors, axis=-1)
    errors_sorted = ops.take_along_axis(errors, order, axis=-1)
    truth_sorted = ops.take_along_axis(labels, order, axis=-1)  # from y_true: no gradient
    positives = ops.sum(truth_sorted, axis=-1, keepdims=True)
    intersection = positives - ops.cumsum(truth_sorted, axis=-1)
    union = positives + ops.cumsum(1.0 - truth_sorted, axis=-1)
    jaccard = 1.0 - intersection / union
    weights = ops.concatenate([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], axis=-1)
    return ops.sum(ops.relu(errors_sorted) * weights, axis=-1)


@keras.saving.register_keras_serializable(package="bt_pipeline")
def lovasz_per_image_loss(y_true, y_pred):
    """Mean over images of each image's Lovasz hinge: optimises IoU itself, so it is meant for
    fine-tuning a U-Net trained with a BCE + Dice loss (``train_unet --init-from``)."""
    return ops.mean(_lovasz_hinge_per_image(y_true, y_pred))


LOSSES = {"dice": soft_dice_loss, "bce_dice": bce_dice_loss,
          "bce_dice_per_image": bce_dice_per_image_loss, "lovasz_per_image": lovasz_per_image_loss}


def _overlap(y_true, y_pred, threshold: float):
    truth = ops.cast(y_true > 0.5, "float32")
    pred = ops.cast(y_pred > threshold, "float32")
    intersection = ops.sum(truth * pred)
    return intersection, ops.sum(truth), ops.sum(pred)


def dice_at_threshold(y_true, y_pred, threshold: float = 0.5):
    """Hard Dice of the batch at ``threshold``; 1.0 when both are empty."""
    intersection, n_true, n_pred = _overlap(y_true, y_pred, threshold)
    total = n_true + n_pred
    return ops.where(total > 0, 2.0 * intersection / ops.maximum(total, 1.0), 1.0)


def iou_at_threshold(y_true, y_pred, threshold: float = 0.5):
    """Hard IoU (Jaccard) of the batch at ``threshold``; 1.0 when both are empty."""
    intersection, n_true, n_pred = _overlap(y_true, y_pred, threshold)
    union = n_true + n_pred - intersection
    return ops.where(union > 0, intersection / ops.maximum(union, 1.0), 1.0)


@keras.saving.register_keras_serializable(package="bt_pipeline")
def dice_metric(y_true, y_pred):
    return dice_at_threshold(y_true, y_pred, 0.5)


@keras.saving.register_keras_serializable(package="bt_pipeline")
def iou_metric(y_true, y_pred):
    return iou_at_threshold(y_true, y_pred, 0.5)
