"""Command line: ``python -m bt_pipeline COMMAND``. Parses arguments and delegates."""

from __future__ import annotations

import argparse
import sys


def _manifest(args: argparse.Namespace) -> int:
    from bt_pipeline.config import DataConfig
    from bt_pipeline.data.manifest import build_manifest, write_manifest

    defaults = DataConfig()
    table = build_manifest(args.data_dir, defaults.val_fraction, defaults.test_fraction, args.seed)
    write_manifest(table, args.out)
    per_split = table.groupby("split")["patient_id"].nunique().to_dict()
    print(f"{args.out}: {table['patient_id'].nunique()} patients, {len(table)} slices, "
          f"{int(table['has_tumor'].sum())} with tumour; patients per split {per_split}")
    return 0


def _eda(args: argparse.Namespace) -> int:
    from bt_pipeline.eda import write_eda_figures

    for path in write_eda_figures(args.manifest, args.data_dir, args.out):
        print(path)
    return 0


def _bench_loader(args: argparse.Namespace) -> int:
    from bt_pipeline.bench import loader_throughput

    for name, value in loader_throughput(args.manifest, args.data_dir, args.epochs).items():
        print(f"{name}={value:.1f}")
    return 0


def _bench_infer(args: argparse.Namespace) -> int:
    import tempfile

    from bt_pipeline.bench import infer_throughput
    from bt_pipeline.data.manifest import read_manifest

    table = read_manifest(args.manifest)
    chosen = table[table["split"].isin(args.splits)]["patient_id"].unique()
    folders = [f"{args.data_dir}/{patient}" for patient in sorted(chosen)]
    with tempfile.TemporaryDirectory() as out:
        for name, value in infer_throughput(folders, out).items():
            print(f"{name}={value:.2f}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from bt_pipeline.atomic import write_text_atomic
    from bt_pipeline.bench import run_bench

    results = run_bench(args.manifest, args.data_dir, args.seconds)
    for name, value in results.items():
        print(f"{name}={value:.4g}", flush=True)
    write_text_atomic(Path(args.out), json.dumps(results, indent=2) + "\n")
    print(f"written: {args.out}")
    return 0


def _patients(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bt_pipeline.data.manifest import read_manifest

    table = read_manifest(args.manifest)
    for patient in sorted(table.loc[table["split"] == args.split, "patient_id"].unique()):
        print(Path(args.data_dir) / patient)
    return 0


def _command(commands, name: str, help_text: str, run, manifest: bool = True):
    """A subcommand with --data-dir (and --manifest) already declared."""
    from bt_pipeline.config import DataConfig

    command = commands.add_parser(name, help=help_text)
    command.add_argument("--data-dir", default=DataConfig.data_root)
    if manifest:
        command.add_argument("--manifest", default=DataConfig.manifest)
    command.set_defaults(run=run)
    return command


def build_parser() -> argparse.ArgumentParser:
    from bt_pipeline.config import DataConfig

    parser = argparse.ArgumentParser(prog="python -m bt_pipeline")
    commands = parser.add_subparsers(dest="command", required=True)
    manifest = _command(commands, "manifest", "(re)write the slice manifest", _manifest,
                        manifest=False)
    manifest.add_argument("--out", default=DataConfig.manifest)
    manifest.add_argument("--seed", type=int, default=DataConfig.seed)
    _command(commands, "eda", "plots of the dataset", _eda).add_argument(
        "--out", default="reports/eda")
    _command(commands, "bench-loader", "tf.data loader throughput (slices/s)",
             _bench_loader).add_argument("--epochs", type=int, default=3)
    _command(commands, "bench-infer", "end-to-end inference speed", _bench_infer).add_argument(
        "--splits", nargs="+", default=["val", "test"])
    bench = _command(commands, "bench", "speed of every stage against the machine's peak",
                     _bench)
    bench.add_argument("--out", default="reports/bench.json")
    bench.add_argument("--seconds", type=float, default=4.0,
                       help="timed seconds per model measurement")
    _command(commands, "patients", "patient folders of one split", _patients).add_argument(
        "--split", choices=["train", "val", "test"], default="test")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
