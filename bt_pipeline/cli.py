"""Argument helpers shared by the entry points (no TensorFlow import at parse time)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bt_pipeline.config import SHIPPED_CLASSIFIER, SHIPPED_UNET, DataConfig


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """--data-dir, --manifest, --seed, --context-slices and --threads."""
    parser.add_argument("--data-dir", default=DataConfig.data_root)
    parser.add_argument("--manifest", default=DataConfig.manifest)
    parser.add_argument("--seed", type=int, default=DataConfig.seed)
    parser.add_argument("--context-slices", type=int, default=DataConfig.context_slices,
                        help="2.5D input: neighbouring slices on each side stacked as channels")
    parser.add_argument("--threads", type=int, default=None,
                        help="TensorFlow threads (default: all cores)")


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, then apply --threads before any TensorFlow work."""
    from bt_pipeline.training import limit_threads

    args = parser.parse_args(argv)
    limit_threads(args.threads)
    return args


def keras_verbosity() -> int | str:
    """A progress bar in a terminal, one line per epoch in a log file."""
    return "auto" if sys.stdout.isatty() else 2


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Which models run, and how: --classifier, --unet, --extra-unet, --tta-flips."""
    parser.add_argument("--classifier", type=Path, default=SHIPPED_CLASSIFIER)
    parser.add_argument("--unet", type=Path, default=SHIPPED_UNET)
    parser.add_argument("--extra-unet", type=Path, nargs="*", default=None, metavar="KERAS",
                        help="more U-Nets of the same input size, masks from their mean "
                             "(default: the U-Net config's ensemble; none: --extra-unet alone)")
    parser.add_argument("--tta-flips", action=argparse.BooleanOptionalAction, default=None,
                        help="also segment each slice mirrored left-right and average "
                             "(default: as the U-Net config says)")
    parser.add_argument("--precision", choices=["float32", "bfloat16", "auto"],
                        default="float32",
                        help="U-Net compute precision; auto = bfloat16 where the CPU has it "
                             "natively: ~1.45x the U-Net's own speed, val and test Dice equal "
                             "to float32 within 0.0005 (README 'Speed')")


def load_predictor(args: argparse.Namespace, mask_threshold: float = 0.5):
    """The TwoStagePredictor that :func:`add_model_arguments`' options describe (auto
    precision looks at the CPU's flags)."""
    from bt_pipeline.predict import TwoStagePredictor, cpu_has_bfloat16

    bfloat16 = cpu_has_bfloat16() if args.precision == "auto" else args.precision == "bfloat16"
    return TwoStagePredictor.load(args.classifier, args.unet, mask_threshold, args.extra_unet,
                                  args.tta_flips, bfloat16)
