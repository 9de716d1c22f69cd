"""FLOP counting against hand counts, and the bench's model variants against plain calls."""

import keras
import numpy as np
import pytest

from bt_pipeline.inference.predictor import to_bfloat16
from bt_pipeline.models.unet import build_unet
from bt_pipeline.studies.bench import inference_rate, inference_variants, training_rate
from bt_pipeline.studies.flops import forward_flops


def test_forward_flops_match_hand_counts():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)              # 8*8*4 * (2*27 + 1)
    x = keras.layers.Conv2D(5, 3, padding="valid", use_bias=False)(x)  # 6*6*5 * 2*36
    x = keras.layers.BatchNormalization()(x)                           # not counted
    x = keras.layers.Conv2DTranspose(2, 2, strides=2)(x)               # 6*6*5*4*2 * 2 + 12*12*2
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(3)(x)                                  # 288 * 3 * 2 + 3
    model = keras.Model(inputs, outputs)
    expected = (8 * 8 * 4 * 55) + (6 * 6 * 5 * 72) + (6 * 6 * 5 * 4 * 2 * 2 + 288) + (288 * 6 + 3)
    assert forward_flops(model) == expected


def test_unet_flops_scale_with_the_input_area():
    small = forward_flops(build_unet(32, depth=2, base_filters=4))
    large = forward_flops(build_unet(64, depth=2, base_filters=4))
    assert large == 4 * small


@pytest.fixture(scope="module")
def tiny_unet():
    keras.utils.set_random_seed(0)
    return build_unet(32, depth=2, base_filters=4)


def test_every_inference_variant_computes_the_same_masks(tiny_unet):
    batch = np.random.default_rng(0).random((4, 32, 32, 3), np.float32)
    reference = tiny_unet(batch, training=False).numpy()
    for name, run in inference_variants(tiny_unet).items():
        tolerance = 2e-2 if name == "bf16" else 1e-4  # bfloat16 keeps 8 bits of mantissa
        np.testing.assert_allclose(run(batch), reference, atol=tolerance, err_msg=name)
        assert inference_rate(run, batch, seconds=0.05) > 0


def test_bfloat16_copy_computes_in_bfloat16_and_answers_in_float32(tiny_unet):
    copy = to_bfloat16(tiny_unet)
    assert copy.layers[1].compute_dtype == "bfloat16"
    assert copy.outputs[0].dtype == "float32"
    assert tiny_unet.layers[1].compute_dtype == "float32"  # the original is untouched


def test_training_rate_runs_real_steps(tiny_unet):
    batch = np.random.default_rng(0).random((4, 32, 32, 3), np.float32)
    targets = (batch[..., :1] > 0.5).astype(np.float32)
    before = [w.copy() for w in tiny_unet.get_weights()]
    assert training_rate(tiny_unet, "binary_crossentropy", batch, targets, seconds=0.05) > 0
    for old, new in zip(before, tiny_unet.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)  # steps ran on a copy
    bf16 = training_rate(tiny_unet, "binary_crossentropy", batch, targets, seconds=0.05,
                         precision="mixed_bfloat16")
    assert bf16 > 0


def test_width_rates_time_each_width_of_one_design():
    import dataclasses

    from bt_pipeline.config import UNetConfig
    from bt_pipeline.studies.bench import width_rates

    config = dataclasses.replace(UNetConfig(), image_size=32, depth=2)
    rows = width_rates(config, widths=(4, 8), seconds=0.05, batch_size=2)
    assert [r["base_width"] for r in rows] == [4, 8]
    assert rows[1]["parameters"] > rows[0]["parameters"]
    # doubling every width multiplies the convolutions' FLOPs by about four
    assert 3.0 < rows[1]["gflop_per_slice"] / rows[0]["gflop_per_slice"] < 4.5
    assert rows[0]["bfloat16_time_vs_first"] == 1.0
    assert all(r["float32_slices_per_s"] > 0 and r["bfloat16_slices_per_s"] > 0 for r in rows)
