"""Throughput measurements that anyone can re-run (``make bench-loader``)."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time

from bt_pipeline.config import DataConfig
from bt_pipeline.data.loader import classifier_dataset, load_split, unet_dataset
from bt_pipeline.data.manifest import read_manifest


def _drain(dataset) -> tuple[int, float]:
    started, count = time.perf_counter(), 0
    for images, _ in dataset:
        count += int(images.shape[0])
    return count, time.perf_counter() - started


def loader_throughput(manifest_path: str | os.PathLike, data_root: str | os.PathLike,
                      epochs: int = 3) -> dict[str, float]:
    """Slices/s of the training loader on the train split.

    ``first_epoch``: from TIFF files on disk with an empty cache (decode + batching +
    augmentation); ``cached``: later epochs from the in-memory cache, augmentation on;
    ``disk_cache_load``: a new process's first epoch when the ``.npy`` cache exists.
    """
    manifest = read_manifest(manifest_path)
    with tempfile.TemporaryDirectory() as cache_dir:
        config = DataConfig(data_root=str(data_root), cache_dir=cache_dir)
        started = time.perf_counter()
        arrays = load_split(manifest, "train", config)
        decode_seconds = time.perf_counter() - started
        count, seconds = _drain(classifier_dataset(arrays, config, training=True))
        first = count / (decode_seconds + seconds)
        started = time.perf_counter()
        load_split(manifest, "train", config)
        disk_seconds = time.perf_counter() - started
    results = {"slices": float(count), "first_epoch_slices_per_s": first,
               "disk_cache_load_slices_per_s": count / disk_seconds}
    for name, make in (("classifier", classifier_dataset), ("unet", unet_dataset)):
        dataset = make(arrays, config, training=True)
        _drain(dataset)  # warm up the pipeline once
        totals = [_drain(dataset) for _ in range(epochs)]
        results[f"{name}_cached_slices_per_s"] = (sum(c for c, _ in totals)
                                                  / sum(s for _, s in totals))
        plain = dataclasses.replace(config, augment=False)
        totals = [_drain(make(arrays, plain, training=True)) for _ in range(epochs)]
        results[f"{name}_cached_no_augment_slices_per_s"] = (sum(c for c, _ in totals)
                                                             / sum(s for _, s in totals))
    return results


def infer_throughput(scan_dirs: list[str], out_dir: str | os.PathLike,
                     extra_args: tuple[str, ...] = ()) -> dict[str, float]:
    """End-to-end ``python -m bt_pipeline.infer`` in a fresh process: slices/s over the whole
    run (start-up, reading, both stages, writing) and seconds from process start to the first
    patient's outputs on disk."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    timing_file = Path(out_dir) / "timing.json"
    started = time.time()
    subprocess.run([sys.executable, "-m", "bt_pipeline.infer", *scan_dirs, "--out", str(out_dir),
                    "--quiet", "--timing", str(timing_file), *extra_args], check=False,
                   stdout=subprocess.DEVNULL)
    timing = json.loads(timing_file.read_text())
    total = timing["end_unix"] - started
    return {"infer_patients": float(timing["patients"]), "infer_slices": float(timing["slices"]),
            "infer_seconds": total, "infer_slices_per_s": timing["slices"] / total,
            "infer_first_patient_s": timing["first_patient_unix"] - started}
