"""Floating-point operations of one forward pass, counted from a model's layers.

Only the layers that do matrix-multiply work are counted (Conv2D, Conv2DTranspose, Dense),
each multiply-add as 2 FLOPs, biases as 1 per output: the same kind of work as the
matrix-multiply peak that ``make bench`` measures, so achieved / peak is a fair efficiency.
Batch norm, activations, pooling and concatenation are memory-bound element-wise work and
are left out, so efficiencies are, if anything, understated. A training step is
taken as 3 forward passes (the backward pass computes gradients for both inputs and weights).
"""

from __future__ import annotations

import math

import keras

TRAINING_STEP_FORWARD_PASSES = 3


def _dims(shape) -> list[int]:
    return [int(d) for d in shape[1:]]  # drop the batch axis


def layer_flops(layer: keras.layers.Layer) -> int:
    """FLOPs of ``layer`` for one sample (0 for layers that are not counted)."""
    if isinstance(layer, keras.layers.Conv2DTranspose):
        height, width, channels_in = _dims(layer.input.shape)
        kernel_h, kernel_w = layer.kernel_size
        macs = height * width * channels_in * kernel_h * kernel_w * layer.filters
        out = math.prod(_dims(layer.output.shape))
        return 2 * macs + (out if layer.use_bias else 0)
    if isinstance(layer, keras.layers.Conv2D):
        out_h, out_w, channels_out = _dims(layer.output.shape)
        channels_in = _dims(layer.input.shape)[-1]
        kernel_h, kernel_w = layer.kernel_size
        macs = out_h * out_w * channels_out * kernel_h * kernel_w * channels_in // layer.groups
        return 2 * macs + (out_h * out_w * channels_out if layer.use_bias else 0)
    if isinstance(layer, keras.layers.Dense):
        units_in = _dims(layer.input.shape)[-1]
        rows = math.prod(_dims(layer.input.shape)[:-1])
        return rows * (2 * units_in * layer.units + (layer.units if layer.use_bias else 0))
    return 0


def forward_flops(model: keras.Model) -> int:
    """FLOPs of one forward pass of ``model`` on one sample."""
    total = 0
    for layer in model.layers:
        total += forward_flops(layer) if isinstance(layer, keras.Model) else layer_flops(layer)
    return total
