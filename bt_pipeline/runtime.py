"""What every command shares at run time, below the command front (``cli.py``) and the stage
folders alike: the usage error (exit status 2), the common data arguments, TensorFlow started
quietly, C++ libraries' output kept off the terminal, and Keras' verbosity. Imports only the
config; TensorFlow only when asked to start it."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from bt_pipeline.config import DataConfig


class UsageError(ValueError):
    """The call itself is wrong (exit status 2)."""


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """--data-dir, --manifest, --seed, --context-slices and --threads."""
    parser.add_argument("--data-dir", default=DataConfig.data_root)
    parser.add_argument("--manifest", default=DataConfig.manifest)
    parser.add_argument("--seed", type=int, default=DataConfig.seed)
    parser.add_argument("--context-slices", type=int, default=DataConfig.context_slices,
                        help="2.5D input: neighbouring slices on each side stacked as channels")
    parser.add_argument("--threads", type=int, default=None,
                        help="TensorFlow threads (default: all cores)")


@contextlib.contextmanager
def stderr_closed():
    """Send the process's stderr (file descriptor 2, where C++ libraries write) to /dev/null
    for the block; a Python exception still surfaces, after stderr is back."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@contextlib.contextmanager
def library_output_silenced(keep: bool = False):
    """For a command reading users' images: what C++ libraries write straight to file
    descriptor 2 (ITK and GDCM warnings, nifticlib, VNL) goes to /dev/null, while Python's
    ``sys.stderr`` (the tool's own lines, the progress bar) keeps writing where stderr went.
    The tool's own line names each input those libraries complain about. ``keep`` (--debug)
    leaves everything as it is."""
    if keep:
        yield
        return
    sys.stderr.flush()
    python_stderr = sys.stderr
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        on_fd2 = python_stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a test's capture, an embedding host
        on_fd2 = False
    if on_fd2:
        sys.stderr = open(saved, "w", buffering=1, encoding=python_stderr.encoding,  # noqa: SIM115
                          errors=python_stderr.errors, closefd=False)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        if on_fd2:
            sys.stderr.close()
            sys.stderr = python_stderr
        os.close(saved)
        os.close(devnull)


def quiet_tensorflow(threads: int | None = None) -> None:
    """Import TensorFlow and start its runtime with stderr closed: its C++ start-up lines
    (oneDNN notice, CUDA probing, absl) are not meant for users and no setting silences all of
    them. ``threads`` caps TensorFlow's thread pools, only possible before the runtime starts.
    Does nothing once the runtime runs."""
    if getattr(quiet_tensorflow, "started", False):
        return
    with stderr_closed():
        import tensorflow as tf

        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        tf.constant(0.0) + 1.0  # the first op starts the runtime, which probes for a GPU
    quiet_tensorflow.started = True


def apply_threads(args: argparse.Namespace) -> None:
    """Apply --threads before any TensorFlow work: two trainings sharing a small CPU run faster
    with one thread each than fighting over every core."""
    quiet_tensorflow(getattr(args, "threads", None))


def keras_verbosity() -> int | str:
    """A progress bar in a terminal, one line per epoch in a log file."""
    return "auto" if sys.stdout.isatty() else 2


def cpu_has_bfloat16() -> bool:
    """True where the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); elsewhere oneDNN
    emulates it, slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))
