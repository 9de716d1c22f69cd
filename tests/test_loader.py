import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from bt_pipeline.config import DataConfig
from bt_pipeline.data.augment import augment_batch
from bt_pipeline.data.loader import classifier_dataset, load_split, unet_dataset
from bt_pipeline.data.manifest import read_manifest
from bt_pipeline.data.preprocess import SliceReadError, load_slice


@pytest.fixture()
def config(synthetic_root, synthetic_manifest, tmp_path):
    return DataConfig(data_root=str(synthetic_root), manifest=str(synthetic_manifest),
                      image_size=32, batch_size=4, negative_share=0.5, mask_resize="nearest",
                      cache_dir=str(tmp_path / "cache"))


def test_split_arrays_match_the_one_preprocessing_function(config):
    manifest = read_manifest(config.manifest)
    arrays = load_split(manifest, "train", config)
    assert arrays.images.shape == (len(arrays.rows), 32, 32, 3)
    assert arrays.masks.shape == (len(arrays.rows), 32, 32, 1)
    for index in (0, len(arrays.rows) - 1):
        path = f"{config.data_root}/{arrays.rows['image'][index]}"
        np.testing.assert_array_equal(arrays.images[index], load_slice(path, 32))
    cached = load_split(manifest, "train", config)  # second call reads the disk cache
    np.testing.assert_array_equal(cached.images, arrays.images)


@pytest.mark.parametrize("training", [True, False])
def test_classifier_batches(config, training):
    arrays = load_split(read_manifest(config.manifest), "train", config)
    images, labels = next(iter(classifier_dataset(arrays, config, training)))
    assert images.shape == (4, 32, 32, 3) and images.dtype == tf.float32
    assert labels.shape == (4, 1) and labels.dtype == tf.float32
    assert float(tf.reduce_min(images)) >= 0.0 and float(tf.reduce_max(images)) <= 1.0
    assert set(np.unique(labels.numpy())) <= {0.0, 1.0}


@pytest.mark.parametrize("training", [True, False])
def test_unet_batches_hold_tumours_and_a_share_of_negatives(config, training):
    arrays = load_split(read_manifest(config.manifest), "train", config)
    batches = list(unet_dataset(arrays, config, training))
    masks = np.concatenate([m.numpy() for _, m in batches])
    n_pos = int((arrays.labels > 0).sum())
    assert len(masks) == n_pos + round(0.5 * n_pos)
    assert int((masks.reshape(len(masks), -1).max(axis=1) > 0).sum()) == n_pos
    assert set(np.unique(masks)) <= {0.0, 1.0}
    assert batches[0][0].shape[1:] == (32, 32, 3) and batches[0][1].shape[1:] == (32, 32, 1)


def test_area_masks_are_soft_cached_apart_and_stay_soft_through_augmentation(config):
    manifest = read_manifest(config.manifest)
    binary = load_split(manifest, "train", config)
    area_config = dataclasses.replace(config, mask_resize="area")
    soft = load_split(manifest, "train", area_config)  # same cache dir: must not reuse "masks"
    assert set(np.unique(binary.masks)) <= {0.0, 1.0}
    assert ((soft.masks > 0) & (soft.masks < 1)).any()
    assert 0.0 <= soft.masks.min() and soft.masks.max() <= 1.0
    _, masks = next(iter(unet_dataset(soft, area_config, training=True)))
    masks = masks.numpy()
    assert ((masks > 0) & (masks < 1)).any()
    _, binary_masks = next(iter(unet_dataset(binary, config, training=True)))
    assert set(np.unique(binary_masks.numpy())) <= {0.0, 1.0}


def test_training_order_is_seeded(config):
    arrays = load_split(read_manifest(config.manifest), "train", config)
    first = [b[1].numpy() for b in classifier_dataset(arrays, config, True)]
    again = [b[1].numpy() for b in classifier_dataset(arrays, config, True)]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_augmentation_keeps_masks_on_the_lesion(config):
    arrays = load_split(read_manifest(config.manifest), "train", config)
    tumour = arrays.labels > 0
    images, masks = tf.constant(arrays.images[tumour]), tf.constant(arrays.masks[tumour])
    strong = dataclasses.replace(config, max_rotation_deg=25.0, max_scale=0.15,
                                 intensity_jitter=0.0)
    for seed in range(3):
        out_images, out_masks = augment_batch(images, masks, tf.constant([seed, 1]), strong)
        out_images, out_masks = out_images.numpy(), out_masks.numpy()
        assert set(np.unique(out_masks)) <= {0.0, 1.0}
        assert not np.array_equal(out_masks, masks.numpy())  # something moved
        # The synthetic lesion is the only FLAIR-bright tissue: after the move, the mask must
        # still sit on it and cover it (a mask moved on its own scores about 0.5 on both).
        bright = out_images[..., 1] > 0.6
        inside = out_masks[..., 0] > 0
        assert (bright & inside).sum() / inside.sum() > 0.85
        assert (bright & inside).sum() / bright.sum() > 0.85
        area_ratio = out_masks.sum() / masks.numpy().sum()
        assert 0.6 < area_ratio < 1.6


def test_bad_slice_fails_in_the_loader_naming_the_file(config, tmp_path):
    import shutil

    root = tmp_path / "kaggle_3m"
    shutil.copytree(config.data_root, root)
    manifest = read_manifest(config.manifest)
    victim = root / manifest[manifest["split"] == "val"]["image"].iloc[2]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated
    broken = dataclasses.replace(config, data_root=str(root), cache_dir="")
    with pytest.raises(SliceReadError, match=victim.name):
        load_split(manifest, "val", broken)
    (root / manifest[manifest["split"] == "test"]["image"].iloc[0]).unlink()
    with pytest.raises(SliceReadError, match="file not found"):
        load_split(manifest, "test", broken)


def test_context_slices_stack_each_patients_neighbours_as_channels(config):
    """2.5D input: slice k-1, k, k+1 of the same patient, the edge slice repeated."""
    manifest = read_manifest(config.manifest)
    plain = load_split(manifest, "train", config)
    stacked = load_split(manifest, "train", dataclasses.replace(config, context_slices=1))
    assert dataclasses.replace(config, context_slices=1).channels == 9
    assert stacked.images.shape == (len(plain.rows), 32, 32, 9)
    rows = plain.rows
    for index in (0, 4, len(rows) - 1):
        patient, number = rows["patient_id"][index], rows["slice"][index]
        same = rows[rows["patient_id"] == patient]
        numbers = same["slice"].to_numpy()
        for offset, channels in ((-1, slice(0, 3)), (0, slice(3, 6)), (1, slice(6, 9))):
            wanted = int(np.clip(number + offset, numbers.min(), numbers.max()))
            source = same.index[numbers == wanted][0]
            np.testing.assert_array_equal(stacked.images[index][..., channels],
                                          plain.images[source])
    images, _ = next(iter(unet_dataset(stacked, dataclasses.replace(config, context_slices=1),
                                       training=True)))
    assert images.shape[1:] == (32, 32, 9)


def test_with_context_of_a_short_volume():
    from bt_pipeline.data.preprocess import with_context

    volume = np.arange(2, dtype=np.float32).reshape(2, 1, 1, 1) * np.ones((2, 2, 2, 3))
    out = with_context(volume, 2)  # five slices from a volume of two
    assert out.shape == (2, 2, 2, 15)
    assert list(out[0, 0, 0, ::3]) == [0, 0, 0, 1, 1] and list(out[1, 0, 0, ::3]) == [0, 0, 1, 1, 1]
    assert with_context(volume, 0) is volume


def test_missing_sequence_augmentation_puts_flair_in_place_of_pre_or_post():
    import tensorflow as tf

    from bt_pipeline.data.augment import missing_sequences

    rng = np.random.default_rng(0)
    image = tf.constant(rng.random((64, 8, 8, 9), dtype=np.float32))  # 2.5D: 3 slices x RGB
    out = missing_sequences(image, tf.constant([1, 2]), probability=1.0).numpy()
    slices, original = out.reshape(64, 8, 8, 3, 3), image.numpy().reshape(64, 8, 8, 3, 3)
    np.testing.assert_array_equal(slices[..., 1], original[..., 1])  # FLAIR kept
    pre_is_flair = np.all(slices[..., 0] == original[..., 1], axis=(1, 2, 3))
    post_is_flair = np.all(slices[..., 2] == original[..., 1], axis=(1, 2, 3))
    assert (pre_is_flair | post_is_flair).all()  # every image lost at least one sequence
    assert pre_is_flair.any() and post_is_flair.any() and (pre_is_flair & post_is_flair).any()
    assert (~pre_is_flair).any() and (~post_is_flair).any()
    untouched = missing_sequences(image, tf.constant([1, 2]), probability=0.0).numpy()
    np.testing.assert_array_equal(untouched, image.numpy())


def test_intensity_augmentations_stay_in_range_and_keep_masks_aligned(config):
    import dataclasses

    import tensorflow as tf

    strong = dataclasses.replace(config, gamma_range=0.3, noise_std=0.05, blur_sigma=1.0,
                                 low_res_scale=0.5, extra_augment_p=1.0, max_scale=0.3)
    image = tf.random.stateless_uniform((4, 32, 32, 3), [0, 1])
    mask = tf.cast(tf.random.stateless_uniform((4, 32, 32, 1), [0, 2]) > 0.7, tf.float32)
    plain_image, plain_mask = augment_batch(image, mask, tf.constant([3, 4]), config)
    strong_image, strong_mask = augment_batch(image, mask, tf.constant([3, 4]), strong)
    assert float(tf.reduce_min(strong_image)) >= 0 and float(tf.reduce_max(strong_image)) <= 1
    assert not np.allclose(strong_image.numpy(), plain_image.numpy())
    # intensity transforms never move the mask: same geometry draws, same mask
    geometry_only = dataclasses.replace(config, max_scale=0.3)
    _, expected_mask = augment_batch(image, mask, tf.constant([3, 4]), geometry_only)
    np.testing.assert_array_equal(strong_mask.numpy(), expected_mask.numpy())
