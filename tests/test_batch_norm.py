"""The fused batch norm computes what Keras' layer computes, in both modes and precisions."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from bt_pipeline.models.batch_norm import FusedBatchNormalization, with_fused_batch_norm
from bt_pipeline.models.precision import with_dtype_policy
from bt_pipeline.models.unet import build_unet


def _pair(shape, dtype="float32"):
    """The same one-layer model with Keras' and with the fused batch norm, same weights."""
    models = []
    for layer in (keras.layers.BatchNormalization, FusedBatchNormalization):
        inputs = keras.Input(shape)
        outputs = layer(momentum=0.9, dtype=dtype, name="bn")(inputs)
        models.append(keras.Model(inputs, outputs))
    rng = np.random.default_rng(0)
    weights = [rng.uniform(0.5, 2.0, w.shape).astype(np.float32)
               for w in models[0].get_weights()]
    for model in models:
        model.set_weights(weights)
    return models


def _batch(shape, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(6, *shape)) * 3.0 + 1.5).astype(np.float32)


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-4), ("mixed_bfloat16", 5e-2)])
def test_fused_matches_keras_in_training_and_inference(dtype, tolerance):
    keras_bn, fused = _pair((9, 9, 5), dtype)
    x = _batch((9, 9, 5))
    for training in (True, False):
        expected = np.asarray(keras_bn(x, training=training), np.float32)
        actual = np.asarray(fused(x, training=training), np.float32)
        np.testing.assert_allclose(actual, expected, atol=tolerance * np.abs(expected).max())
    # the training calls above moved both layers' statistics the same way
    for a, b in zip(keras_bn.get_weights(), fused.get_weights(), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5)
    assert not np.allclose(fused.layers[1].moving_mean.numpy(), 0.0)


def test_fused_gradients_match_keras():
    keras_bn, fused = _pair((7, 7, 4))
    x = tf.constant(_batch((7, 7, 4)))
    upstream = tf.constant(_batch((7, 7, 4), seed=2))
    gradients = []
    for model in (keras_bn, fused):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(model(x, training=True) * upstream)
        gradients.append(tape.gradient(loss, [x, *model.trainable_weights]))
    for a, b in zip(*gradients, strict=True):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-3, atol=1e-3)


def test_inputs_the_kernel_cannot_take_use_keras_layer():
    keras_bn, fused = _pair((5,))  # 2-D input: no fused kernel
    x = _batch((5,))
    np.testing.assert_allclose(np.asarray(fused(x, training=True)),
                               np.asarray(keras_bn(x, training=True)), rtol=1e-6)


def test_converted_model_predicts_the_same_and_round_trips(tmp_path):
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid")(x)
    plain = keras.Model(inputs, outputs)
    plain.layers[2].set_weights([np.full((4,), v, np.float32) for v in (1.5, 0.2, 0.3, 2.0)])
    fused = with_fused_batch_norm(plain)
    assert isinstance(fused.layers[2], FusedBatchNormalization)
    assert with_fused_batch_norm(fused) is fused
    x = _batch((16, 16, 3))
    np.testing.assert_allclose(fused.predict(x, verbose=0), plain.predict(x, verbose=0),
                               atol=1e-6)
    fused.save(tmp_path / "fused.keras")
    loaded = keras.saving.load_model(tmp_path / "fused.keras", compile=False)
    assert isinstance(loaded.layers[2], FusedBatchNormalization)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), plain.predict(x, verbose=0),
                               atol=1e-6)


def test_unet_built_with_fused_batch_norm_survives_a_precision_change():
    unet = build_unet(32, 2, 4, batch_norm=True)
    assert any(isinstance(layer, FusedBatchNormalization) for layer in unet.layers)
    bf16 = with_dtype_policy(unet, "mixed_bfloat16")
    assert any(isinstance(layer, FusedBatchNormalization) for layer in bf16.layers)
    x = _batch((32, 32, 3))[:2] / 3.0
    np.testing.assert_allclose(np.asarray(bf16(x, training=False)),
                               np.asarray(unet(x, training=False)), atol=0.05)
