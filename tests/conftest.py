"""Shared fixtures: seeded synthetic patients, and the real dataset when it can be had."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED_LGG = REPO.parent / "shared" / "lgg"


@pytest.fixture(autouse=True)
def _seed_everything():
    import keras

    keras.utils.set_random_seed(0)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Eight synthetic patients (two per institution), 9 slices of 64x64 each."""
    from bt_pipeline.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n_patients=8,
                                  n_slices=9, size=64, seed=0)


def _checksums(root: Path) -> dict[str, str]:
    import hashlib

    return {os.fsdecode(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session", autouse=True)
def _inputs_stay_byte_identical(synthetic_root):
    """Every test reads the shared synthetic patients; none may change a byte of them."""
    before = _checksums(synthetic_root)
    yield
    assert _checksums(synthetic_root) == before, "a test run modified its input files"


@pytest.fixture(scope="session")
def synthetic_manifest(synthetic_root, tmp_path_factory) -> Path:
    from bt_pipeline.data.manifest import build_manifest, write_manifest

    path = tmp_path_factory.mktemp("manifest") / "manifest.csv"
    write_manifest(build_manifest(synthetic_root, 0.25, 0.25, seed=0), path)
    return path


@pytest.fixture(scope="session")
def real_root(tmp_path_factory) -> Path:
    """The real LGG data: ``data/kaggle_3m`` (or $BT_DATA_DIR), else unpacked from
    ../shared/lgg; skipped when neither is there."""
    candidates = [Path(os.environ["BT_DATA_DIR"])] if "BT_DATA_DIR" in os.environ else []
    candidates.append(REPO / "data" / "kaggle_3m")
    for candidate in candidates:
        if candidate.is_dir() and any(candidate.iterdir()):
            return candidate
    if not (SHARED_LGG / "unpack.py").is_file():
        pytest.skip("real LGG data not present (run `make data`)")
    dest = tmp_path_factory.mktemp("lgg")
    subprocess.run([sys.executable, str(SHARED_LGG / "unpack.py"), str(dest)], check=True,
                   stdout=subprocess.DEVNULL)
    return dest / "kaggle_3m"


@pytest.fixture(scope="session")
def tiny_models(synthetic_root, synthetic_manifest, tmp_path_factory):
    """A tiny classifier and U-Net trained for a few epochs on the synthetic patients,
    shipped (``.keras`` + config JSON) like the real ones. Returns their two paths."""
    import keras

    from bt_pipeline.config import ClassifierConfig, DataConfig, UNetConfig
    from bt_pipeline.data.loader import classifier_dataset, load_split, unet_dataset
    from bt_pipeline.data.manifest import read_manifest
    from bt_pipeline.models.classifier import build_classifier, compile_classifier
    from bt_pipeline.models.unet import build_unet, compile_unet
    from bt_pipeline.training.callbacks import ship_model

    keras.utils.set_random_seed(0)
    out = tmp_path_factory.mktemp("models")
    data = DataConfig(data_root=str(synthetic_root), manifest=str(synthetic_manifest),
                      image_size=32, batch_size=8, augment=False, negative_share=1.0,
                      cache_dir="")
    arrays = load_split(read_manifest(synthetic_manifest), "train", data)
    clf_config = ClassifierConfig(image_size=32, filters=(8, 16), block_dropouts=(0.0, 0.0),
                                  dense_dropout=0.0, dense_units=16, threshold=0.5)
    classifier = compile_classifier(build_classifier(32, (8, 16), (0.0, 0.0), 0.0, 16), 3e-3)
    classifier.fit(classifier_dataset(arrays, data, training=True), epochs=15, verbose=0)
    unet_config = UNetConfig(image_size=32, depth=2, base_filters=8)
    unet = compile_unet(build_unet(32, 2, 8), 3e-3)
    unet.fit(unet_dataset(arrays, data, training=True), epochs=25, verbose=0)
    ship_model(classifier, out / "classifier.keras", clf_config, {"note": "test model"})
    ship_model(unet, out / "unet.keras", unet_config, {"note": "test model"})
    return out / "classifier.keras", out / "unet.keras"


@pytest.fixture
def run_infer(tiny_models):
    """``bt infer ARGS --quiet`` with the tiny models; returns its exit status."""
    from bt_pipeline.infer import main

    classifier, unet = tiny_models
    return lambda *args: main([*map(str, args), "--classifier", str(classifier),
                               "--unet", str(unet), "--quiet"])
