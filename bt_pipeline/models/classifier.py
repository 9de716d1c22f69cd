"""Slice classifier: does this axial slice show tumour?

Stacked blocks of Conv2D (3x3, growing filters) -> MaxPooling -> Dropout, then Flatten ->
Dropout -> Dense -> sigmoid, after the reference design. Tuning and training call the same
builder; the tuner only chooses its arguments.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from bt_pipeline.config import ClassifierConfig
from bt_pipeline.models.batch_norm import FusedBatchNormalization


def build_classifier(
    image_size: int,
    filters: Sequence[int],
    block_dropouts: Sequence[float],
    dense_dropout: float,
    dense_units: int,
    conv_activation: str = "relu",
    dense_activation: str = "relu",
    batch_norm: bool = True,
    convs_per_block: int = 1,
    channels: int = 3,
) -> keras.Model:
    """Build the (uncompiled) classifier; output is P(tumour) with shape (batch, 1).

    ``batch_norm`` adds BatchNormalization between each convolution and its activation; it
    lets the net converge in the few epochs a CPU tuning budget allows. ``convs_per_block``
    stacks that many convolutions before each pooling (1 = the reference design).
    ``channels`` is 3 (RGB) per stacked slice of a 2.5D input (``DataConfig.channels``).
    """
    if len(block_dropouts) != len(filters):
        raise ValueError(f"need one dropout per block: {len(filters)} blocks, "
                         f"{len(block_dropouts)} dropouts")
    if image_size % (2 ** len(filters)):
        raise ValueError(f"image_size {image_size} must be divisible by 2**{len(filters)}")
    inputs = keras.Input((image_size, image_size, channels), name="slice")
    x = inputs
    for block, (width, rate) in enumerate(zip(filters, block_dropouts, strict=True), start=1):
        for conv in range(1, convs_per_block + 1):
            suffix = "" if conv == 1 else str(conv)  # the reference design's names unchanged
            x = keras.layers.Conv2D(width, 3, padding="same", use_bias=not batch_norm,
                                    name=f"block{block}_conv{suffix}")(x)
            if batch_norm:
                x = FusedBatchNormalization(momentum=0.9, name=f"block{block}_bn{suffix}")(x)
            x = keras.layers.Activation(conv_activation, name=f"block{block}_act{suffix}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
        x = keras.layers.Dropout(rate, name=f"block{block}_dropout")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dropout(dense_dropout, name="dense_dropout")(x)
    x = keras.layers.Dense(dense_units, activation=dense_activation, name="dense")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="tumor_probability")(x)
    return keras.Model(inputs, outputs, name="slice_classifier")


def build_classifier_from_config(config: ClassifierConfig) -> keras.Model:
    """:func:`build_classifier` with every argument from ``config``."""
    return build_classifier(config.image_size, config.filters, config.block_dropouts,
                            config.dense_dropout, config.dense_units, config.conv_activation,
                            config.dense_activation, config.batch_norm, config.convs_per_block,
                            config.preprocessing.channels)


def compile_classifier(model: keras.Model, learning_rate: float) -> keras.Model:
    """Adam + binary cross-entropy, with accuracy and ROC AUC tracked."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="binary_crossentropy",
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")],
    )
    return model
