"""Which models a command runs, and how: the shared options (``--classifier``, ``--unet``,
``--extra-unet``, ``--tta-flips``, ``--precision``) and the predictor they describe. Parsing
them imports no TensorFlow."""

from __future__ import annotations

import argparse
from pathlib import Path

from bt_pipeline.config import SHIPPED_CLASSIFIER, SHIPPED_UNET


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


def load_predictor(args: argparse.Namespace, mask_threshold: float = 0.5):
    """The TwoStagePredictor that :func:`add_model_arguments`' options describe (auto
    precision looks at the CPU's flags)."""
    from bt_pipeline.runtime import quiet_tensorflow

    quiet_tensorflow()
    from bt_pipeline.inference.predictor import TwoStagePredictor
    from bt_pipeline.models.precision import cpu_has_bfloat16

    bfloat16 = cpu_has_bfloat16() if args.precision == "auto" else args.precision == "bfloat16"
    return TwoStagePredictor.load(args.classifier, args.unet, mask_threshold, args.extra_unet,
                                  args.tta_flips, bfloat16)
