"""Stage 1 on the U-Net's trained encoder: the slice gate.

The U-Net's contracting path has learned tumour features from pixel labels; the gate reuses it
as its convolutional trunk and adds a small head (global average and max pooling, dropout, a
dense layer, a sigmoid). Only the top ``fine_tune_blocks`` of the trunk's blocks (the deepest
down block(s) and the bottleneck) may train; the rest is frozen, so its output can be computed
once and cached while the head is searched, and at inference it is the U-Net's own encoder,
computed once per slice for both stages.

    U-Net blocks:  down0 -> down1 -> ... -> down{depth-1} -> bottleneck
                   |------ frozen (cut) ------|-- fine-tuned --|-- head --> P(tumour)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import keras
import numpy as np


@dataclass
class Gate:
    """A gate in its three pieces: ``frozen`` (slice -> features at the cut), ``head``
    (features -> P(tumour), the fine-tuned blocks included) and ``full`` (slice -> P)."""

    frozen: keras.Model
    head: keras.Model
    full: keras.Model


def encoder_blocks(unet: keras.Model) -> list[list[keras.layers.Layer]]:
    """The U-Net's contracting path as blocks of layers in order: ``down<l>`` (convolutions,
    batch norms, activations, pooling) for each level, then ``bottleneck``."""
    depth = sum(layer.name.endswith("_pool") and layer.name.startswith("down")
                for layer in unet.layers)
    names = [f"down{level}" for level in range(depth)] + ["bottleneck"]
    return [[layer for layer in unet.layers if layer.name.startswith(f"{name}_")]
            for name in names]


def build_gate_from_config(unet: keras.Model, config) -> Gate:
    """:func:`build_gate` with every argument from a ``GateConfig``."""
    return build_gate(unet, config.fine_tune_blocks, config.dense_units, config.dense_activation,
                      config.feature_dropout, config.dense_dropout)


def build_gate(unet: keras.Model, fine_tune_blocks: int = 0, dense_units: int = 128,
               dense_activation: str = "relu", feature_dropout: float = 0.2,
               dense_dropout: float = 0.2) -> Gate:
    """The gate on a copy of ``unet``'s contracting path (its trained weights); ``unet`` itself
    is left untouched. ``fine_tune_blocks`` 0 freezes the whole trunk."""
    copy = keras.models.clone_model(unet)
    copy.set_weights(unet.get_weights())
    blocks = encoder_blocks(copy)
    if not 0 <= fine_tune_blocks < len(blocks):
        raise ValueError(f"fine_tune_blocks {fine_tune_blocks} outside 0..{len(blocks) - 1}")
    cut = len(blocks) - fine_tune_blocks
    image = keras.Input(tuple(unet.inputs[0].shape[1:]), name="slice")
    x = image
    for layer in (layer for block in blocks[:cut] for layer in block):
        layer.trainable = False
        x = layer(x)
    frozen = keras.Model(image, x, name="gate_frozen")
    features = keras.Input(tuple(x.shape[1:]), name="trunk_features")
    y = features
    for layer in (layer for block in blocks[cut:] for layer in block):
        y = layer(y)
    y = keras.layers.Concatenate(name="head_pool")([
        keras.layers.GlobalAveragePooling2D(name="head_avg")(y),
        keras.layers.GlobalMaxPooling2D(name="head_max")(y)])
    y = keras.layers.Dropout(feature_dropout, name="head_feature_dropout")(y)
    y = keras.layers.Dense(dense_units, activation=dense_activation, name="head_dense")(y)
    y = keras.layers.Dropout(dense_dropout, name="head_dense_dropout")(y)
    y = keras.layers.Dense(1, activation="sigmoid", name="tumor_probability")(y)
    head = keras.Model(features, y, name="gate_head")
    full = keras.Model(image, head(frozen(image)), name="encoder_gate")
    return Gate(frozen, head, full)


def cut_layer_name(unet: keras.Model, fine_tune_blocks: int) -> str:
    """The U-Net layer whose output the gate's frozen part ends on."""
    blocks = encoder_blocks(unet)
    return blocks[len(blocks) - fine_tune_blocks - 1][-1].name


def fingerprint(model: keras.Model) -> str:
    """SHA-256 of a model's weights (shapes and values), naming which U-Net a gate was built
    on."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        array = np.ascontiguousarray(weight, dtype=np.float32)
        digest.update(str(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
