"""One run's claim on its output folder OUT.

- OUT never overlaps an input: it may not be, contain or lie inside any input folder, each
  resolved through symlinks, patient folders included.
- One run at a time: a lock file beside OUT (``.<OUT>.bt-lock``); a second run is refused.
- No mixing of runs: everything is written into a staging folder beside OUT and swapped in
  whole when the run ends, ``run.json`` last, so OUT holds one run's outputs or the previous
  run's, never a blend. A run that processed nothing leaves OUT as it was.
- A killed run's staging folder is removed by the next run.
- OUT is only replaced when it is empty or holds an earlier run's outputs: a folder of other
  files is refused, never swapped away.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path

from bt_pipeline.atomic import write_text_atomic
from bt_pipeline.cli import UsageError
from bt_pipeline.data.layout import printable

#: Files by which an OUT is recognised as an earlier run's outputs (run.json since it exists).
RUN_MARKERS = ("run.json", "slices.csv")


def check_no_overlap(out: Path, inputs: list[Path]) -> None:
    """Raise UsageError if ``out`` is, contains or lies inside any of ``inputs``."""
    target = out.resolve()
    for folder in inputs:
        source = folder.resolve()
        if target == source or source in target.parents or target in source.parents:
            raise UsageError(f"--out {printable(out)} overlaps the input "
                             f"{printable(folder)} (resolved: {printable(source)}); inputs are "
                             "never written to, choose another --out")


class OutputFolder:
    """Context manager: lock OUT, give a fresh ``staging`` folder, swap it in on ``commit``."""

    def __init__(self, out: Path):
        self.out = Path(out).absolute()
        self.parent = self.out.parent
        self.staging = self.parent / f".{self.out.name}.bt-partial-{os.getpid()}"
        self._lock = None

    def __enter__(self) -> OutputFolder:
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"--out {printable(self.out)} is a file, not a folder")
        if self.out.is_dir() and any(self.out.iterdir()) and not any(
                (self.out / marker).is_file() for marker in RUN_MARKERS):
            raise UsageError(f"--out {printable(self.out)} holds files that bt did not write; "
                             "choose a new or empty folder")
        self.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.parent / f".{self.out.name}.bt-lock", "w")  # noqa: SIM115
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise UsageError(f"another run is writing {printable(self.out)}; wait for it or "
                             "choose another --out") from None
        self._remove_leftovers()
        self.staging.mkdir()
        return self

    def _remove_leftovers(self) -> None:
        """Staging folders of killed runs; an old OUT a killed swap left aside goes back."""
        for leftover in self.parent.glob(f".{self.out.name}.bt-old-*"):
            if not self.out.exists():
                os.replace(leftover, self.out)
            else:
                shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self.parent.glob(f".{self.out.name}.bt-partial-*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def commit(self, manifest: dict) -> None:
        """Write ``run.json`` into the staging folder, then swap it in as OUT."""
        write_text_atomic(self.staging / "run.json", json.dumps(manifest, indent=2) + "\n")
        old = self.parent / f".{self.out.name}.bt-old-{os.getpid()}"
        if self.out.exists():
            os.replace(self.out, old)
        os.replace(self.staging, self.out)
        shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)  # not committed: nothing changes
        if self._lock is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
