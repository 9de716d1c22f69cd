"""One run's claim on its output folder OUT.

- OUT never overlaps an input: it may not be, contain or lie inside any input folder, each
  resolved through symlinks, patient folders included.
- One run at a time: a lock file beside OUT (``.<OUT>.bt-lock``), removed when the run ends;
  a second run is refused.
- No mixing of runs: everything is written into a staging folder beside OUT and swapped in
  whole when the run ends, ``run.json`` last, so OUT holds one run's outputs or the previous
  run's, never a blend. A run that processed nothing leaves OUT as it was. The swap is one
  rename-exchange where the OS has one (Linux ``renameat2``), which no signal, not even
  SIGKILL, can split; elsewhere two renames with SIGINT, SIGTERM and SIGHUP held back between
  them.
- A killed run's staging folder is removed by the next run, matched by its exact name.
- OUT is only replaced when it is empty or holds an earlier run's outputs, known by the marker
  file only this tool writes (:data:`RUN_MARKER`, with the run's id; ``run.json`` of versions
  that wrote no marker): a folder of other files is refused, never swapped away, whatever its
  files are called.
- Every name under OUT that comes from the input (a case, a slice) is one plain name
  (:func:`name_problem`); a case whose name is not is skipped with one line.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import uuid
from pathlib import Path

from bt_pipeline.atomic import write_text_atomic
from bt_pipeline.data.layout import printable
from bt_pipeline.runtime import UsageError

#: The file by which an OUT is recognised as an earlier run's outputs: only this tool writes
#: it, with the run's id.
RUN_MARKER = ".bt-run"
#: What a run writes at OUT's top: no case may take one of these names.
RESERVED_NAMES = frozenset({"patients.csv", "slices.csv", "errors.csv", "report.html",
                            "run.json", RUN_MARKER})
#: Longest case name, in UTF-8 bytes: outputs add suffixes, and file systems stop at 255.
MAX_NAME_BYTES = 200


def name_problem(name: str) -> str | None:
    """Why ``name`` (a case or slice name read from the input) cannot name an output under OUT,
    or None when it is one plain name."""
    if name in ("", ".", ".."):
        return f"its name {name!r} is not a folder name (outputs would land outside its folder)"
    if "/" in name or "\0" in name:
        return "its name holds a path separator"
    if name.lower() in RESERVED_NAMES:
        return f"its name {name!r} is one of the run's own output files"
    if len(os.fsencode(name)) > MAX_NAME_BYTES:
        return f"its name is longer than {MAX_NAME_BYTES} bytes"
    return None


def output_file_name(stem: str, suffix: str) -> str:
    """``stem + suffix`` as a file name under a case folder: a stem too long for the file
    system keeps its start and gets a short hash of the whole, so names stay unique."""
    name = stem + suffix
    if len(os.fsencode(name)) <= MAX_NAME_BYTES:
        return name
    digest = hashlib.sha256(os.fsencode(stem)).hexdigest()[:12]
    head = os.fsencode(stem)[:MAX_NAME_BYTES - 40].decode("utf-8", "ignore")
    return f"{head}-{digest}{suffix}"


def _is_earlier_run(out: Path) -> bool:
    marker = out / RUN_MARKER
    with contextlib.suppress(OSError, ValueError):
        if marker.is_file() and not marker.is_symlink():
            return json.loads(marker.read_text(encoding="utf-8")).get("tool") == "bt_pipeline"
        # a run written before the marker existed: its run.json says which tool wrote it
        run = out / "run.json"
        if run.is_file() and not run.is_symlink():
            versions = json.loads(run.read_text(encoding="utf-8")).get("versions", {})
            return isinstance(versions, dict) and "bt_pipeline" in versions
    return False


def _resolved(path: Path) -> Path | None:
    """``path`` through its symlinks; None for a symlink loop."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):  # Python 3.11 raises RuntimeError for a loop
        return None


def check_no_overlap(out: Path, inputs: list[Path]) -> None:
    """Raise UsageError if ``out`` is, contains or lies inside any of ``inputs``, or is a
    symlink loop. An input that is a loop is not read, so it overlaps nothing."""
    target = _resolved(out)
    if target is None:
        raise UsageError(f"--out {printable(out)} is a symlink loop; choose another --out")
    for folder in inputs:
        source = _resolved(folder)
        if source is None:
            continue
        if target == source or source in target.parents or target in source.parents:
            raise UsageError(f"--out {printable(out)} overlaps the input "
                             f"{printable(folder)} (resolved: {printable(source)}); inputs are "
                             "never written to, choose another --out")


class OutputFolder:
    """Context manager: lock OUT, give a fresh ``staging`` folder, swap it in on ``commit``."""

    def __init__(self, out: Path, resume: bool = False):
        self.out = Path(out).absolute()
        self.parent = self.out.parent
        self.staging = self.parent / f".{self.out.name}.bt-partial-{os.getpid()}"
        self.resume = resume
        self._lock = None

    def check(self) -> None:
        """Refuse an OUT this run may not replace (before any work; again on entering)."""
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"--out {printable(self.out)} is a file, not a folder")
        if self.out.is_dir() and any(self.out.iterdir()) and not _is_earlier_run(self.out):
            raise UsageError(f"--out {printable(self.out)} holds files that bt did not write; "
                             "choose a new or empty folder")

    def __enter__(self) -> OutputFolder:
        self.check()
        self.parent.mkdir(parents=True, exist_ok=True)
        self._lock = self._locked()
        if self.resume:
            self._adopt_earlier_cases()
        self._remove_leftovers()
        self.staging.mkdir(exist_ok=self.resume)
        return self

    def _adopt_earlier_cases(self) -> None:
        """--resume: the newest staging folder a killed run left (its finished cases), else
        the finished cases of OUT itself, become this run's staging folder's start."""
        partial = self._leftovers("partial")
        if partial:
            newest = max(partial, key=lambda path: path.stat().st_mtime)
            os.replace(newest, self.staging)
        elif self.out.is_dir() and _is_earlier_run(self.out):
            shutil.copytree(self.out, self.staging, symlinks=True)
            for table in RESERVED_NAMES:  # this run writes its own
                (self.staging / table).unlink(missing_ok=True)

    @property
    def lock_path(self) -> Path:
        return self.parent / f".{self.out.name}.bt-lock"

    def _locked(self):
        """The lock file, open and locked. It is removed when the run ends, so a run that
        locked a file another run has just removed tries again on the new one."""
        while True:
            lock = open(self.lock_path, "w")  # noqa: SIM115
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                raise UsageError(f"another run is writing {printable(self.out)}; wait for it "
                                 "or choose another --out") from None
            try:
                current = os.stat(self.lock_path).st_ino == os.fstat(lock.fileno()).st_ino
            except FileNotFoundError:
                current = False
            if current:
                return lock
            lock.close()

    def _leftovers(self, kind: str) -> list[Path]:
        """This OUT's own leftovers of ``kind`` ("old", "partial"), matched by exact name:
        OUT's name may hold glob characters that would match another OUT's."""
        pattern = re.compile(re.escape(f".{self.out.name}.bt-{kind}-") + r"[0-9]+")
        return sorted(self.parent / entry.name for entry in os.scandir(self.parent)
                      if pattern.fullmatch(entry.name))

    def _remove_leftovers(self) -> None:
        """Staging folders of killed runs; an old OUT a killed swap left aside goes back."""
        for leftover in self._leftovers("old"):
            if not self.out.exists():
                os.replace(leftover, self.out)
            else:
                shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self._leftovers("partial"):
            if leftover != self.staging:  # with --resume, this run's adopted start
                shutil.rmtree(leftover, ignore_errors=True)

    def commit(self, manifest: dict) -> None:
        """Write ``run.json`` and the run marker into the staging folder, then swap it in as
        OUT in one step."""
        write_text_atomic(self.staging / RUN_MARKER, json.dumps(
            {"tool": "bt_pipeline", "run_id": uuid.uuid4().hex}) + "\n")
        write_text_atomic(self.staging / "run.json", json.dumps(manifest, indent=2) + "\n")
        if not self.out.exists():
            os.replace(self.staging, self.out)
        elif exchange(self.staging, self.out):
            shutil.rmtree(self.staging, ignore_errors=True)  # it now holds the old run
        else:
            old = self.parent / f".{self.out.name}.bt-old-{os.getpid()}"
            with signals_held():
                os.replace(self.out, old)
                os.replace(self.staging, self.out)
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)  # not committed: nothing changes
        if self._lock is not None:
            with contextlib.suppress(OSError):
                self.lock_path.unlink()  # while still held: no file is left beside OUT
                fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()


#: renameat2's flag that swaps two existing paths (Linux 3.15+, glibc 2.28+).
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one atomic step; False where the OS or file system
    cannot (the caller then renames twice)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))


@contextlib.contextmanager
def signals_held():
    """SIGINT, SIGTERM and SIGHUP received inside the block are acted on after it."""
    caught = []
    names = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
    try:
        previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
                    for s in names}
    except ValueError:  # not the main thread: signals are the main thread's business
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in caught:
            os.kill(os.getpid(), signum)
