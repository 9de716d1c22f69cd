import keras
import numpy as np
import pytest

from bt_pipeline.evaluation.metrics import dice_score, iou_score
from bt_pipeline.models.classifier import build_classifier
from bt_pipeline.models.losses import (
    bce_dice_loss,
    dice_at_threshold,
    iou_at_threshold,
    soft_dice_loss,
)
from bt_pipeline.models.unet import build_unet, compile_unet


@pytest.mark.parametrize(("size", "depth", "base"), [(32, 2, 4), (64, 3, 4), (48, 4, 2)])
def test_unet_output_shapes(size, depth, base):
    if size % 2**depth:
        with pytest.raises(ValueError, match="divisible"):
            build_unet(size, depth, base)
        return
    model = build_unet(size, depth, base)
    out = model(np.zeros((2, size, size, 3), np.float32))
    assert tuple(out.shape) == (2, size, size, 1)
    names = [layer.name for layer in model.layers]
    assert sum(n.endswith("_transpose") for n in names) == depth
    assert sum(n.endswith("_concat") for n in names) == depth
    final = model.layers[-1]
    assert final.kernel_size == (1, 1) and final.activation.__name__ == "sigmoid"


def test_unet_batch_norm_is_optional():
    with_bn = build_unet(32, 2, 4, batch_norm=True)
    without = build_unet(32, 2, 4, batch_norm=False)
    count = lambda m: sum(isinstance(x, keras.layers.BatchNormalization) for x in m.layers)  # noqa: E731
    assert count(with_bn) == 2 * 5 and count(without) == 0


def test_reference_valid_convolution_example():
    layer = keras.layers.Conv2D(1, 3, padding="valid", use_bias=False)
    layer.build((None, 4, 4, 1))
    kernel = np.array([[1, 4, 1], [1, 4, 3], [3, 3, 1]], np.float32)
    layer.set_weights([kernel[:, :, None, None]])
    x = np.array([[4, 5, 8, 7], [1, 8, 8, 8], [3, 6, 6, 4], [6, 5, 7, 8]], np.float32)
    out = keras.ops.convert_to_numpy(layer(x[None, :, :, None]))[0, :, :, 0]
    np.testing.assert_array_equal(out, [[122, 148], [126, 134]])


def test_reference_transposed_convolution_example():
    layer = keras.layers.Conv2DTranspose(1, 3, strides=1, padding="valid", use_bias=False)
    layer.build((None, 2, 2, 1))
    kernel = np.array([[1, 4, 1], [1, 4, 3], [3, 3, 1]], np.float32)
    layer.set_weights([kernel[:, :, None, None]])
    x = np.array([[2, 1], [4, 4]], np.float32)
    out = keras.ops.convert_to_numpy(layer(x[None, :, :, None]))[0, :, :, 0]
    np.testing.assert_array_equal(out, [[2, 9, 6, 1], [6, 29, 30, 7], [10, 29, 33, 13],
                                        [12, 24, 16, 4]])


TRUTH = np.array([[0, 1, 1], [0, 1, 0], [0, 0, 0]], np.float32)
PRED = np.array([[0, 1, 0], [1, 1, 0], [0, 0, 0]], np.float32)  # 2 overlap, 3 + 3 pixels


@pytest.mark.parametrize(("truth", "pred", "dice", "iou"), [
    (TRUTH, PRED, 4 / 6, 2 / 4),
    (TRUTH, TRUTH, 1.0, 1.0),
    (TRUTH, np.zeros_like(TRUTH), 0.0, 0.0),
    (np.zeros_like(TRUTH), PRED, 0.0, 0.0),
    (np.zeros_like(TRUTH), np.zeros_like(TRUTH), 1.0, 1.0),  # empty vs empty: right
])
def test_dice_and_iou_against_hand_computed_values(truth, pred, dice, iou):
    assert dice_score(truth, pred) == pytest.approx(dice)
    assert iou_score(truth, pred) == pytest.approx(iou)
    soft = pred * 0.9 + 0.05  # probabilities on the right side of 0.5
    t, p = truth[None, :, :, None], soft[None, :, :, None]
    assert float(dice_at_threshold(t, p)) == pytest.approx(dice)
    assert float(iou_at_threshold(t, p)) == pytest.approx(iou)


def test_losses_are_small_when_right_and_large_when_wrong():
    t = TRUTH[None, :, :, None]
    right, wrong = t * 0.98 + 0.01, (1 - t) * 0.98 + 0.01
    # By hand, smoothing 1: right = 1 - (2*2.97 + 1)/(3 + 3.03 + 1),
    # wrong = 1 - (2*0.03 + 1)/(3 + 5.97 + 1).
    assert float(soft_dice_loss(t, right)) == pytest.approx(1 - 6.94 / 7.03, abs=1e-5)
    assert float(soft_dice_loss(t, wrong)) == pytest.approx(1 - 1.06 / 9.97, abs=1e-5)
    assert float(bce_dice_loss(t, right)) < float(bce_dice_loss(t, wrong))


def test_per_image_dice_loss_weighs_every_slice_once():
    from bt_pipeline.models.losses import bce_dice_per_image_loss

    big = np.zeros((1, 4, 4, 1), np.float32)
    big[0, :3, :3] = 1  # 9 px lesion, predicted exactly
    small = np.zeros((1, 4, 4, 1), np.float32)
    small[0, 0, 0] = 1  # 1 px lesion, missed entirely
    truth = np.concatenate([big, small])
    pred = np.concatenate([big, np.zeros_like(small)])
    bce = float(np.mean(keras.losses.binary_crossentropy(truth, pred)))
    # By hand, smoothing 1: big 1 - (18 + 1)/(18 + 1) = 0; small 1 - (0 + 1)/(1 + 1) = 0.5;
    # mean 0.25. Pooled over the batch it would be 1 - 19/20 = 0.05: the small miss all but
    # vanishes.
    assert float(bce_dice_per_image_loss(truth, pred)) == pytest.approx(bce + 0.25, abs=1e-5)
    assert float(soft_dice_loss(truth, pred)) == pytest.approx(0.05, abs=1e-5)


def test_unet_overfits_one_tiny_synthetic_batch():
    rng = np.random.default_rng(0)
    images = rng.normal(0.3, 0.05, (4, 32, 32, 3)).astype(np.float32)
    masks = np.zeros((4, 32, 32, 1), np.float32)
    for k, (r, c) in enumerate([(8, 8), (16, 20), (20, 10), (10, 22)]):
        masks[k, r - 4:r + 4, c - 5:c + 5] = 1
        images[k, r - 4:r + 4, c - 5:c + 5, 1] += 0.5
    model = compile_unet(build_unet(32, 2, 8), 1e-2)
    model.fit(images, masks, epochs=60, batch_size=4, verbose=0)
    prediction = keras.ops.convert_to_numpy(model(images, training=False)) > 0.5
    assert dice_score(masks > 0, prediction) > 0.9


def test_weight_averaging_is_set_on_the_optimizer_and_its_momentum_checked():
    averaged = compile_unet(build_unet(32, 2, 4), 1e-3, weight_ema=0.95).optimizer
    assert averaged.use_ema and averaged.ema_momentum == pytest.approx(0.95)
    assert not compile_unet(build_unet(32, 2, 4), 1e-3).optimizer.use_ema
    for momentum in (1.0, -0.1):
        with pytest.raises(ValueError, match="weight_ema"):
            compile_unet(build_unet(32, 2, 4), 1e-3, weight_ema=momentum)


def test_keras_save_load_gives_same_predictions(tmp_path):
    unet = build_unet(32, 2, 4)
    classifier = build_classifier(32, (4, 8), (0.1, 0.1), 0.1, 16)
    x = np.random.default_rng(1).random((3, 32, 32, 3)).astype(np.float32)
    for model in (unet, classifier):
        path = tmp_path / f"{model.name}.keras"
        model.save(path)
        again = keras.saving.load_model(path, safe_mode=True)
        np.testing.assert_allclose(again.predict(x, verbose=0), model.predict(x, verbose=0),
                                   rtol=1e-6, atol=1e-6)


def test_classifier_layers():
    model = build_classifier(64, (4, 8, 16), (0.1, 0.2, 0.3), 0.4, 32, "elu", "tanh")
    convs = [x for x in model.layers if isinstance(x, keras.layers.Conv2D)]
    assert [c.filters for c in convs] == [4, 8, 16] and all(c.kernel_size == (3, 3) for c in convs)
    drops = [x.rate for x in model.layers if isinstance(x, keras.layers.Dropout)]
    assert drops == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert sum(isinstance(x, keras.layers.MaxPooling2D) for x in model.layers) == 3
    dense = model.get_layer("dense")
    assert dense.units == 32 and dense.activation.__name__ == "tanh"
    assert model.output_shape == (None, 1)
    with pytest.raises(ValueError, match="one dropout per block"):
        build_classifier(64, (4, 8), (0.1,), 0.1, 16)


def test_lovasz_loss_is_twice_the_jaccard_loss_at_unit_margins_and_zero_when_sure():
    from bt_pipeline.models.losses import lovasz_per_image_loss

    def sigmoid(x):
        return 1.0 / (1.0 + np.exp(-x))

    truth = np.array([1, 1, 0, 0], np.float32).reshape(1, 2, 2, 1)
    logits = np.array([1, -1, 1, -1], np.float32).reshape(1, 2, 2, 1)  # IoU 1/3
    assert float(lovasz_per_image_loss(truth, sigmoid(logits))) == pytest.approx(4 / 3, abs=1e-5)
    rng = np.random.default_rng(0)
    truths = (rng.random((3, 8, 8, 1)) > 0.6).astype(np.float32)
    logits = np.where(rng.random((3, 8, 8, 1)) > 0.5, 1.0, -1.0).astype(np.float32)
    expected = np.mean([2 * (1 - iou_score(t > 0, z > 0))
                        for t, z in zip(truths, logits, strict=True)])
    assert float(lovasz_per_image_loss(truths, sigmoid(logits))) == pytest.approx(expected,
                                                                                  abs=1e-5)
    sure = sigmoid(np.where(truths > 0, 3.0, -3.0).astype(np.float32))  # margin beyond 1
    assert float(lovasz_per_image_loss(truths, sure)) == pytest.approx(0.0, abs=1e-6)


def test_unet_training_can_start_from_a_saved_unet(tiny_models, synthetic_root,
                                                   synthetic_manifest, tmp_path):
    from bt_pipeline.config import DataConfig, UNetConfig
    from bt_pipeline.training.train_unet import _start_from, train_unet

    saved = keras.saving.load_model(tiny_models[1], compile=False)
    model = build_unet(32, 2, 8)
    _start_from(model, tiny_models[1])
    batch = np.random.default_rng(1).random((2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(model.predict(batch, verbose=0), saved.predict(batch, verbose=0))
    with pytest.raises(ValueError, match="layers differ"):
        _start_from(build_unet(32, 2, 4), tiny_models[1])
    data = DataConfig(data_root=str(synthetic_root), manifest=str(synthetic_manifest),
                      image_size=32, batch_size=8, cache_dir="")
    config = UNetConfig(image_size=32, depth=2, base_filters=8, epochs=1, learning_rate=1e-4,
                        loss="lovasz_per_image", init_from=str(tiny_models[1]))
    tuned = train_unet(data, config, tmp_path / "run", tmp_path / "unet.keras", verbose=0)
    assert tuned.count_params() == saved.count_params()
    assert '"init_from"' in (tmp_path / "unet.json").read_text()


def test_auto_precision_is_bfloat16_only_where_the_cpu_has_it(monkeypatch):
    """Emulated bfloat16 trained 8 x slower than float32 on an AVX2-only CPU (docs/speed.md),
    so `auto`, the default of `bt cv`, must fall back to float32 there."""
    from bt_pipeline.models import precision

    monkeypatch.setattr(precision, "cpu_has_bfloat16", lambda: False)
    assert precision.resolve_precision("auto") == "float32"
    monkeypatch.setattr(precision, "cpu_has_bfloat16", lambda: True)
    assert precision.resolve_precision("auto") == "mixed_bfloat16"
    assert precision.resolve_precision("float32") == "float32"
    with pytest.raises(ValueError, match="unknown precision"):
        precision.resolve_precision("float16")
