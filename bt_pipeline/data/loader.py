"""The one tf.data loader both stages share.

Slices are decoded in parallel (a thread pool over :func:`load_slice`; OpenCV releases the GIL)
and cached twice: in memory for the life of the dataset and on disk as ``.npy`` keyed by the
file list, their sizes and mtimes, and the image size, so that later runs (every tuning trial)
skip decoding. A bad file fails here, before TensorFlow sees it, with a
:class:`~bt_pipeline.data.preprocess.SliceReadError` naming the file.

Training pipelines shuffle with an explicit seed, augment on whole batches with per-batch
stateless seeds (image and mask go through the same geometric transform), and prefetch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf
from tqdm.auto import tqdm

from bt_pipeline.atomic import write_with
from bt_pipeline.config import DataConfig
from bt_pipeline.data.augment import augment_batch
from bt_pipeline.data.brain_mask import load_masks, morphed, resized_mask, strip
from bt_pipeline.data.preprocess import load_mask, load_slice, standardise_volume, with_context

_CACHE_VERSION = 1  # bump when preprocessing changes, to invalidate disk caches


@dataclass(frozen=True)
class SplitArrays:
    """Preprocessed slices of one split, in manifest order."""

    images: np.ndarray  # float32 (N, S, S, DataConfig.channels) in [0, 1]
    masks: np.ndarray  # float32 (N, S, S, 1) in {0, 1}
    labels: np.ndarray  # float32 (N,) 1 = tumour on the slice
    rows: pd.DataFrame  # the manifest rows, index reset
    # the same slices skull-stripped (DataConfig.skull_strip_p > 0), else None
    stripped: np.ndarray | None = None


def _cache_key(paths: list[Path], image_size: int) -> str:
    digest = hashlib.sha256(json.dumps([_CACHE_VERSION, image_size]).encode())
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _decode_all(loader, paths: list[Path], image_size: int, desc: str) -> np.ndarray:
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        arrays = list(tqdm(pool.map(lambda p: loader(p, image_size), paths), total=len(paths),
                           desc=desc, unit="slice", leave=False, disable=len(paths) < 200))
    return np.stack(arrays)


def _cached(loader, paths: list[Path], image_size: int, cache_dir: str | None, kind: str):
    if not cache_dir:
        return _decode_all(loader, paths, image_size, f"decoding {kind}")
    cache_file = Path(cache_dir) / f"{kind}-{image_size}-{_cache_key(paths, image_size)}.npy"
    if cache_file.is_file():
        return np.load(cache_file)
    array = _decode_all(loader, paths, image_size, f"decoding {kind}")
    write_with(cache_file, lambda tmp: np.save(tmp, array), suffix=".npy")
    return array


def load_split(manifest: pd.DataFrame, split: str, config: DataConfig) -> SplitArrays:
    """Decode (or read from cache) every slice and mask of ``split``."""
    rows = manifest[manifest["split"] == split]
    if rows.empty:
        raise ValueError(f"split {split!r} has no slices in the manifest")
    return load_rows(rows, config)


def load_patients(manifest: pd.DataFrame, patients: list[str], config: DataConfig) -> SplitArrays:
    """Decode (or read from cache) every slice and mask of ``patients`` (manifest order)."""
    rows = manifest[manifest["patient_id"].isin(set(patients))]
    missing = sorted(set(patients) - set(rows["patient_id"]))
    if missing:
        raise ValueError(f"patient(s) not in the manifest: {missing[:5]}")
    return load_rows(rows, config)


def load_rows(rows: pd.DataFrame, config: DataConfig) -> SplitArrays:
    """Decode (or read from cache) the slices and masks of these manifest rows."""
    rows = rows.reset_index(drop=True)
    root = Path(config.data_root)
    kind = f"images-tv{config.tv_weight:g}" if config.tv_weight > 0 else "images"
    images = _cached(functools.partial(load_slice, tv_weight=config.tv_weight),
                     [root / p for p in rows["image"]], config.image_size, config.cache_dir, kind)
    masks = _cached(functools.partial(load_mask, resize=config.mask_resize),
                    [root / p for p in rows["mask"]], config.image_size, config.cache_dir,
                    f"masks-{config.mask_resize}")
    labels = rows["has_tumor"].to_numpy(dtype=np.float32)
    stripped = _stripped(images, rows, config) if config.skull_strip_p > 0 else None
    if config.intensity != "raw":
        # in place: ``images`` is this call's own array (the disk cache holds the slices
        # before the volume rule, and is not touched)
        for _, group in rows.groupby("patient_id", sort=False):
            order = group.index.to_numpy()
            images[order] = standardise_volume(images[order], config.intensity)
    if config.context_slices > 0:
        images = _stack_context(images, rows, config.context_slices)
        if stripped is not None:
            stripped = _stack_context(stripped, rows, config.context_slices)
    return SplitArrays(images=images, masks=masks, labels=labels, rows=rows, stripped=stripped)


def _stripped(images: np.ndarray, rows: pd.DataFrame, config: DataConfig) -> np.ndarray:
    """Every slice of ``images`` (before the intensity rule) with its volume's skull removed
    by the patient's brain mask, the mask eroded or dilated by a per-volume draw of up to
    ``config.strip_morph_px`` pixels, then the volume's intensity rule applied to the stripped
    volume: what a skull-stripped scan of that patient gives inference."""
    masks = load_masks(config.brain_masks)
    rng = np.random.default_rng(config.seed)
    out = np.empty_like(images)
    for patient, group in rows.groupby("patient_id", sort=True):
        order = group.sort_values("slice").index.to_numpy()
        if patient not in masks:
            raise ValueError(f"{config.brain_masks}: no brain mask for patient {patient} "
                             "(make brain-masks)")
        mask = resized_mask(masks[patient], config.image_size)
        if len(mask) != len(order):
            raise ValueError(f"{config.brain_masks}: patient {patient}'s brain mask has "
                             f"{len(mask)} slices, the manifest {len(order)}")
        pixels = int(rng.integers(-config.strip_morph_px, config.strip_morph_px + 1))
        out[order] = standardise_volume(strip(images[order], morphed(mask, pixels)),
                                        config.intensity)
    return out


def _stack_context(images: np.ndarray, rows: pd.DataFrame, context_slices: int) -> np.ndarray:
    """Each patient's slices, in slice order, through :func:`with_context`."""
    out = np.empty((*images.shape[:3], images.shape[3] * (2 * context_slices + 1)), images.dtype)
    for _, group in rows.groupby("patient_id", sort=False):
        order = group.sort_values("slice").index.to_numpy()
        out[order] = with_context(images[order], context_slices)
    return out


def classifier_dataset(arrays: SplitArrays, config: DataConfig, training: bool) -> tf.data.Dataset:
    """``(image, label)`` batches; label shape (batch, 1), 1.0 = tumour."""
    labels = arrays.labels[:, None]
    dataset = tf.data.Dataset.from_tensor_slices((arrays.images, labels))
    if not training:
        return dataset.batch(config.batch_size).prefetch(tf.data.AUTOTUNE)
    dataset = dataset.shuffle(len(labels), seed=config.seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(config.batch_size)
    if config.augment:
        dataset = _augment_batches(dataset, config, with_mask=False)
    return dataset.prefetch(tf.data.AUTOTUNE)


def unet_dataset(arrays: SplitArrays, config: DataConfig, training: bool) -> tf.data.Dataset:
    """``(image, mask)`` batches: every tumour slice plus a share of tumour-free ones.

    In training the tumour-free slices are redrawn every epoch (seeded); otherwise the first
    ``negative_share`` of them (in a seeded order) are used, so evaluation is fixed.
    """
    positive = np.flatnonzero(arrays.labels > 0)
    negative = np.flatnonzero(arrays.labels == 0)
    n_negative = min(len(negative), int(round(config.negative_share * len(positive))))
    if not training:
        order = np.random.default_rng(config.seed).permutation(negative)[:n_negative]
        chosen = np.sort(np.concatenate([positive, order]))
        subset = (arrays.images[chosen], arrays.masks[chosen])
        return (tf.data.Dataset.from_tensor_slices(subset).batch(config.batch_size)
                .prefetch(tf.data.AUTOTUNE))
    negatives = (tf.data.Dataset.from_tensor_slices(negative)
                 .shuffle(max(1, len(negative)), seed=config.seed, reshuffle_each_iteration=True)
                 .take(n_negative))
    indices = tf.data.Dataset.from_tensor_slices(positive).concatenate(negatives)
    images, masks = tf.constant(arrays.images), tf.constant(arrays.masks)
    if arrays.stripped is not None and config.skull_strip_p > 0:
        indices, images = _strip_draws(indices, arrays, config)
    # Gather whole batches of indices at once: one gather per batch, not per slice.
    dataset = (indices.shuffle(len(positive) + n_negative, seed=config.seed + 1,
                               reshuffle_each_iteration=True)
               .batch(config.batch_size)
               .map(lambda i: (tf.gather(images, i),
                               tf.gather(masks, tf.math.floormod(i, len(arrays.masks)))),
                    num_parallel_calls=tf.data.AUTOTUNE))
    if config.augment:
        dataset = _augment_batches(dataset, config, with_mask=True)
    return dataset.prefetch(tf.data.AUTOTUNE)


def _strip_draws(indices: tf.data.Dataset, arrays: SplitArrays, config: DataConfig):
    """Indices into the slices followed by their stripped copies: each index drawn (seeded,
    anew every epoch) to its stripped copy with probability ``config.skull_strip_p``; the mask
    of a slice is the same either way."""
    n = len(arrays.images)
    draws = tf.data.Dataset.random(seed=config.seed + 2, rerandomize_each_iteration=True)
    threshold = int(round(config.skull_strip_p * 2**20))

    def pick(index, draw):
        use_stripped = tf.cast(tf.math.floormod(draw, 2**20) < threshold, tf.int64)
        return tf.cast(index, tf.int64) + use_stripped * n

    picked = tf.data.Dataset.zip((indices, draws)).map(pick)
    both = tf.constant(np.concatenate([arrays.images, arrays.stripped]))
    return picked, both


def _augment_batches(dataset: tf.data.Dataset, config: DataConfig, with_mask: bool):
    # New (seeded) augmentation draws every epoch, the same sequence run after run.
    seeds = tf.data.Dataset.random(seed=config.seed, rerandomize_each_iteration=True).batch(2)
    zipped = tf.data.Dataset.zip((dataset, seeds))

    def apply(batch, seed):
        seed = tf.cast(seed, tf.int32)
        image, target = batch
        mask = target if with_mask else None
        image, mask = augment_batch(image, mask, seed, config)
        return (image, mask) if with_mask else (image, target)

    return zipped.map(apply, num_parallel_calls=tf.data.AUTOTUNE)
