"""Argument helpers shared by the training entry points."""

from __future__ import annotations

import argparse
import sys

from bt_pipeline.config import DataConfig
from bt_pipeline.training import limit_threads


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """--data-dir, --manifest, --seed and --threads."""
    parser.add_argument("--data-dir", default=DataConfig.data_root)
    parser.add_argument("--manifest", default=DataConfig.manifest)
    parser.add_argument("--seed", type=int, default=DataConfig.seed)
    parser.add_argument("--threads", type=int, default=None,
                        help="TensorFlow threads (default: all cores)")


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, then apply --threads before any TensorFlow work."""
    args = parser.parse_args(argv)
    limit_threads(args.threads)
    return args


def keras_verbosity() -> int | str:
    """A progress bar in a terminal, one line per epoch in a log file."""
    return "auto" if sys.stdout.isatty() else 2
