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
