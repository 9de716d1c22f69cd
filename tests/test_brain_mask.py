"""Brain masks, the skull-strip augmentation, the stripped-input note and the component-share
rule: what makes skull-stripped (BraTS-style) input work and be said."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from bt_pipeline.config import DataConfig, Preprocessing
from bt_pipeline.data.brain_mask import (
    BRAIN_MASKS,
    MARGIN_PX,
    brain_mask,
    load_masks,
    looks_skull_stripped,
    morphed,
    save_masks,
    strip,
)
from bt_pipeline.data.loader import load_rows
from bt_pipeline.data.manifest import read_manifest
from bt_pipeline.data.preprocess import read_mask
from bt_pipeline.inference.domain import domain_notes
from bt_pipeline.inference.postprocess import keep_largest_component_3d

REPO = Path(__file__).resolve().parents[1]
SHARED_LGG = REPO.parent / "shared" / "lgg" / "kaggle_3m"


def _head(n: int = 12, size: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic head: a brain ellipse (grey), a dark skull ring, a bright scalp ring, air
    with faint noise; returns (volume (n, size, size, 3) uint8, the brain (n, size, size))."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    radius = np.hypot((yy - size / 2) / 0.95, xx - size / 2)
    brain2d = radius < size * 0.30
    skull = (radius >= size * 0.30) & (radius < size * 0.35)
    scalp = (radius >= size * 0.35) & (radius < size * 0.42)
    volume = np.zeros((n, size, size, 3), np.float32)
    for channel, (tissue, fat) in enumerate(((90, 200), (110, 150), (95, 190))):
        volume[..., channel] = brain2d * tissue + skull * 8 + scalp * fat
    volume += rng.normal(0, 4, volume.shape)
    volume[..., 1] += np.where(brain2d & (np.hypot(yy - size * 0.45, xx - size * 0.4)
                                          < size * 0.08), 80, 0)
    volume = np.clip(volume, 1, 255)  # air: faint noise, never exactly 0
    return volume.astype(np.uint8), np.broadcast_to(brain2d, (n, size, size)).copy()


def test_brain_mask_keeps_the_brain_and_drops_the_scalp():
    volume, brain = _head()
    mask = brain_mask(volume)
    inside = (mask & brain).sum() / brain.sum()
    beyond_margin = mask & ~morphed(brain, MARGIN_PX + 1)  # the scalp ring starts 6 px out
    assert inside > 0.99
    assert not beyond_margin.any()


def test_brain_mask_of_a_blank_volume_is_empty():
    assert not brain_mask(np.zeros((4, 64, 64, 3), np.uint8)).any()


def test_masks_round_trip_through_the_npz(tmp_path):
    rng = np.random.default_rng(1)
    masks = {"A": rng.random((3, 16, 16)) > 0.5, "B": rng.random((5, 8, 8)) > 0.3}
    save_masks(masks, tmp_path / "m.npz")
    loaded = load_masks(tmp_path / "m.npz")
    assert sorted(loaded) == ["A", "B"]
    for key in masks:
        np.testing.assert_array_equal(loaded[key], masks[key])


def test_morphed_erodes_and_dilates_in_plane_only():
    mask = np.zeros((3, 9, 9), bool)
    mask[1, 3:6, 3:6] = True
    assert morphed(mask, 1)[1].sum() == 9 + 12  # a 3x3 square grows by its 4-neighbours
    assert not morphed(mask, 1)[0].any()  # nothing spills onto the next slice
    assert morphed(mask, -1)[1].sum() == 1
    np.testing.assert_array_equal(morphed(mask, 0), mask)


def _stripped_setup(tmp_path, synthetic_root: Path, synthetic_manifest: Path, intensity: str):
    """Brain masks for the synthetic patients (their head ellipse shrunk) and a loader config
    that strips at the slices' own size (no resizing: the mask applies pixel for pixel)."""
    from bt_pipeline.data.preprocess import read_image

    manifest = read_manifest(synthetic_manifest)
    masks = {}
    for patient, rows in manifest.groupby("patient_id"):
        rows = rows.sort_values("slice")
        images = np.stack([read_image(synthetic_root / p) for p in rows["image"]])
        masks[patient] = (images[..., 1] > 40) & (np.indices(images.shape[:3])[2] < 40)
    save_masks(masks, tmp_path / "brain.npz")
    config = DataConfig(data_root=str(synthetic_root), manifest=str(synthetic_manifest),
                        image_size=64, cache_dir="", intensity=intensity, skull_strip_p=0.5,
                        strip_morph_px=0, brain_masks=str(tmp_path / "brain.npz"))
    return manifest, masks, config


def test_augmentation_zeroes_exactly_outside_the_mask(tmp_path, synthetic_root,
                                                      synthetic_manifest):
    manifest, masks, config = _stripped_setup(tmp_path, synthetic_root, synthetic_manifest, "raw")
    arrays = load_rows(manifest, config)
    assert arrays.stripped is not None
    for patient, rows in arrays.rows.groupby("patient_id"):
        order = rows.sort_values("slice").index.to_numpy()
        outside = ~masks[patient]
        assert (arrays.stripped[order][outside] == 0).all()
        np.testing.assert_array_equal(arrays.stripped[order][~outside],
                                      arrays.images[order][~outside])


def test_intensity_rule_is_the_same_at_training_and_inference_for_a_stripped_volume(
        tmp_path, synthetic_root, synthetic_manifest):
    from bt_pipeline.data.preprocess import read_image
    from bt_pipeline.inference.predictor import TwoStagePredictor

    manifest, masks, config = _stripped_setup(tmp_path, synthetic_root, synthetic_manifest,
                                              "volume_p99")
    arrays = load_rows(manifest, config)
    patient, rows = next(iter(arrays.rows.groupby("patient_id")))
    rows = rows.sort_values("slice")
    # what a user gives inference: the same patient's scan, skull-stripped by the same mask
    scan = strip(np.stack([read_image(synthetic_root / p) for p in rows["image"]]),
                 masks[patient])
    inference = TwoStagePredictor._model_inputs(list(scan), Preprocessing(64, 0, 0.0,
                                                                          "volume_p99"))
    np.testing.assert_allclose(arrays.stripped[rows.index.to_numpy()], inference, atol=1e-6)


def test_training_batches_mix_stripped_and_whole_slices(tmp_path, synthetic_root,
                                                        synthetic_manifest):
    from bt_pipeline.data.loader import unet_dataset

    manifest, _, config = _stripped_setup(tmp_path, synthetic_root, synthetic_manifest, "raw")
    config = dataclasses.replace(config, augment=False, batch_size=64)
    arrays = load_rows(manifest, config)
    images, masks = next(iter(unet_dataset(arrays, config, training=True)))
    zero_share = (images.numpy()[..., 1] == 0).mean(axis=(1, 2))
    whole = (arrays.images[..., 1] == 0).mean(axis=(1, 2)).max()
    assert (zero_share > whole).any() and (zero_share <= whole).any()
    assert masks.shape[0] == images.shape[0]


class _Predictor(SimpleNamespace):
    skull_strip_training = False


def test_infer_notes_a_stripped_input_and_not_a_head():
    volume, brain = _head(n=20)
    assert looks_skull_stripped(strip(volume, brain))
    assert not looks_skull_stripped(volume)
    assert domain_notes(list(volume), _Predictor()) == []
    notes = domain_notes(list(strip(volume, brain)), _Predictor())
    assert len(notes) == 1 and "skull-stripped" in notes[0] and "only on heads" in notes[0]
    trained = domain_notes(list(strip(volume, brain)), _Predictor(skull_strip_training=True))
    assert "trained on skull-stripped volumes too" in trained[0]


def test_component_share_keeps_a_fragmented_tumour_the_largest_rule_dropped():
    truth = np.zeros((6, 32, 32), np.uint8)
    truth[1:5, 8:20, 8:20] = 1
    predicted = truth.copy()
    predicted[:, 13:15, :] = 0  # the U-Net's outline falls apart in two fragments
    predicted[2, 25:30, 25:30] = 1  # and a small false positive
    largest = keep_largest_component_3d(predicted)
    shared = keep_largest_component_3d(predicted, share=0.5)

    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    assert dice(truth, largest) < 0.8  # one fragment lost
    assert dice(truth, shared) > 0.9
    assert not shared[2, 25:30, 25:30].any()  # the false positive is still dropped
    np.testing.assert_array_equal(keep_largest_component_3d(predicted, share=1.0), largest)


@pytest.mark.skipif(not SHARED_LGG.is_dir() or not (REPO / BRAIN_MASKS).is_file(),
                    reason="needs the real dataset's masks (../shared/lgg) and the brain masks")
def test_committed_brain_masks_keep_every_patients_tumour():
    masks = load_masks(REPO / BRAIN_MASKS)
    coverage = {}
    for folder in sorted(p for p in SHARED_LGG.iterdir() if p.is_dir()):
        files = sorted(folder.glob("*_mask.png"),
                       key=lambda p: int(p.stem.rsplit("_", 2)[-2]))
        truth = np.stack([read_mask(p).astype(bool) for p in files])
        mask = masks[folder.name]
        assert mask.shape == truth.shape, folder.name
        coverage[folder.name] = (truth & mask).sum() / max(1, truth.sum())
    assert len(coverage) == 100
    low = {k: round(float(v), 4) for k, v in coverage.items() if v < 0.995}
    assert not low, low
    committed = pd.read_csv(REPO / "reports" / "brain_masks" / "coverage.csv")
    assert committed["coverage"].min() >= 0.995
