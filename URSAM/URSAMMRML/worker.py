"""The URSAM worker: one Localize or Segment run of the engine, in a process of its own.

    python -m URSAMMRML.worker JOBDIR [--parent-pid PID] [--serve]

(``--serve``: the persistent mode of SAM-assisted correction, :mod:`URSAMMRML.sessionworker`.)

Slicer's Python holds the GIL while Slicer's event loop idles (PythonQt's
thread support is off), so engine work on a thread of the Slicer process
barely advances. The logic (:mod:`URSAMMRML.jobs`) runs this module with
PythonSlicer instead, reads its events, and kills it on Cancel. It imports
neither Slicer, Qt nor VTK: only the engine.

The job is a folder written by :func:`write_job`:

- ``job.json``: the task (``segment`` or ``localize``); the options as the
  fields of :class:`URSAMMRML.options.RunOptions` (an option added there
  reaches the engine with no change here); the input's name and exact grid;
  the organ boxes (from ROIs) or the template library and organs;
- ``input.nrrd``: the input volume's voxels (float32, as the logic copied them).

The worker writes ``outcome.pickle`` (:class:`Outcome`: the localized boxes
and the engine's :class:`URSAMLib.result.SegmentationResult`, whose organ
maps Rectify reruns on without SAM; an output the engine adds to the result
comes back with it) and prints one JSON line per event on stdout::

    {"event": "progress", "stage": "embedding slices", "done": 3, "total": 20, "message": ""}
    {"event": "warning", "message": "..."}
    {"event": "done", "seconds": 12.3}
    {"event": "error", "kind": "input", "message": "one line"}

Exit codes: 0 done, 2 bad input (an :class:`URSAMLib.errors.URSAMError`),
1 any other failure (the traceback is on stderr), 3 the parent process died.

:func:`compute` is the run itself; the logic's in-process path calls it too,
so a result is the same whichever process made it.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

from URSAMLib.atomic import atomic_path, atomic_write_text
from URSAMLib.boxes import OrganBox
from URSAMLib.calibration.file import find_calibration
from URSAMLib.errors import URSAMError
from URSAMLib.imageio import Scan, read_image
from URSAMLib.localizers import BoxSource, LibrarySource
from URSAMLib.progress import STAGE_MODEL, Progress
from URSAMLib.result import SegmentationResult
from URSAMLib.runner import ScanJob, run_scan
from URSAMLib.sam import BackendOptions
from URSAMLib.templates import Library

from .options import RunOptions
from .sessionworker import serve

JOB_FILE = "job.json"
INPUT_FILE = "input.nrrd"
OUTCOME_FILE = "outcome.pickle"
#: the worker's stdout (its events) and stderr, as the logic keeps them in the job folder
EVENTS_FILE = "events.jsonl"
LOG_FILE = "worker.log"
JOB_FORMAT = 1
TASKS = ("segment", "localize", "session")
#: the task of a persistent worker (``--serve``: URSAMMRML.sessionworker), which holds no boxes or library
SESSION = "session"
EXIT_DONE, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_ORPHANED = 0, 1, 2, 3
#: same for every Python from 3.4 on, so a worker Python other than the logic's can still answer
PICKLE_PROTOCOL = 4


@dataclass
class Job:
    """One run, as the worker reads it (the in-process path builds it from the scene directly)."""
    task: str
    name: str
    volume: np.ndarray  # float32 [z, y, x]
    #: float32 image of ``volume`` on the input's grid (what the localizer reads)
    image: sitk.Image
    options: RunOptions
    boxes: list = None  # OrganBox from ROIs; None: localize from ``library``
    library: str = None
    organs: list = None

    def reference(self):
        """The engine's reference image: the grid as an empty UInt8 image (as ``imageio.read_ct``)."""

        ref = sitk.Image(self.image.GetSize(), sitk.sitkUInt8)
        ref.CopyInformation(self.image)
        return ref


@dataclass
class Outcome:
    """What a run gives back: localized boxes (where it localized) and the engine's result (Segment)."""
    task: str
    localized: list = None
    localizeInfo: dict = None
    #: without its ``volume`` and ``reference``, which the logic has already
    result: Optional[SegmentationResult] = None
    warnings: list = field(default_factory=list)
    seconds: float = 0.0


# -- the run ----------------------------------------------------------------------------------------

def roiPromptNote(options, fromRois):
    """The user's note when organ ROIs override the prompt mode (None if they do not).

    The rule lives here once: ROIs are 3D boxes with nothing warped into the
    scan, so they run as the paper's box3d prompt; the slice-adaptive modes
    follow the support labels a template library warps in.
    """
    if not fromRois or options.prompts == "box3d":
        return None
    return (f"the checked organ ROIs run as box3d prompts: prompt mode {options.prompts} follows the support "
            "labels that a template library warps into the scan (uncheck the ROIs to localize the organs from "
            "the library)")


def _library(library):
    return library if isinstance(library, Library) else Library(library)


def makeBackend(options, progress=None, percentile=False):
    """The SAM model of a run's options (``percentile``: normalization for a scan that is not CT in HU)."""
    if progress is not None:
        progress.stage(f"{STAGE_MODEL} {options.backend}")
    return BackendOptions(options.backend, options.checkpoint or None, options.device).make(percentile)


def scanJob(job, library=None, progress=None):
    """The engine's :class:`URSAMLib.runner.ScanJob` of a worker job: the in-memory scan, ROIs as box3d
    prompts or organs from the library with its own calibration, as ``ursam segment --templates`` uses it."""
    scan = Scan(job.reference(), job.volume, job.image, job.name)
    fromRois = job.boxes is not None
    settings = job.options.settings(fromRois=fromRois)
    if fromRois:
        return ScanJob(scan, BoxSource(list(job.boxes)), settings)
    library = _library(library or job.library)
    calibration = None
    if job.task == "segment":
        calibration = find_calibration(library, None, progress, fuses=settings.warps_labels())
    return ScanJob(scan, LibrarySource(library, job.organs), settings, calibration,
                   stop_after="localize" if job.task == "localize" else None)


def compute(job, progress=None, backend=None, loadBackend=makeBackend, library=None):
    """Run the engine on a job (:func:`URSAMLib.runner.run_scan`, the run of every caller): an
    :class:`Outcome`. Reads no scene; safe in any process.

    ``backend``: a SAM backend already loaded; else ``loadBackend(options,
    progress, percentile)`` gives one (the in-process logic keeps its models
    between runs). ``library``: the job's template library, already opened.
    """
    t0 = time.perf_counter()
    progress = progress or Progress()
    progress.check_cancel()
    run = scanJob(job, library, progress)

    def sam(percentile):
        return backend if backend is not None else loadBackend(job.options, progress, percentile)

    outcome = run_scan(run, sam, progress)
    result = Outcome(job.task, result=outcome.result if job.task == "segment" else None)
    if job.boxes is None:
        result.localized, result.localizeInfo = outcome.localization.boxes, outcome.localization.info
    result.warnings = list(progress.warnings)
    progress.check_cancel()
    result.seconds = time.perf_counter() - t0
    return result


# -- the job folder ----------------------------------------------------------------------------------

def _geometry(image):
    return {"size": [int(s) for s in image.GetSize()], "spacing": [float(v) for v in image.GetSpacing()],
            "origin": [float(v) for v in image.GetOrigin()], "direction": [float(v) for v in image.GetDirection()]}


def write_job(job_dir, job):
    """Write a :class:`Job` into ``job_dir`` (the logic does, on Slicer's main thread)."""

    if job.task not in TASKS:
        raise ValueError(f"unknown worker task {job.task!r}")
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(job_dir / INPUT_FILE) as tmp:
        # uncompressed: compression costs more time than the local disk saves
        sitk.WriteImage(job.image, str(tmp), False)
    spec = {"format": JOB_FORMAT, "task": job.task, "name": job.name, "geometry": _geometry(job.image),
            "options": asdict(job.options),
            "boxes": None if job.boxes is None else [b.to_json() for b in job.boxes],
            "library": None if job.library is None else str(job.library),
            "organs": None if job.organs is None else list(job.organs)}
    atomic_write_text(job_dir / JOB_FILE, json.dumps(spec, indent=1))
    return job_dir


def read_job(job_dir):
    """The :class:`Job` of a job folder; URSAMError (naming the file) if it is unusable."""

    job_dir = Path(job_dir)
    spec_path = job_dir / JOB_FILE
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise URSAMError("the worker's job file is missing", spec_path) from None
    except (OSError, ValueError) as err:
        raise URSAMError(f"the worker's job file is unreadable ({err})", spec_path) from None
    if spec.get("format") != JOB_FORMAT or spec.get("task") not in TASKS:
        raise URSAMError(f"the worker's job file has format {spec.get('format')!r} and task {spec.get('task')!r}; "
                         f"this worker reads format {JOB_FORMAT}, tasks {', '.join(TASKS)}", spec_path)
    try:
        options = RunOptions(**spec["options"]).check()
    except TypeError as err:
        raise URSAMError(f"the worker's job file has options this worker does not know ({err})", spec_path) from None
    input_path = job_dir / INPUT_FILE
    image = read_image(input_path, "the worker's input volume")
    geometry = spec["geometry"]
    if list(image.GetSize()) != geometry["size"] or image.GetDimension() != 3:
        raise URSAMError(f"the worker's input volume has size {list(image.GetSize())}, the job says "
                         f"{geometry['size']}", input_path)
    image = sitk.Cast(image, sitk.sitkFloat32)
    # the job's own numbers: a file header may round them, and the result must sit on the input's exact grid
    image.SetSpacing(geometry["spacing"])
    image.SetOrigin(geometry["origin"])
    image.SetDirection(geometry["direction"])
    volume = sitk.GetArrayFromImage(image)
    if not np.isfinite(volume).all():
        raise URSAMError("the worker's input volume has NaN or infinite voxels", input_path)
    boxes = None
    if spec.get("boxes") is not None:
        boxes = [OrganBox(int(b["label"]), str(b["name"]), list(b["min_ijk"]), list(b["max_ijk"]),
                          list(b.get("notes", [])),
                          None if b.get("slice_boxes") is None else
                          {int(z): v for z, v in b["slice_boxes"].items()}) for b in spec["boxes"]]
    elif not spec.get("library") and spec["task"] != SESSION:
        raise URSAMError("the worker's job gives neither organ boxes nor a template library", spec_path)
    return Job(spec["task"], str(spec.get("name", "")), volume, image, options, boxes, spec.get("library"),
               spec.get("organs"))


def write_outcome(job_dir, outcome):
    """Pickle an :class:`Outcome` into the job folder, without the volume and grid the logic has already."""

    result = outcome.result
    kept = None
    if result is not None:
        kept = (result.volume, result.reference)
        result.volume = result.reference = None
    try:
        with atomic_path(Path(job_dir) / OUTCOME_FILE) as tmp:
            with open(tmp, "wb") as handle:
                pickle.dump(outcome, handle, protocol=PICKLE_PROTOCOL)
    finally:
        if kept is not None:
            result.volume, result.reference = kept


def read_outcome(job_dir, volume=None, reference=None):
    """The :class:`Outcome` a worker wrote; ``volume`` and ``reference`` go back into its result.

    Only the logic's own job folders are read (made private by ``mkdtemp``):
    a pickle runs code on loading, so it must never come from elsewhere.
    """
    path = Path(job_dir) / OUTCOME_FILE
    try:
        with open(path, "rb") as handle:
            outcome = pickle.load(handle)
    except FileNotFoundError:
        raise URSAMError("the worker ended without writing its result", path) from None
    except Exception as err:  # e.g. a worker Python whose numpy this one cannot read
        raise URSAMError(f"the worker's result cannot be read here ({type(err).__name__}: {err})", path) from None
    if outcome.result is not None:
        outcome.result.volume, outcome.result.reference = volume, reference
    return outcome


# -- the process -------------------------------------------------------------------------------------

class EventProgress(Progress):
    """The engine's Progress as JSON lines on the worker's event stream."""

    def __init__(self, emit):
        super().__init__(quiet=True)
        self._emit = emit
        self.callback = self._progress

    def _progress(self, stage, done, total):
        self._emit(event="progress", stage=stage, done=int(done), total=int(total or 0), message="")

    def info(self, message):
        self._emit(event="progress", stage=self._stage, done=0, total=0, message=str(message))

    def warn(self, message):
        self.warnings.append(str(message))
        self._emit(event="warning", message=str(message))


def _event_stream():
    """A line-buffered stream on the real stdout; stdout itself goes to stderr from now on.

    Packages may print to stdout (Python or C code); only events may reach the
    logic's event file, and a stray line must not split one.
    """
    sys.stdout.flush()
    events = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", newline="\n")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return events


def _parent_alive(pid):
    if os.name == "nt":
        import ctypes  # noqa: PLC0415 (Windows only)

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, int(pid))  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        try:
            code = ctypes.c_ulong()
            ok = kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
            return bool(ok) and code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watch_parent(pid, interval=0.5):
    """End this process when Slicer (``pid``) is gone: nobody would read the result, and it holds the CPU."""
    def watch():
        while _parent_alive(pid):
            time.sleep(interval)
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="ursam-parent-watch", daemon=True).start()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m URSAMMRML.worker",
                                     description="Run one URSAM job folder (written by the Slicer logic).")
    parser.add_argument("job_dir", help="the job folder: job.json and input.nrrd")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="end when this process (Slicer) ends")
    parser.add_argument("--serve", action="store_true",
                        help="keep the model and the scan, and answer correction requests read from stdin "
                             "(URSAMMRML.sessionworker)")
    args = parser.parse_args(argv)
    if args.parent_pid:
        _watch_parent(args.parent_pid)
    events = _event_stream()

    def emit(**event):
        events.write(json.dumps(event) + "\n")
        events.flush()

    t0 = time.perf_counter()
    try:
        progress = EventProgress(emit)
        job = read_job(args.job_dir)
        if args.serve:
            serve(args.job_dir, job, lambda options, percentile: makeBackend(options, progress, percentile), emit)
            return EXIT_DONE
        outcome = compute(job, progress)
        write_outcome(args.job_dir, outcome)
    except URSAMError as err:
        emit(event="error", kind="input", message=" ".join(str(err).split()))
        return EXIT_BAD_INPUT
    except Exception as err:
        traceback.print_exc()
        message = " ".join(f"{type(err).__name__}: {err}".split())
        emit(event="error", kind="internal", message=message)
        return EXIT_FAILED
    emit(event="done", seconds=round(time.perf_counter() - t0, 3))
    return EXIT_DONE


if __name__ == "__main__":
    # run the package's module, not this __main__ copy: the result's classes must pickle by their import name
    from URSAMMRML.worker import main as _main

    sys.exit(_main())
