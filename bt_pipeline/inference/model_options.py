"""Which models a command runs, and how: the shared options (``--classifier``, ``--unet``,
``--extra-unet``, ``--tta-flips``, ``--precision``) and the predictor they describe. Parsing
them imports no TensorFlow."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from bt_pipeline.config import SHIPPED_CLASSIFIER, SHIPPED_UNET, UNetConfig
from bt_pipeline.runtime import cpu_has_bfloat16


def add_model_arguments(parser: argparse.ArgumentParser, precision: str = "float32") -> None:
    """Which models run, and how: --classifier, --unet, --extra-unet, --tta-flips, and
    --precision (default ``precision``)."""
    parser.add_argument("--gate", "--classifier", dest="classifier", type=Path,
                        default=SHIPPED_CLASSIFIER, metavar="KERAS",
                        help="stage 1 (the gate): a head on --unet's encoder, or a from-scratch "
                             "slice CNN; its JSON beside it (default: the shipped gate; "
                             "--classifier is the same option)")
    parser.add_argument("--unet", type=Path, default=SHIPPED_UNET, metavar="KERAS",
                        help="stage 2, its JSON beside it (default: the shipped U-Net)")
    parser.add_argument("--extra-unet", type=Path, nargs="*", default=None, metavar="KERAS",
                        help="more U-Nets of the same input size, masks from their mean "
                             "(default: the U-Net config's ensemble; none: --extra-unet alone)")
    parser.add_argument("--tta-flips", action=argparse.BooleanOptionalAction, default=None,
                        help="also segment each slice mirrored left-right and average "
                             "(default: as the U-Net config says)")
    parser.add_argument("--precision", choices=["float32", "bfloat16", "auto"],
                        default=precision,
                        help="compute precision of the U-Net (and of the gate's encoder, which "
                             "it shares); auto = bfloat16 where the CPU has it natively, else "
                             f"float32 (default: {precision}; docs/speed.md)")


@dataclass(frozen=True)
class ModelFacts:
    """What ``run.json`` records of the models, read from their files without TensorFlow: the
    driver of a run on Ray, whose actors load the models themselves."""

    classifier_config: object
    unet_config: UNetConfig
    files: tuple[Path, ...]
    bfloat16: bool
    mask_threshold: float
    tta_flips: bool
    quality: object
    extra_unets: tuple[Path, ...]


def model_files(classifier: Path, unet: Path, extra: list[Path]) -> tuple[Path, ...]:
    """Every file a predictor is built from: the models, their JSONs, the quality estimate."""
    from bt_pipeline.inference.quality import QUALITY_FILE

    return tuple(p for path in (classifier, unet, *extra)
                 for p in (path, path.with_suffix(".json"))) + tuple(
        p for p in [unet.with_name(QUALITY_FILE)] if p.is_file())


def _extra_unets(args: argparse.Namespace, unet_config: UNetConfig) -> list[Path]:
    """--extra-unet's files, or the U-Net config's ensemble beside it."""
    if args.extra_unet is not None:
        return [Path(p) for p in args.extra_unet]
    return [Path(args.unet).parent / name for name in unet_config.ensemble]


def model_facts(args: argparse.Namespace, mask_threshold: float = 0.5) -> ModelFacts:
    """:func:`load_predictor`'s models as facts, their configs checked, no model loaded.

    Raises:
        ValueError: a config missing or not valid (one line naming the file).
    """
    from bt_pipeline.config import load_json
    from bt_pipeline.inference.quality import quality_beside

    for path in (args.classifier, args.unet):
        if not Path(path).is_file() or not Path(path).with_suffix(".json").is_file():
            raise ValueError(f"{path}: model or its JSON config missing")
    classifier_config = load_json(Path(args.classifier).with_suffix(".json"), None)
    unet_config = load_json(Path(args.unet).with_suffix(".json"), UNetConfig)
    extra = _extra_unets(args, unet_config)
    bfloat16 = cpu_has_bfloat16() if args.precision == "auto" else args.precision == "bfloat16"
    return ModelFacts(classifier_config, unet_config,
                      model_files(Path(args.classifier), Path(args.unet), extra), bfloat16,
                      mask_threshold,
                      unet_config.tta_flips if args.tta_flips is None else args.tta_flips,
                      quality_beside(args.unet), tuple(extra))


def load_predictor(args: argparse.Namespace, mask_threshold: float = 0.5):
    """The TwoStagePredictor that :func:`add_model_arguments`' options describe (auto
    precision looks at the CPU's flags)."""
    from bt_pipeline.runtime import quiet_tensorflow

    quiet_tensorflow()
    from bt_pipeline.inference.predictor import TwoStagePredictor

    bfloat16 = cpu_has_bfloat16() if args.precision == "auto" else args.precision == "bfloat16"
    predictor = TwoStagePredictor.load(args.classifier, args.unet, mask_threshold,
                                       args.extra_unet, args.tta_flips, bfloat16)
    predictor.files = model_files(Path(args.classifier), Path(args.unet),
                                  _extra_unets(args, predictor.unet_config))
    return predictor
