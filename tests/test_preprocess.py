import cv2
import numpy as np
import pytest

from bt_pipeline.data.preprocess import (
    SliceReadError,
    load_mask,
    load_slice,
    preprocess_mask,
    read_image,
)


def _slice_file(root, index=3):
    return sorted(root.glob(f"*/*_{index}.tif"))[0]


def test_load_slice_shape_range_and_channel_order(synthetic_root):
    path = _slice_file(synthetic_root, 5)
    image = load_slice(path, 32)
    assert image.shape == (32, 32, 3) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    raw_bgr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(read_image(path), raw_bgr[..., ::-1])  # RGB out


def test_mask_resize_is_nearest_neighbour(synthetic_root):
    mask = load_mask(sorted(synthetic_root.glob("*/*_5_mask.tif"))[0], 40)
    assert mask.shape == (40, 40, 1)
    assert set(np.unique(mask)) <= {0.0, 1.0}
    assert mask.sum() > 0


def test_mask_resize_by_area_gives_tumour_fractions_centred_on_each_cell():
    # A 2x2 lesion straddling the four 2x2 cells of a 4x4 mask: area resize puts a quarter of
    # it in each cell; nearest copies each cell's top-left pixel and sees only one corner.
    mask = np.zeros((4, 4), np.uint8)
    mask[1:3, 1:3] = 1
    np.testing.assert_array_equal(preprocess_mask(mask, 2, "area")[..., 0], np.full((2, 2), 0.25))
    np.testing.assert_array_equal(preprocess_mask(mask, 2, "nearest")[..., 0], [[0, 0], [0, 1]])
    with pytest.raises(ValueError, match="mask resize"):
        preprocess_mask(mask, 2, "cubic")


def test_area_masks_keep_the_boundary_through_the_round_trip():
    # The U-Net predicts at the small size and its map is resized back bilinearly and cut
    # at 0.5: soft area targets survive that trip far better than nearest-picked ones.
    yy, xx = np.mgrid[:256, :256]
    disc = ((yy - 120.3) ** 2 + (xx - 131.7) ** 2 < 17.5 ** 2).astype(np.uint8)

    def round_trip_iou(resize):
        small = preprocess_mask(disc, 128, resize)[..., 0]
        back = cv2.resize(small, (256, 256), interpolation=cv2.INTER_LINEAR) > 0.5
        return (back & (disc > 0)).sum() / (back | (disc > 0)).sum()

    assert preprocess_mask(disc, 128, "area").sum() * 4 == disc.sum()  # area is kept exactly
    assert round_trip_iou("area") > 0.98
    assert round_trip_iou("area") > round_trip_iou("nearest") + 0.02


def test_png_slices_load_like_tif(synthetic_root, tmp_path):
    path = _slice_file(synthetic_root, 5)
    png = tmp_path / "x_5.png"
    cv2.imwrite(str(png), cv2.imread(str(path), cv2.IMREAD_UNCHANGED))
    np.testing.assert_array_equal(load_slice(png, 64), load_slice(path, 64))


def test_a_single_channel_slice_is_flair_in_every_channel(tmp_path):
    from bt_pipeline.data.preprocess import read_image, replaced_sequences

    gray = tmp_path / "TCGA_CS_0000_20000101_1.tif"
    flair = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8)
    cv2.imwrite(str(gray), flair)
    image = read_image(gray)
    assert image.shape == (64, 64, 3)
    for channel in range(3):
        np.testing.assert_array_equal(image[..., channel], flair)
    assert replaced_sequences([image]) == ["pre", "post"]
    image[..., 0] += 1
    assert replaced_sequences([image]) == ["post"]


@pytest.mark.parametrize("case", ["missing", "empty", "garbage", "truncated", "tiny", "uint16"])
def test_bad_slices_raise_clear_error_naming_the_file(synthetic_root, tmp_path, case):
    good = _slice_file(synthetic_root)
    bad = tmp_path / f"TCGA_CS_0000_20000101_{case}.tif"
    if case == "empty":
        bad.write_bytes(b"")
    elif case == "garbage":
        bad.write_bytes(b"this is not an image" * 50)
    elif case == "truncated":
        data = good.read_bytes()
        bad.write_bytes(data[: len(data) // 3])
    elif case == "tiny":
        cv2.imwrite(str(bad), np.full((8, 8, 3), 80, np.uint8))
    elif case == "uint16":
        cv2.imwrite(str(bad), np.full((64, 64, 3), 800, np.uint16))
    with pytest.raises(SliceReadError) as info:
        load_slice(bad, 32)
    message = str(info.value)
    assert str(bad) in message and "\n" not in message


def test_volume_p99_puts_a_dark_and_a_bright_copy_of_one_volume_on_one_scale():
    from bt_pipeline.data.preprocess import VOLUME_P99_TARGET, standardise_volume

    rng = np.random.default_rng(0)
    volume = np.zeros((4, 32, 32, 3), np.float32)
    volume[:, 8:24, 8:24] = rng.uniform(0.2, 0.5, (4, 16, 16, 3))  # brain; background stays 0
    dark, bright = volume * 0.4, np.minimum(volume * 1.6, 1.0)
    a, b = standardise_volume(dark, "volume_p99"), standardise_volume(bright, "volume_p99")
    np.testing.assert_allclose(a, b, atol=1e-5)
    brain = a[a[..., 1] > 0]
    np.testing.assert_allclose(np.percentile(brain, 99, axis=0), VOLUME_P99_TARGET, rtol=1e-5)
    assert (a[:, :8] == 0).all()  # background is not lifted
    assert standardise_volume(dark, "raw") is dark
    empty = np.zeros((2, 8, 8, 3), np.float32)
    assert (standardise_volume(empty, "volume_p99") == 0).all()
    with pytest.raises(ValueError, match="intensity"):
        standardise_volume(dark, "zscore")


def test_the_loader_and_the_predictor_standardise_a_patient_alike(synthetic_root,
                                                                   synthetic_manifest):
    """Training and inference feed a volume_p99 model the same numbers."""
    from bt_pipeline.config import DataConfig, Preprocessing
    from bt_pipeline.data.loader import load_patients
    from bt_pipeline.data.manifest import read_manifest
    from bt_pipeline.data.preprocess import read_image
    from bt_pipeline.inference.predictor import TwoStagePredictor

    manifest = read_manifest(synthetic_manifest)
    patient = manifest["patient_id"].iloc[0]
    config = DataConfig(data_root=str(synthetic_root), image_size=32, cache_dir="",
                        intensity="volume_p99")
    arrays = load_patients(manifest, [patient], config)
    rows = arrays.rows.sort_values("slice")
    images = [read_image(synthetic_root / p) for p in rows["image"]]
    batch = TwoStagePredictor._model_inputs(images, Preprocessing(32, intensity="volume_p99"),
                                            [1, 2])
    np.testing.assert_allclose(batch, arrays.images[rows.index.to_numpy()][[1, 2]], atol=1e-6)
    raw = load_patients(manifest, [patient], DataConfig(data_root=str(synthetic_root),
                                                        image_size=32, cache_dir=""))
    assert not np.allclose(raw.images, arrays.images)


def test_volume_brightness_is_one_row_per_patient_on_the_brain_pixels(synthetic_root,
                                                                      synthetic_manifest):
    from bt_pipeline.data.manifest import read_manifest
    from bt_pipeline.data.preprocess import read_image
    from bt_pipeline.studies.eda import volume_brightness

    table = read_manifest(synthetic_manifest)
    brightness = volume_brightness(table, synthetic_root).set_index("patient_id")
    assert sorted(brightness.index) == sorted(table["patient_id"].unique())
    patient = brightness.index[0]
    pixels = np.concatenate([read_image(synthetic_root / p).reshape(-1, 3)
                             for p in table.loc[table["patient_id"] == patient, "image"]])
    flair = pixels[pixels[:, 1] > 10, 1]
    assert brightness.loc[patient, "flair_p99"] == pytest.approx(np.percentile(flair, 99))
