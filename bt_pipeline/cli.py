"""The ``bt`` command line: one front over every command, owning exit codes and error messages.

    bt COMMAND [options]            (also: python -m bt_pipeline COMMAND)

Each command lives in the module that owns its work, which exposes ``add_arguments(parser)``
and ``run(args) -> int`` (a module with several commands suffixes both names). Only the chosen
command's module is imported, so ``bt --help`` and ``bt infer --help`` never load TensorFlow.

Exit status: 0 done; 1 done, but some inputs were skipped (listed by the command); 2 nothing
done: a wrong call or bad input, one line on stderr naming it; 3 internal error (a bug: one
line on stderr, the traceback with ``--debug``); 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from bt_pipeline import __version__
from bt_pipeline.runtime import stderr_closed

#: name -> (module, suffix of its add_arguments/run functions, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "infer": ("bt_pipeline.inference.infer", "",
              "detect and outline tumours in scan folders (per-patient masks and reports)"),
    "evaluate": ("bt_pipeline.evaluation.evaluate", "",
                 "score the shipped models on the val/test patients -> reports/evaluation"),
    "external": ("bt_pipeline.evaluation.external", "",
                 "score labelled BraTS-style cases (CASE_flair, _t1, _t1ce, _seg) in 3D "
                 "-> reports/external"),
    "quality": ("bt_pipeline.evaluation.quality_report", "",
                "the per-case quality estimate on held-out patients (nested CV, test, "
                "external) -> reports/quality; --ship-to writes it beside the U-Net"),
    "cv": ("bt_pipeline.evaluation.cv_report", "",
           "5-fold cross-validation over the development patients -> reports/cv"),
    "tune": ("bt_pipeline.training.tune", "",
             "stage 1: RandomSearch for the gate on the U-Net's encoder (--gate, as make tune "
             "runs it) or the from-scratch slice classifier; retrain the best, ship it"),
    "train-unet": ("bt_pipeline.training.train_unet", "", "stage 2: train and ship the U-Net"),
    "manifest": ("bt_pipeline.data.manifest", "_manifest",
                 "(re)write the slice manifest with its patient split and folds"),
    "patients": ("bt_pipeline.data.manifest", "_patients", "patient folders of one split"),
    "brain-masks": ("bt_pipeline.data.brain_masks", "_brain_masks",
                    "a brain mask for every patient (skull-strip augmentation, stripped CV) "
                    "-> reports/brain_masks"),
    "experiments": ("bt_pipeline.studies.experiments", "",
                    "the reference study's tables and the next-step options"),
    "bench": ("bt_pipeline.studies.bench", "",
              "speed of every stage against the machine's peak -> reports/bench.json"),
    "bench-loader": ("bt_pipeline.studies.bench", "_loader", "tf.data loader throughput"),
    "bench-infer": ("bt_pipeline.studies.bench", "_infer", "end-to-end inference speed"),
    "bench-cluster": ("bt_pipeline.studies.bench", "_cluster",
                      "plain infer against infer on a local Ray runtime -> "
                      "reports/bench_cluster.json"),
    "bench-widths": ("bt_pipeline.studies.bench", "_widths",
                     "U-Net inference speed at wider base widths than the shipped one"),
    "eda": ("bt_pipeline.studies.eda", "", "plots of the dataset -> reports/eda"),
    "docs": ("bt_pipeline.studies.doc_figures", "",
             "the README's and the model card's figures, written from reports/ (--check: "
             "say where they differ)"),
    "radiogenomics": ("bt_pipeline.radiogenomics.report", "",
                      "shape features of manual and automatic masks against genomic subtypes "
                      "-> reports/radiogenomics"),
    "roundtrip": ("bt_pipeline.studies.roundtrip", "",
                  "test patients as NIfTI and DICOM through infer -> reports/roundtrip"),
    "stage1-choice": ("bt_pipeline.studies.stage1_choice", "",
                      "encoder gates against another stage 1 and no gate on held-out "
                      "development patients -> reports/cv/<recipe>/stage1_choice"),
    "fit-gap": ("bt_pipeline.studies.fit_gap", "",
                "each development patient held out (CV) against trained on (shipped models) "
                "-> reports/cv/<recipe>/.../fit_gap"),
}


def _front_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<13} {help_text}" for name, (_, _, help_text) in COMMANDS.items())
    return argparse.ArgumentParser(
        prog="bt", formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="bt [--version] COMMAND [options]  (bt COMMAND --help for its options)",
        description="bt_pipeline: find and outline lower-grade glioma FLAIR abnormality in MRI.",
        epilog=f"commands:\n{lines}\n\nexit status: 0 done, 1 some inputs skipped, 2 wrong call "
               "or bad input, 3 internal error, 130 interrupted")


def command_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    """The parser of command ``name`` and its run function (imports that command's module)."""
    module_name, suffix, help_text = COMMANDS[name]
    with stderr_closed():  # a command module that imports TensorFlow makes it speak
        module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"bt {name}", description=help_text)
    getattr(module, f"add_arguments{suffix}")(parser)
    parser.add_argument("--debug", action="store_true",
                        help="on an internal error, print the traceback")
    parser.add_argument("--version", action="version", version=f"bt_pipeline {__version__}")
    return parser, getattr(module, f"run{suffix}")


def run_command(name: str, argv: list[str]) -> int:
    """Parse ``argv`` for command ``name``, run it, and turn every failure into its status."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ start-up chatter
    parser, run = command_parser(name)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed the help or the usage error
        return 0 if exc.code in (0, None) else 2
    try:
        return int(run(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:  # UsageError, bad input
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a bug: one line, the traceback on request
        if args.debug:
            traceback.print_exc()
        print(f"internal error: {type(exc).__name__}: {exc} (bt {name} --debug shows where)",
              file=sys.stderr)
        return 3


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        return run_command(argv[0], argv[1:])
    if argv and not argv[0].startswith("-"):  # before argparse, which would honour a --help
        return _unknown(argv[0])
    parser = _front_parser()
    parser.add_argument("--version", action="version", version=f"bt_pipeline {__version__}")
    parser.add_argument("command", nargs="?", help=argparse.SUPPRESS)
    try:
        args, _ = parser.parse_known_args(argv)
    except SystemExit as exc:
        return 0 if exc.code in (0, None) else 2
    if args.command is None:
        parser.print_help()
        return 2
    return _unknown(args.command)


def _unknown(name: str) -> int:
    print(f"bt: unknown command {name!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr)
    return 2
