"""``bt infer``: per-patient tumour detection and masks for MR slices, NIfTI and DICOM.

Exit status: 0 all inputs processed; 1 some inputs skipped (listed in OUT/errors.csv and on
stderr); 2 nothing could be processed, or the call itself was wrong; 3 internal error. Only the
arguments are handled here, so ``--help`` answers without loading TensorFlow or pandas.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bt_pipeline.atomic import write_text_atomic
from bt_pipeline.data.formats import is_volume_file, volume_stem
from bt_pipeline.data.layout import channels_named, printable
from bt_pipeline.inference.model_options import (
    add_model_arguments,
    load_predictor,
    model_facts,
)
from bt_pipeline.inference.output_folder import name_problem
from bt_pipeline.runtime import UsageError, library_output_silenced


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scan_dirs", nargs="+", metavar="SCAN_DIR",
                        help="a patient folder of slices, a folder of patient folders, a NIfTI "
                             "file or case folder, a DICOM series or case folder (README)")
    parser.add_argument("--out", default=None,
                        help="output folder: new, empty, or an earlier run's (replaced whole); "
                             "default predictions/<first SCAN_DIR's name>")
    # bfloat16 where the CPU computes it natively: masks within Dice 0.998 of float32's and
    # the end-to-end rate above 50 slices/s on 2 cores (docs/speed.md)
    add_model_arguments(parser, precision="auto")
    parser.add_argument("--threshold", type=float, default=0.5, help="mask threshold")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                        help="voxel size in mm (in-plane column, row, slice) of slice "
                             "folders, when known: gives tumor_volume_ml (volumes carry theirs)")
    parser.add_argument("--series", action="append", default=[], metavar="ROLE=TEXT",
                        help="DICOM: the series in the folder named TEXT, else the one whose "
                             "description contains TEXT, is ROLE (pre, flair or post); "
                             "repeatable; before the built-in words")
    parser.add_argument("--channels", default=None, metavar="0000=NAME,...",
                        help="nnU-Net-numbered NIfTI: each channel's sequence (flair, t1, t1ce, "
                             "t2), e.g. 0000=flair,0001=t1,0002=t1ce,0003=t2; instead of a "
                             "dataset.json at or above the images folder")
    parser.add_argument("--labels", type=Path, default=None, metavar="DIR",
                        help="ground truth of volume cases: DIR/CASE.nii.gz or CASE_seg.nii.gz "
                             "(found by themselves: CASE_seg beside the images, labelsTr/ "
                             "beside imagesTr/)")
    parser.add_argument("--label-values", default=None, metavar="V,V,...",
                        help="label values that are tumour (default: every value above 0, "
                             "BraTS's whole tumour)")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="also write each patient's probability.nii.gz: the U-Net's "
                             "probabilities before post-processing, 0 on slices stage 1 did not "
                             "pass")
    parser.add_argument("--resume", action="store_true",
                        help="keep the cases an interrupted run into the same --out finished "
                             "and segment only the rest")
    parser.add_argument("--ray", default=None, metavar="local|ADDRESS",
                        help="segment the cases on Ray actors: a local Ray runtime, or a "
                             "running cluster's address (pip install .[cluster]; "
                             "docs/cluster.md)")
    parser.add_argument("--workers", type=int, default=None,
                        help="with --ray: actors (default: cores / --worker-threads)")
    parser.add_argument("--worker-threads", type=int, default=1,
                        help="with --ray: TensorFlow threads per actor (default 1)")
    parser.add_argument("--outputs", choices=["all", "masks"], default="all",
                        help="masks: each case's mask and the tables only, no slice PNGs, "
                             "image copy, overview or viewer (a cohort's run; default all)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--timing", type=Path, default=None,
                        help="write wall-clock timings as JSON here (for benchmarks)")


def run(args: argparse.Namespace) -> int:
    if args.out is not None and not args.out.strip():
        raise UsageError("--out is empty; give the folder the outputs should go to")
    out = Path(args.out) if args.out is not None else default_out(args.scan_dirs[0])
    if not 0.0 < args.threshold < 1.0:
        raise UsageError("--threshold must be between 0 and 1")
    if args.spacing is not None and not all(0 < v < 100 for v in args.spacing):
        raise UsageError("--spacing needs three finite sizes above 0 and under 100 mm")
    for scan_dir in args.scan_dirs:
        if not str(scan_dir).strip():  # Path("") would be the working folder
            raise UsageError("a SCAN_DIR is empty; give the folder or file to segment")
    args.scan_dirs = [Path(p) for p in args.scan_dirs]
    if args.timing is not None and (args.timing.is_dir() or not args.timing.parent.is_dir()):
        raise UsageError(f"--timing {args.timing}: not a file in an existing folder")
    series_roles = _series_roles(args.series)
    try:
        channels = None if args.channels is None else channels_named(args.channels)
        label_values = None if args.label_values is None else tuple(
            int(v) for v in args.label_values.split(","))
    except ValueError as exc:
        raise UsageError(f"--channels or --label-values: {exc}") from exc
    if args.labels is not None and not args.labels.is_dir():
        raise UsageError(f"--labels {printable(args.labels)}: not a folder")
    cluster = _cluster(args)
    missing = [p for p in args.scan_dirs if not os.path.lexists(p)]
    for path in missing:
        print(f"error: SCAN_DIR not found: {printable(path)}", file=sys.stderr)
    if missing:
        return 2
    from bt_pipeline.inference.pipeline import find_inputs, run_inference

    # every input and OUT checked before TensorFlow and the models load (seconds)
    found = find_inputs(args.scan_dirs, out, channels, args.labels)
    if not found.patients:
        for problem in found.problems:
            print(problem.line(), file=sys.stderr)
        print("error: nothing to segment: no slice folder, NIfTI or DICOM case in "
              f"{', '.join(printable(p) for p in args.scan_dirs)} (README: input formats)",
              file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"loading the models ({len(found.patients)} case(s) found) ...", file=sys.stderr,
              flush=True)
    # on Ray each actor loads the models: the driver only reads what run.json records
    predictor = load_predictor(args, args.threshold) if cluster is None else \
        model_facts(args, args.threshold)
    try:
        with library_output_silenced(keep=args.debug):
            result = run_inference(args.scan_dirs, out, predictor, progress=not args.quiet,
                                   spacing=None if args.spacing is None else
                                   tuple(args.spacing), options=_recorded_options(args),
                                   series_roles=series_roles,
                                   save_probabilities=args.save_probabilities, found=found,
                                   label_values=label_values, resume=args.resume,
                                   runner=_ray_runner(cluster), outputs=args.outputs)
    except OSError as exc:
        print(f"error: cannot write outputs: {exc}", file=sys.stderr)
        return 2
    if args.timing is not None:
        timing = {"first_patient_unix": result.first_patient_unix, "end_unix": time.time(),
                  "slices": len(result.slices), "patients": len(result.patients)}
        write_text_atomic(args.timing, json.dumps(timing) + "\n")
    if result.patients.empty:
        print("error: no slice could be processed", file=sys.stderr)
    else:
        print(f"report: {out / 'report.html'}")
    return result.exit_code


def _cluster(args: argparse.Namespace):
    """The --ray options as a ClusterSpec (None without --ray), checked before any work."""
    if args.ray is None:
        if args.workers is not None:
            raise UsageError("--workers needs --ray local|ADDRESS")
        return None
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise UsageError("--ray needs Ray: pip install '.[cluster]' (or pip install ray)")
    if args.worker_threads < 1 or (args.workers is not None and args.workers < 1):
        raise UsageError("--workers and --worker-threads must be at least 1")
    from bt_pipeline.inference.cluster import ClusterSpec

    workers = args.workers or max(1, (os.cpu_count() or 1) // args.worker_threads)
    return ClusterSpec(args.ray, workers, args.worker_threads, args, args.threshold)


def _ray_runner(cluster):
    """The cases on Ray when --ray was given, else None (this process runs them)."""
    if cluster is None:
        return None
    import functools

    from bt_pipeline.inference.cluster import run_on_ray

    return functools.partial(run_on_ray, spec=cluster)


def default_out(scan_dir: str) -> Path:
    """``predictions/<name>``: the first SCAN_DIR's folder name (a NIfTI file's without its
    suffix), so that runs on different inputs never meet in one OUT."""
    path = Path(os.path.abspath(scan_dir)) if str(scan_dir).strip() else Path("input")
    name = volume_stem(path) if is_volume_file(path) else path.name
    return Path("predictions") / (name if name_problem(name) is None else "input")


def _series_roles(pairs: list[str]) -> dict[str, str]:
    roles = {}
    for pair in pairs:
        role, _, text = pair.partition("=")
        if role not in ("pre", "flair", "post") or not text.strip():
            raise UsageError(f"--series {pair!r}: ROLE=TEXT with ROLE pre, flair or post")
        roles[role] = text.strip()
    return roles


def _recorded_options(args: argparse.Namespace) -> dict:
    """The call's options as run.json records them (paths as text)."""
    return {key: (str(value) if isinstance(value, Path) else
                  [str(v) for v in value] if isinstance(value, list) else value)
            for key, value in sorted(vars(args).items()) if key not in ("scan_dirs", "debug")}
