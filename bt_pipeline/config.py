"""Explicit, frozen configuration with a JSON round trip.

Every trained model is saved with the config that produced it (``<model>.json`` beside
``<model>.keras``), so a model file never has to be guessed about.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, TypeVar

from bt_pipeline.atomic import write_text_atomic

T = TypeVar("T")

#: The models that ship inside the package, each with ``<name>.json`` (its config) beside it.
WEIGHTS_DIR = Path(__file__).parent / "weights"
SHIPPED_CLASSIFIER = WEIGHTS_DIR / "classifier.keras"
SHIPPED_UNET = WEIGHTS_DIR / "unet.keras"
#: A copy of the from-scratch slice CNN, kept as the baseline recipe's stage 1: it gates what no
#: gate fits (cross-validation folds without their own gate, the experiments' small U-Nets; a
#: gate runs only on the U-Net it was built on) and stays fixed when `make tune` ships another.
BASELINE_CLASSIFIER = Path("reports/cv/baseline/models/classifier.keras")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How a slice becomes a model's input: the part of a model's config that training writes
    and inference reads, so a saved model is always fed as it was trained."""

    image_size: int
    context_slices: int = 0  # 2.5D: neighbouring slices per side stacked as channels
    tv_weight: float = 0.0  # Total Variation denoising weight; 0 = off
    intensity: str = "raw"  # per-volume intensity rule; see data.preprocess.INTENSITY_RULES

    @property
    def channels(self) -> int:
        """Input channels: RGB per stacked slice."""
        return 3 * (2 * self.context_slices + 1)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the slices are, how they are split and how they reach a model."""

    data_root: str = "data/kaggle_3m"
    manifest: str = "data_manifest.csv"
    # Slices are resized to image_size x image_size; each entry point sets it to the size of
    # the model it feeds (classifier and U-Net configs).
    image_size: int = 128
    seed: int = 1337
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    batch_size: int = 32
    # U-Net batches: every tumour slice plus this many tumour-free slices per tumour slice.
    negative_share: float = 0.25
    augment: bool = True
    max_rotation_deg: float = 10.0
    max_scale: float = 0.08
    intensity_jitter: float = 0.1
    # Further augmentations, 0 = off (nnU-Net's 2D list; see data/augment.py): gamma drawn from
    # [1 - gamma_range, 1 + gamma_range]; Gaussian noise of standard deviation up to noise_std;
    # Gaussian blur of sigma up to blur_sigma px; simulated low resolution (down by a factor
    # down to low_res_scale, then back up); each applied to an image with probability
    # extra_augment_p. missing_sequence_p: probability that the pre-contrast or post-contrast
    # channel, or both, is replaced by FLAIR, as the dataset does where a sequence is missing.
    gamma_range: float = 0.0
    noise_std: float = 0.0
    blur_sigma: float = 0.0
    low_res_scale: float = 0.0
    extra_augment_p: float = 0.15
    missing_sequence_p: float = 0.0
    # Total Variation denoising weight of the input slices (0 = off); see preprocess_image.
    tv_weight: float = 0.0
    # How each volume's intensities are put on one scale after the slices are preprocessed
    # ("raw": as the files hold them; see data.preprocess.standardise_volume).
    intensity: str = "raw"
    # 2.5D input: this many neighbouring slices on each side (same patient, edge slices
    # repeated) are stacked with the slice as extra channels; 0 = the slice alone.
    context_slices: int = 0
    # How ground-truth masks reach image_size: "nearest" picks one source pixel per cell
    # (binary targets); "area" gives each cell the fraction of it that is tumour (soft targets
    # centred like the area-resized image, so boundaries survive the trip down and back up).
    mask_resize: str = "area"
    cache_dir: str = ".cache/bt_pipeline"
    # Skull-strip augmentation (data.brain_mask): each training slice is drawn from its
    # volume with everything outside the brain mask set to 0, as skull-stripped (BraTS-style)
    # data are, with this probability; each volume's mask eroded or dilated in-plane by up to
    # strip_morph_px pixels of image_size (drawn once per volume), and the intensity rule
    # computed on the stripped volume, as inference computes it. brain_masks: the committed
    # masks (make brain-masks).
    skull_strip_p: float = 0.0
    strip_morph_px: int = 3
    brain_masks: str = "reports/brain_masks/brain_masks.npz"

    @property
    def channels(self) -> int:
        """Input channels of a model fed by this config: RGB per stacked slice."""
        return self.preprocessing.channels

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(self.image_size, self.context_slices, self.tv_weight, self.intensity)


def check_preprocessing(data: DataConfig, model_config: Any) -> None:
    """Raise ValueError unless the data feed a model the way its config says it is fed."""
    if data.preprocessing != model_config.preprocessing:
        raise ValueError(f"data preprocessing {data.preprocessing} differs from the "
                         f"{type(model_config).__name__}'s {model_config.preprocessing}")


@dataclasses.dataclass(frozen=True)
class _ModelInput:
    """The input fields every model config carries; with the subclass's ``image_size`` they
    make its preprocessing."""

    context_slices: int = 0
    tv_weight: float = 0.0
    intensity: str = "raw"
    seed: int = 1337

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(self.image_size, self.context_slices, self.tv_weight, self.intensity)


@dataclasses.dataclass(frozen=True)
class _SliceDecision(_ModelInput):
    """What every stage-1 config carries besides: its decision threshold and the rule that
    sets it."""

    threshold: float = 0.5  # decision threshold on the tumour probability, chosen on val
    min_val_sensitivity: float = 0.97  # the threshold rule's sensitivity floor (train_classifier)


@dataclasses.dataclass(frozen=True)
class ClassifierConfig(_SliceDecision):
    """Slice classifier: stacked Conv2D/MaxPool/Dropout blocks, a dense layer, a sigmoid."""

    image_size: int = 96
    filters: tuple[int, ...] = (16, 32, 64, 128, 128)
    block_dropouts: tuple[float, ...] = (0.15, 0.15, 0.15, 0.15, 0.15)
    dense_dropout: float = 0.15
    dense_units: int = 128
    conv_activation: str = "relu"
    dense_activation: str = "relu"
    batch_norm: bool = True
    convs_per_block: int = 1
    learning_rate: float = 1e-3
    epochs: int = 40
    patience: int = 10


@dataclasses.dataclass(frozen=True)
class UNetConfig(_ModelInput):
    """U-Net segmenter."""

    image_size: int = 160  # DataConfig.image_size must match
    depth: int = 4
    base_filters: int = 16
    batch_norm: bool = True
    # "dice", "bce_dice" (batch-pooled Dice), "bce_dice_per_image" (each slice's Dice averaged)
    # or "lovasz_per_image"; see models/losses.py.
    loss: str = "bce_dice_per_image"
    # A .keras U-Net of the same design whose weights training starts from (fine-tuning,
    # e.g. with loss "lovasz_per_image"); "" = random initialisation from ``seed``.
    init_from: str = ""
    learning_rate: float = 1e-3
    # "plateau": the learning rate is halved when val Dice stalls, early stopping on val, the
    # best epoch ships. "cosine": a fixed schedule, the rate decays along a cosine to 0 over
    # ``epochs``, no validation set is needed, the last epoch ships.
    schedule: str = "plateau"
    # Exponential moving average of the weights (Polyak averaging; Keras' optimizer ``use_ema``)
    # with this momentum, e.g. 0.99; 0 = off. Validation, the best checkpoint and the shipped
    # model then use the averaged weights, while each training step updates the raw ones.
    weight_ema: float = 0.0
    epochs: int = 40
    patience: int = 8
    mask_threshold: float = 0.5
    # Post-processing (inference/postprocess.py, which chooses and writes both): connected
    # components (per slice) smaller than this are dropped, 0 = off; keep only the largest 3D
    # (26-connected) component of a patient's masks, sized in "voxels", or by "gate": each voxel
    # weighted by its slice's stage-1 probability, so that a large component on slices the gate
    # barely let through does not beat the tumour on slices it is sure of.
    min_component_pixels: int = 0
    keep_largest_3d: bool = False
    largest_3d_by: str = "voxels"
    # With keep_largest_3d: every 3D component at least this share of the largest's size is
    # kept too (1 = the largest alone), so that a tumour the U-Net outlines in fragments is not
    # cut down to its largest piece.
    component_share: float = 1.0
    # Inference options: average with the left-right mirrored slice; more U-Nets (files beside
    # this model, same input size) whose probabilities are averaged with this one's.
    tta_flips: bool = False
    ensemble: tuple[str, ...] = ()
    distribution: str = "default"  # "default", "mirrored" or "multi_worker"
    # Training compute: "float32" or "mixed_bfloat16" (bfloat16 activations and matmuls, float32
    # weights, output and loss). The shipped model is float32 either way (training.ship_model).
    precision: str = "float32"


@dataclasses.dataclass(frozen=True)
class GateConfig(_SliceDecision):
    """Stage 1 on the U-Net's trained encoder (models/gate.py): which U-Net, how much of its
    trunk fine-tunes, the head, and the decision threshold. Its input is the U-Net's."""

    unet_fingerprint: str = ""  # models.gate.fingerprint of the U-Net the gate was built on
    fine_tune_blocks: int = 0  # top trunk blocks that train; 0 = the whole trunk frozen
    dense_units: int = 128
    dense_activation: str = "relu"
    feature_dropout: float = 0.2
    dense_dropout: float = 0.2
    learning_rate: float = 1e-3
    epochs: int = 20
    patience: int = 6
    batch_size: int = 64
    image_size: int = 160  # the U-Net's


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-JSON dict of a config dataclass, tagged with its type."""
    return {"type": type(config).__name__, **dataclasses.asdict(config)}


def from_dict(data: dict[str, Any], cls: type[T] | None = None) -> T:
    """Rebuild a config from :func:`to_dict` output. Raises ValueError for anything else: not
    an object, another config type, an unknown field, or a value of the wrong type."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    data = dict(data)
    tag = data.pop("type", None)
    if cls is None:
        if tag not in _CONFIG_TYPES:
            raise ValueError(f"unknown config type {tag!r}")
        cls = _CONFIG_TYPES[tag]
    elif tag is not None and tag != cls.__name__:
        raise ValueError(f"this is a {tag}, not a {cls.__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}")
    for name, value in data.items():
        data[name] = _checked(cls.__name__, name, fields[name].type, value)
    config = cls(**data)
    _check_ranges(config)
    return config


#: Allowed ranges (inclusive) of numeric config fields, wherever a config has them: a value
#: outside turns every patient into "no tumour" or crashes deep inside a model build.
_RANGES = {
    "threshold": (0.0, 1.0), "mask_threshold": (0.0, 1.0), "min_val_sensitivity": (0.0, 1.0),
    "min_component_pixels": (0, 256 * 256), "component_share": (0.0, 1.0),
    "image_size": (16, 1024), "context_slices": (0, 8), "depth": (1, 8),
    "base_filters": (1, 1024), "fine_tune_blocks": (0, 4), "tv_weight": (0.0, 10.0),
    "learning_rate": (0.0, 1.0), "epochs": (0, 100_000), "batch_size": (1, 100_000),
    "skull_strip_p": (0.0, 1.0), "missing_sequence_p": (0.0, 1.0),
}
#: The per-volume intensity rules (data.preprocess.standardise_volume).
INTENSITY_RULES = ("raw", "volume_p99")
#: How the volume rule sizes a 3D component: its voxels, or its voxels each weighted by the
#: stage-1 probability of its slice (inference.postprocess).
LARGEST_3D_BY = ("voxels", "gate")
#: Fields that name one of a fixed set of rules.
_CHOICES = {"intensity": INTENSITY_RULES, "largest_3d_by": LARGEST_3D_BY}


def _check_ranges(config: Any) -> None:
    """ValueError naming the first field whose value is not finite, outside its range or not
    one of its choices."""
    owner = type(config).__name__
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{owner}.{field.name}: {value!r} is not a finite number")
        if field.name in _RANGES and isinstance(value, int | float) and \
                not isinstance(value, bool):
            low, high = _RANGES[field.name]
            if not low <= value <= high:
                raise ValueError(f"{owner}.{field.name}: {value!r} is outside {low}..{high}")
        if field.name in _CHOICES and value not in _CHOICES[field.name]:
            raise ValueError(f"{owner}.{field.name}: {value!r} is none of "
                             f"{list(_CHOICES[field.name])}")


#: The JSON types each annotated field type accepts (bool is not taken for a number).
_JSON_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _checked(owner: str, name: str, annotation: str, value: Any) -> Any:
    """``value`` as the field's type (lists become tuples), or ValueError naming the field."""
    if annotation.startswith("tuple["):
        inner = annotation[len("tuple["):-len(", ...]")]
        if not isinstance(value, list | tuple):
            raise ValueError(f"{owner}.{name}: expected a list, got {value!r}")
        return tuple(_checked(owner, name, inner, item) for item in value)
    wanted = _JSON_TYPES.get(annotation, (object,))
    if isinstance(value, bool) and bool not in wanted or not isinstance(value, wanted):
        raise ValueError(f"{owner}.{name}: expected {annotation}, got {value!r}")
    return float(value) if annotation == "float" else value


def save_json(config: Any, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Write ``config`` (plus optional ``extra`` facts) as JSON, atomically."""
    payload = to_dict(config)
    if extra:
        payload["extra"] = extra
    write_text_atomic(Path(path), json.dumps(payload, indent=2, sort_keys=True) + "\n")


def load_json(path: str | os.PathLike, cls: type[T] | None = None) -> T:
    """Read a config written by :func:`save_json` (its ``extra`` block is ignored). A JSON
    object without the ``type`` tag save_json writes (``{}``, a hand-made file) is refused,
    so no model runs on silent defaults."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except RecursionError as exc:  # nested deeper than the parser's stack
        raise ValueError("nested too deeply to be a config") from exc
    if isinstance(data, dict):
        data.pop("extra", None)
        if "type" not in data:
            raise ValueError("no 'type' field: not a config written by bt_pipeline")
    return from_dict(data, cls)


_CONFIG_TYPES = {c.__name__: c for c in (DataConfig, ClassifierConfig, UNetConfig,
                                                GateConfig)}
