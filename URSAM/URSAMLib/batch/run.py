"""``ursam batch``: every scan of a cohort through :func:`URSAMLib.runner.run_scan`, one Dask task each.

Per scan, ``DIR/<id>/`` receives what ``ursam segment`` writes (atomically,
as a folder), and its report.json records in ``batch.hash`` a digest of the
scan's input files and the run's settings: a rerun skips the scans whose
outputs are complete under the same digest, and runs the others (the failed,
the new, those whose inputs or settings changed). A scan that fails is
recorded with its one-line error and the others go on. ``summary.csv``,
``failed.csv`` and ``summary.md`` are rewritten (atomically) as scans finish.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from .. import __version__
from ..atomic import atomic_write_text
from ..boxes import load_boxes
from ..calibration.file import find_calibration
from ..errors import URSAMError
from ..localization import NO_MARGIN, Localization
from ..localizers import BoxSource
from ..progress import Progress
from ..runner import ScanJob, run_scan
from ..templates import Library
from .executor import one_line, worker_backend
from .scans import scan_digest
from .summary import rows_from_report, write_summaries


@dataclass
class ScanTask:
    """One scan's work as it travels to a worker."""
    id: str
    job: ScanJob
    digest: str


@dataclass
class BatchResult:
    scans: int
    done_before: list = field(default_factory=list)
    ran: list = field(default_factory=list)
    failed: dict = field(default_factory=dict)  # id -> one-line error

    @property
    def exit_code(self):
        return 1 if self.failed else 0


def segment_task(task):
    """On a worker: one scan's outputs; returns ``{"status", "rows" | "error"}`` (never raises for the scan's
    own problems, so that one bad scan is a record and not an error of the cohort)."""
    progress = Progress(quiet=True)
    progress.warn = progress.warnings.append  # the warnings go into report.json, not the worker's log
    job = replace(task.job, extra_report={"batch": {"id": task.id, "hash": task.digest}})
    try:
        run_scan(job, lambda percentile: worker_backend(job.backend, percentile), progress)
        report = json.loads((Path(task.job.out) / "report.json").read_text(encoding="utf-8"))
    except URSAMError as err:
        return {"status": "failed", "error": str(err)}
    except Exception as err:  # a library's error on one scan: recorded, the cohort goes on
        return {"status": "failed", "error": one_line(err)}
    return {"status": "done", "rows": rows_from_report(task.id, report, "done")}


def _calibration_json(calibration):
    """What the digest holds of the calibration the scans fuse with: a new calibration of the library runs
    the scans again."""
    return None if calibration is None else {"path": calibration.path, "sha256": calibration.sha256}


def settings_digest(common):
    return hashlib.sha256(json.dumps(common, sort_keys=True, default=str).encode()).hexdigest()


def finished_before(folder, files, digest):
    """The report.json of ``folder`` where it holds every output file of a run with this digest, else None."""
    report_path = folder / "report.json"
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if report.get("batch", {}).get("hash") != digest or not all((folder / f).is_file() for f in files):
        return None
    return report


def _check_out(out, config, overwrite):
    if out.exists() and not out.is_dir():
        raise URSAMError("output path exists and is not a folder", out)
    path = out / "batch.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            old = {}
        if old.get("settings_hash") != config["settings_hash"] and not overwrite:
            raise URSAMError("output folder holds a batch run with other settings (use --overwrite to run every "
                             "scan again with these, or another folder)", path)
    elif out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith(".")) and not overwrite:
        raise URSAMError("output folder is not empty and holds no batch run (use --overwrite to write into it)", out)


def _run(pending, executor, rows, failed, result, write, progress, total):
    progress.info(f"running on {executor.describe()}")
    bar = None
    if not progress.quiet:
        bar = tqdm(total=total, initial=total - len(pending), desc="scans", unit="scan", file=sys.stderr,
                   dynamic_ncols=True)
    futures = {}
    for i, task in enumerate(pending):
        futures[executor.submit(segment_task, task, key=f"ursam-segment-{i}-{task.digest[:12]}")] = task
    last = 0.0
    try:
        for future, outcome, error in executor.completed(list(futures)):
            task = futures[future]
            if error is None and outcome["status"] == "done":
                rows[task.id] = outcome["rows"]
                failed.pop(task.id, None)
                result.ran.append(task.id)
            else:
                message = error or outcome["error"]
                failed[task.id] = {"id": task.id, "image": task.job.image, "error": message}
                if bar is not None:
                    bar.write(f"[ursam] {task.id} failed: {message}", file=sys.stderr)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(failed=len(failed))
            if time.monotonic() - last > 1.0:  # the finally clause writes the last state
                write()
                last = time.monotonic()
    finally:
        write()
        if bar is not None:
            bar.close()


def run_batch(scans, out, executor, template_job, overwrite=False, progress=None, source=None):
    """Segment ``scans`` (:class:`URSAMLib.batch.scans.Scan`) into ``out`` on ``executor``.

    ``executor``: a :class:`URSAMLib.batch.executor.Executor`, not yet
    started: it starts only where some scan has to run. ``template_job``: a
    :class:`URSAMLib.runner.ScanJob` with what every scan shares (the
    source: a template library, or boxes that each scan's own box file
    replaces; the settings; the calibration; the modality; the SAM model,
    which each worker loads once); each scan's image, labels, box file and
    folder fill it in. The calibration is read here, once: a bad file is one
    error before any scan. Returns a :class:`BatchResult`.
    """
    progress = progress or Progress()
    out = Path(out).absolute()
    settings = template_job.settings
    backend = template_job.backend
    from_library = template_job.from_library
    common = {"ursam_version": __version__, "backend": backend.to_json(), "modality": template_job.modality}
    if template_job.dicom_out:
        common["dicom_out"] = list(template_job.dicom_out)  # a rerun that adds DICOM objects runs the scans again
    if from_library:
        lib_source = template_job.source
        lib = lib_source.library if isinstance(lib_source.library, Library) else Library(lib_source.library)
        calibration = find_calibration(lib, template_job.calibration, progress, template_job.use_calibration,
                                       settings.warps_labels())
        template_job = replace(template_job, calibration=calibration, use_calibration=calibration is not None)
        if lib_source.organs:
            lib.resolve_organs(lib_source.organs)
        common["organs"] = lib_source.organs
        common["localizer_options"] = {k: v for k, v in lib_source.localizer_options.items() if k != "workers"}
        common["templates"] = {"path": str(Path(lib.path).absolute()), "sha256": lib.digest()}
        common["settings"] = settings.resolved().result_json()
        common["calibration"] = _calibration_json(calibration)
        with_boxes = [s.id for s in scans if s.boxes]
        if with_boxes:
            raise URSAMError(f"the manifest gives box files ({', '.join(with_boxes[:3])}) and --templates is "
                             "given: use one of them", source)
    else:
        without = [s.id for s in scans if not s.boxes]
        if without:
            raise URSAMError(f"every scan needs boxes: give --templates LIB, or a manifest with a box file in the "
                             f"boxes column of each scan (none for {', '.join(without[:3])})", source)
        # The options as given; each scan's digest also holds the settings its own box file makes of them.
        common["settings"] = settings.result_json()
    if backend.checkpoint:
        ckpt = Path(backend.checkpoint)
        common["checkpoint"] = {"path": str(ckpt.absolute()), "bytes": ckpt.stat().st_size if ckpt.is_file() else None}
    config = {"ursam_version": __version__, "input": str(source) if source else None, "common": common,
              "settings_hash": settings_digest(common)}
    _check_out(out, config, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "batch.json", json.dumps(config, indent=1, default=str))

    result = BatchResult(len(scans))
    rows, failed, pending = {}, {}, []
    for scan in scans:
        job = replace(template_job, image=scan.image, out=str(out / scan.id), reference=scan.labels, overwrite=True,
                      source=template_job.source if from_library else BoxSource(scan.boxes))
        try:
            scan_common = common if from_library else {
                **common, "settings": settings.resolved(Localization.from_boxes(
                    load_boxes(scan.boxes), margin=settings.margin or NO_MARGIN)).result_json()}
            digest = scan_digest(scan, scan_common)
        except URSAMError as err:
            failed[scan.id] = {"id": scan.id, "image": scan.image, "error": str(err)}
            continue
        report = finished_before(out / scan.id, job.output_files(), digest)
        if report is not None:
            rows[scan.id] = rows_from_report(scan.id, report, "done before")
            result.done_before.append(scan.id)
        else:
            pending.append(ScanTask(scan.id, job, digest))
    order = [s.id for s in scans]
    header = {"input": str(source) if source else "", "backend": backend.name, "settings_hash": config["settings_hash"]}

    def write():
        write_summaries(out, order, rows, failed, header)

    write()
    progress.info(f"{len(scans)} scans: {len(result.done_before)} finished before, {len(pending)} to run"
                  + (f", {len(failed)} failed before they could start" if failed else ""))
    if pending:
        with executor:
            _run(pending, executor, rows, failed, result, write, progress, len(scans))
    result.failed = {k: v["error"] for k, v in failed.items()}
    return result

