"""``ursam batch``: every scan of a cohort through :func:`URSAMLib.scan.segment_scan`, one Dask task each.

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

from .. import __version__
from ..atomic import atomic_write_text
from ..errors import URSAMError
from ..progress import Progress
from .executor import one_line, worker_backend
from .scans import scan_digest
from .summary import rows_from_report, write_summaries


@dataclass
class ScanTask:
    """One scan's work as it travels to a worker."""
    id: str
    job: object  # URSAMLib.scan.ScanJob
    settings: object  # URSAMLib.settings.Settings
    backend: object  # URSAMLib.scan.BackendOptions
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
    from ..scan import segment_scan

    progress = Progress(quiet=True)
    progress.warn = progress.warnings.append  # the warnings go into report.json, not the worker's log
    try:
        segment_scan(task.job, task.settings, lambda percentile: worker_backend(task.backend, percentile), progress,
                     extra_report={"batch": {"id": task.id, "hash": task.digest}})
        report = json.loads((Path(task.job.out) / "report.json").read_text(encoding="utf-8"))
    except URSAMError as err:
        return {"status": "failed", "error": str(err)}
    except Exception as err:  # a library's error on one scan: recorded, the cohort goes on
        return {"status": "failed", "error": one_line(err)}
    return {"status": "done", "rows": rows_from_report(task.id, report, "done")}


def _calibration_json(job, library):
    """The calibration the scans will fuse with (path and SHA-256; None: none), read and checked here, so a
    bad file is one error before any scan and a new calibration of the library runs the scans again."""
    if not job.use_calibration:
        return None
    from ..calibration import CALIBRATION_FILE, Calibration

    path = Path(job.calibration) if job.calibration else Path(library.path) / CALIBRATION_FILE
    if not job.calibration and not path.is_file():
        return None
    calibration = Calibration.load(path)
    return {"path": str(path.absolute()), "sha256": calibration.sha256}


def settings_digest(common):
    return hashlib.sha256(json.dumps(common, sort_keys=True, default=str).encode()).hexdigest()


def _settings_json(settings):
    from ..evaluation.evaluate import SPEED_ONLY_PARAMS

    out = settings.to_json()
    out["params"] = {k: v for k, v in out["params"].items() if k not in SPEED_ONLY_PARAMS}
    return out


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
        from tqdm import tqdm

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


def run_batch(scans, out, executor, template_job, settings, backend, settings_for_boxes=None, overwrite=False,
              progress=None, source=None):
    """Segment ``scans`` (:class:`URSAMLib.batch.scans.Scan`) into ``out`` on ``executor``.

    ``executor``: a :class:`URSAMLib.batch.executor.Executor`, not yet
    started: it starts only where some scan has to run. ``template_job``: a
    :class:`URSAMLib.scan.ScanJob` with what every scan shares (template
    library, organs, modality, localizer options); each scan's image, labels,
    box file and folder fill it in. ``settings``: the
    run's :class:`URSAMLib.settings.Settings` with a template library;
    ``settings_for_boxes(boxes)``: a scan's settings from its own box file
    (whose prompts decide the default mode and margin). Returns a
    :class:`BatchResult`.
    """
    from ..boxes import load_boxes
    from ..scan import output_files
    from ..templates import Library

    progress = progress or Progress()
    out = Path(out).absolute()
    common = {"ursam_version": __version__, "backend": backend.to_json(),
              "modality": template_job.modality, "organs": template_job.organs,
              "localizer_options": {k: v for k, v in template_job.localizer_options.items() if k != "workers"}}
    if template_job.dicom_out:
        common["dicom_out"] = list(template_job.dicom_out)  # a rerun that adds DICOM objects runs the scans again
    if template_job.templates:
        lib = Library(template_job.templates)
        if template_job.organs:
            lib.resolve_organs(template_job.organs)
        common["templates"] = {"path": str(Path(template_job.templates).absolute()), "sha256": lib.digest()}
        common["settings"] = _settings_json(settings)
        common["calibration"] = _calibration_json(template_job, lib)
        with_boxes = [s.id for s in scans if s.boxes]
        if with_boxes:
            raise URSAMError(f"the manifest gives box files ({', '.join(with_boxes[:3])}) and --templates is "
                             "given: use one of them", source)
    else:
        without = [s.id for s in scans if not s.boxes]
        if without or settings_for_boxes is None:
            raise URSAMError(f"every scan needs boxes: give --templates LIB, or a manifest with a box file in the "
                             f"boxes column of each scan (none for {', '.join(without[:3])})", source)
        # The options as given; each scan's digest also holds the settings its own box file makes of them.
        common["settings"] = _settings_json(settings_for_boxes([]))
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
        job = replace(template_job, image=scan.image, out=str(out / scan.id), reference=scan.labels,
                      boxes=scan.boxes, overwrite=True)
        try:
            scan_settings = settings if template_job.templates else settings_for_boxes(load_boxes(scan.boxes))
            scan_common = common if template_job.templates else {**common, "settings": _settings_json(scan_settings)}
            digest = scan_digest(scan, scan_common)
        except URSAMError as err:
            failed[scan.id] = {"id": scan.id, "image": scan.image, "error": str(err)}
            continue
        report = finished_before(out / scan.id, output_files(job), digest)
        if report is not None:
            rows[scan.id] = rows_from_report(scan.id, report, "done before")
            result.done_before.append(scan.id)
        else:
            pending.append(ScanTask(scan.id, job, scan_settings, backend, digest))
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

