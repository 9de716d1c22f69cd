"""``bt infer --ray local|ADDRESS``: the cases of one run segmented by Ray actors, each loading
the models once, on one machine or a cluster (``pip install .[cluster]``; docs/cluster.md).

The driver finds the cases and owns OUT exactly as a plain run does (one run per OUT, swapped in
whole; the tables, ``run.json`` and the report written by the driver). Each case is one actor
call: read, both stages, the case's files written straight into the run's staging folder
beside OUT, which therefore must be on a file system every worker shares, and its rows sent
back. An actor whose process dies is restarted once and the case retried on it; a case that
kills its worker twice is reported in ``errors.csv`` and the run goes on with a fresh actor.
Rows come back in any order and are put in the order the cases were found, so the tables are
the in-process run's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from bt_pipeline.data.layout import InputProblem, PatientScan, VolumeScan, printable
from bt_pipeline.inference.pipeline import (
    CaseOptions,
    CaseRecord,
    InferenceResult,
    case_admitted,
    inference_result,
    predict_case,
    write_case,
)

#: Fault injection for the tests (docs/cluster.md): ``CASE:MARKER`` makes the worker that
#: reaches case CASE exit at once, as if killed, when the file MARKER does not exist yet (it
#: creates it first, so the retry goes through).
EXIT_ONCE_ENV = "BT_TEST_WORKER_EXIT_ONCE"


@dataclass(frozen=True)
class ClusterSpec:
    """Where and how wide: ``address`` "local" (a Ray runtime on this machine) or a running
    cluster's address; ``workers`` actors of ``threads`` TensorFlow threads each; the model
    options (``bt infer``'s --classifier, --unet, ... as parsed) each actor loads."""

    address: str
    workers: int
    threads: int
    model_args: argparse.Namespace
    mask_threshold: float = 0.5


class CaseWorker:
    """One Ray actor: the models loaded once, then one case per call."""

    def __init__(self, model_args: argparse.Namespace, mask_threshold: float, threads: int):
        from bt_pipeline.inference.model_options import load_predictor
        from bt_pipeline.runtime import quiet_tensorflow

        quiet_tensorflow(threads)
        self.predictor = load_predictor(model_args, mask_threshold)
        self.pool = ThreadPoolExecutor(max_workers=max(threads, 2))

    def ready(self) -> bool:
        return True

    def run(self, scan: PatientScan | VolumeScan, staging: str, options: CaseOptions):
        """(patient row or None, slice rows, the case's problems, its notes)."""
        _exit_if_asked(scan.patient_id)
        problems: list[InputProblem] = []
        predicted = predict_case(scan, self.predictor, self.pool, problems, options)
        if predicted is None:
            return None, [], problems, []
        patient, rows = write_case(Path(staging), predicted, self.predictor, self.pool,
                                   options, problems)
        return patient, rows, problems, predicted.notes


def _exit_if_asked(case_id: str) -> None:
    case, _, marker = os.environ.get(EXIT_ONCE_ENV, "").partition(":")
    if case == case_id and marker and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)


def run_on_ray(patients: list[PatientScan | VolumeScan], problems: list[InputProblem],
               staging: Path, options: CaseOptions, resumed: dict[str, CaseRecord],
               progress: bool,
               *, spec: ClusterSpec) -> InferenceResult:
    """Every admitted case on ``spec.workers`` actors; rows in the order of ``patients``."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError

    if not ray.is_initialized():
        ray.init(address=None if spec.address == "local" else spec.address,
                 num_cpus=spec.workers * spec.threads if spec.address == "local" else None,
                 include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                           if k == EXIT_ONCE_ENV}})
    worker = ray.remote(num_cpus=spec.threads, max_restarts=1, max_task_retries=1)(CaseWorker)

    def start():
        return worker.remote(spec.model_args, spec.mask_threshold, spec.threads)

    seen: set[str] = set()
    done, queue = {}, []  # index of the case among ``patients`` -> its rows and problems
    for index, scan in enumerate(patients):
        refused: list[InputProblem] = []
        if not case_admitted(scan, seen, refused):
            print(refused[-1].line(), file=sys.stderr)
            done[index] = (None, [], refused)
        elif scan.patient_id in resumed:
            done[index] = resumed[scan.patient_id]
        else:
            queue.append((index, scan))
    idle = [start() for _ in range(min(spec.workers, len(queue)))]
    try:  # a model that cannot be loaded is one line, as without Ray, not a failure per case
        ray.get([actor.ready.remote() for actor in idle])
    except (RayActorError, RayTaskError) as exc:
        cause = getattr(exc, "cause", None) or exc
        raise ValueError(f"the workers cannot load the models: {str(cause).strip()}") from exc
    running: dict = {}
    interrupted, first = False, None
    bar = tqdm(total=len(queue), desc="patients", unit="patient", disable=not progress)
    try:
        while queue or running:
            while queue and idle:
                (index, scan), actor = queue.pop(0), idle.pop()
                running[actor.run.remote(scan, str(staging), options)] = (index, scan, actor)
            (ref,), _ = ray.wait(list(running), num_returns=1)
            index, scan, actor = running.pop(ref)
            try:
                patient, rows, case_problems, notes = ray.get(ref)
            except (RayActorError, WorkerCrashedError):
                idle.append(start())  # the actor is gone for good: a fresh one takes its place
                case_problems = [InputProblem(str(scan.folder), scan.patient_id,
                                              "its worker died twice while segmenting it "
                                              "(retried once)")]
                patient, rows, notes = None, [], []
            except RayTaskError as exc:  # a bug inside the worker: this case only
                idle.append(actor)
                cause = str(exc.cause) if exc.cause is not None else type(exc).__name__
                case_problems = [InputProblem(str(scan.folder), scan.patient_id,
                                              f"internal error in its worker: {cause}")]
                patient, rows, notes = None, [], []
            else:
                idle.append(actor)
            for problem in case_problems:
                print(problem.line(), file=sys.stderr)
            for note in notes:
                tqdm.write(f"note: {printable(scan.patient_id)}: {note}", file=sys.stderr)
            done[index] = (patient, rows, case_problems)
            first = first if first is not None else time.time()
            bar.update()
    except KeyboardInterrupt:
        interrupted = True  # what finished is kept; the cases under way are dropped
    finally:
        bar.close()
    patient_rows, slice_rows = [], []
    for index in sorted(done):
        patient, rows, case_problems = done[index]
        problems.extend(case_problems)
        if patient is not None:
            patient_rows.append(patient)
            slice_rows.extend(rows)
    return inference_result(patient_rows, slice_rows, problems, first, interrupted)
