"""U-Net segmenter (Ronneberger et al. 2015), sized for a laptop CPU.

Contracting path: (Conv 3x3 -> [BatchNorm] -> activation) x2, then 2x2 max pooling. Expanding
path: Conv2DTranspose (2x2, stride 2) upsampling, concatenation with the skip connection of
the same level, then the same double convolution. A 1x1 convolution with sigmoid gives the
per-pixel tumour probability.
"""

from __future__ import annotations

import keras

from bt_pipeline.config import UNetConfig
from bt_pipeline.models.batch_norm import FusedBatchNormalization
from bt_pipeline.models.losses import LOSSES, dice_metric, iou_metric


def _double_conv(x, width: int, batch_norm: bool, activation: str, name: str):
    for index in (1, 2):
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=not batch_norm,
                                name=f"{name}_conv{index}")(x)
        if batch_norm:
            # momentum 0.9, not Keras' 0.99: with ~35 steps per epoch on a CPU the moving
            # statistics must settle within an epoch or validation sees a different network.
            x = FusedBatchNormalization(momentum=0.9, name=f"{name}_bn{index}")(x)
        x = keras.layers.Activation(activation, name=f"{name}_act{index}")(x)
    return x


def build_unet(
    image_size: int,
    depth: int,
    base_filters: int,
    batch_norm: bool = True,
    activation: str = "relu",
    channels: int = 3,
) -> keras.Model:
    """Build the (uncompiled) U-Net; output (batch, S, S, 1) tumour probability.

    Args:
        image_size: input side; must be divisible by ``2**depth``.
        depth: number of poolings (levels below the input resolution).
        base_filters: width of the first level; each level down doubles it.
        batch_norm: insert BatchNormalization after every convolution.
        channels: 3 (RGB) per stacked slice of a 2.5D input (``DataConfig.channels``).
    """
    if depth < 1 or image_size % (2**depth):
        raise ValueError(f"image_size {image_size} must be divisible by 2**depth (depth={depth})")
    inputs = keras.Input((image_size, image_size, channels), name="slice")
    skips, x = [], inputs
    for level in range(depth):
        x = _double_conv(x, base_filters * 2**level, batch_norm, activation, f"down{level}")
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"down{level}_pool")(x)
    x = _double_conv(x, base_filters * 2**depth, batch_norm, activation, "bottleneck")
    for level in reversed(range(depth)):
        width = base_filters * 2**level
        x = keras.layers.Conv2DTranspose(width, 2, strides=2, name=f"up{level}_transpose")(x)
        x = keras.layers.Concatenate(name=f"up{level}_concat")([x, skips[level]])
        x = _double_conv(x, width, batch_norm, activation, f"up{level}")
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid", name="mask_probability")(x)
    return keras.Model(inputs, outputs, name="unet")


def split_unet(unet: keras.Model, extra_outputs: tuple[str, ...] = ()
               ) -> tuple[keras.Model, keras.Model]:
    """``unet`` as (encoder, decoder) sharing its layers: the encoder maps a slice to its skip
    connections, the bottleneck and the outputs of ``extra_outputs`` (layer names); the decoder
    maps [skips..., bottleneck] to the mask probability, so that
    ``decoder(encoder(x)[:depth + 1])`` is ``unet(x)``. Lets a gate that shares the encoder
    send only the slices it passes through the decoder."""
    depth = sum(layer.name.startswith("up") and layer.name.endswith("_transpose")
                for layer in unet.layers)
    skips = [unet.get_layer(f"down{level}_act2").output for level in range(depth)]
    bottom = unet.get_layer("bottleneck_act2").output
    extra = [unet.get_layer(name).output for name in extra_outputs]
    encoder = keras.Model(unet.inputs, [*skips, bottom, *extra], name="unet_encoder")
    skip_inputs = [keras.Input(tuple(s.shape[1:]), name=f"skip{level}")
                   for level, s in enumerate(skips)]
    x = bottom_input = keras.Input(tuple(bottom.shape[1:]), name="bottleneck")
    for level in reversed(range(depth)):
        x = unet.get_layer(f"up{level}_transpose")(x)
        x = unet.get_layer(f"up{level}_concat")([x, skip_inputs[level]])
        for layer in unet.layers:
            if layer.name.startswith(f"up{level}_") and layer.name not in (
                    f"up{level}_transpose", f"up{level}_concat"):
                x = layer(x)
    outputs = unet.get_layer("mask_probability")(x)
    return encoder, keras.Model([*skip_inputs, bottom_input], outputs, name="unet_decoder")


def build_unet_from_config(config: UNetConfig) -> keras.Model:
    """:func:`build_unet` with every argument from ``config`` (input from its preprocessing)."""
    return build_unet(config.image_size, config.depth, config.base_filters, config.batch_norm,
                      channels=config.preprocessing.channels)


def compile_unet(model: keras.Model,
                 learning_rate: float | keras.optimizers.schedules.LearningRateSchedule,
                 loss: str = UNetConfig.loss,
                 weight_ema: float = 0.0) -> keras.Model:
    """Adam with the chosen Dice-based loss, Dice and IoU at 0.5 tracked. ``weight_ema`` > 0
    makes the optimizer keep a moving average of the weights with that momentum (pair it with
    ``training_callbacks(..., weight_ema=True)`` so validation and checkpoints use it)."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {sorted(LOSSES)}")
    if not 0.0 <= weight_ema < 1.0:
        raise ValueError(f"weight_ema {weight_ema} must be in [0, 1): 0 = off, e.g. 0.99")
    optimizer = keras.optimizers.Adam(learning_rate, use_ema=weight_ema > 0,
                                      ema_momentum=weight_ema)
    model.compile(optimizer=optimizer, loss=LOSSES[loss], metrics=[dice_metric, iou_metric])
    return model
