"""One scan from files to files: what ``ursam segment`` does, and what each ``ursam batch`` task runs.

:func:`segment_scan` reads the scan, localizes its organs from a template
library (or reads its box file), runs :func:`URSAMLib.segment.segment_query`
and writes every output with :func:`URSAMLib.segment.write_results`. The
command line and the batch workers call it with the same :class:`ScanJob`
and settings, so a scan's outputs are the same whichever of them made them.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from .errors import URSAMError
from .progress import Progress
from .sam import DEFAULT_BACKEND, DEFAULT_DEVICE
from .settings import Settings


@dataclass(frozen=True)
class BackendOptions:
    """Which SAM model a run loads; hashable, so a worker keeps one model per set of options."""
    name: str = DEFAULT_BACKEND
    checkpoint: Optional[str] = None
    device: str = DEFAULT_DEVICE
    #: CT window (lo, hi) in HU; None: the backend's published window
    window: Optional[tuple] = None
    encoder: str = "auto"

    def make(self, percentile=False, progress=None):
        """Load the model (``percentile``: normalization for scans that are not CT in HU)."""
        from .progress import STAGE_MODEL
        from .sam.backends import make_backend

        if progress:
            progress.stage(f"{STAGE_MODEL} {self.name}")
        return make_backend(self.name, self.checkpoint, self.device,
                            window=tuple(self.window) if self.window else "default", percentile=percentile,
                            encoder=self.encoder)

    def to_json(self):
        out = asdict(self)
        out["window"] = list(self.window) if self.window else None
        return out


@dataclass
class ScanJob:
    """What ``ursam segment`` is asked to do with one scan (paths, and the options that are not
    :class:`URSAMLib.settings.Settings`)."""
    image: str
    out: str
    #: a template library to localize the organs from, or a box file (one of the two)
    templates: Optional[str] = None
    boxes: Optional[str] = None
    #: a reference label map: every method is scored against it (report.json ``dice_vs_reference``)
    reference: Optional[str] = None
    #: comma-separated organ names or values of the library (None: all)
    organs: Optional[str] = None
    #: auto, ct or other (:func:`percentile_for`)
    modality: str = "auto"
    #: --atlas-prior as asked (on, off, or None for the default): "on" without warped labels is warned
    atlas_prior: Optional[str] = None
    #: options of the localizer beyond the settings (support workers, the MedLAM checkpoint and device)
    localizer_options: dict = field(default_factory=dict)
    overwrite: bool = False
    #: the fusion's calibration file (None: the library's own calibration.json, if any)
    calibration: Optional[str] = None
    #: False: the uncalibrated result even where the library has a calibration (--no-calibration, --paper)
    use_calibration: bool = True
    #: the Series Instance UID to read where the input DICOM folder holds several series
    series: Optional[str] = None
    #: DICOM objects of the result (URSAMLib.dicom.export: "rtstruct", "seg") for a DICOM CT series input
    dicom_out: tuple = ()


@dataclass
class ScanOutcome:
    result: object  # URSAMLib.segment.SegmentationResult
    #: per-method, per-organ Dice against ``ScanJob.reference`` (None without one)
    dice_table: Optional[dict] = None


def percentile_for(modality, volume, image_path, progress):
    """Whether percentile normalization replaces CT windowing (``modality`` auto, ct or other); warns when
    ``auto`` decides so."""
    from .imageio import looks_like_ct

    if modality == "ct":
        return False
    if modality == "other":
        return True
    if looks_like_ct(volume):
        return False
    progress.warn(f"{image_path} does not look like a CT in HU (no air near -1000): CT windowing does not "
                  "apply, using 0.5-99.5 percentile normalization (set --modality ct to override)")
    return True


def localize_scan(image, templates, settings, organs=None, localizer_options=None, progress=None):
    """The :class:`URSAMLib.localization.Localization` of ``image`` from the library ``templates``."""
    from .localize import localize

    if settings.prompts.mode != "box3d" and settings.localizer != "registration":
        raise URSAMError(f"--prompts {settings.prompts.mode} needs --localizer registration "
                         "(the warped support labels)")
    localization = localize(image, templates, organs=organs, method=settings.localizer, progress=progress,
                            margin=settings.margin, **dict(localizer_options or {}))
    if not localization.boxes:
        raise URSAMError("no organ could be localized from the template library", templates)
    return localization


def segment_scan(job, settings, backend, progress=None, extra_report=None):
    """Every output of ``ursam segment`` for one scan, written atomically into ``job.out``.

    ``settings``: the run's :class:`URSAMLib.settings.Settings`; for a box
    file it may be a function of the file's boxes giving them (the file's own
    prompts decide the default mode and margin). ``backend(percentile)``
    returns the SAM backend, loaded or kept by the caller (``percentile``:
    the scan is not CT in HU). ``extra_report``: more keys for report.json.
    Returns a :class:`ScanOutcome`; bad input raises URSAMError naming the file.
    """
    from .boxes import load_boxes, save_boxes
    from .dicom.export import DicomExport
    from .evaluation.metrics import dice_table
    from .imageio import array_to_image, read_ct, read_labels
    from .localization import Localization
    from .orientation import Orientation
    from .outputs import check_output_dir
    from .segment import segment_query, write_results

    progress = progress or Progress()
    check_output_dir(job.out, job.overwrite)
    export = DicomExport.plan(job.image, job.dicom_out, job.series)
    t0 = time.perf_counter()
    reference, volume = read_ct(job.image, job.series)
    read_seconds = time.perf_counter() - t0
    size = reference.GetSize()
    t0 = time.perf_counter()
    calibration = None
    if job.templates:
        from .calibration import Calibration, find_calibration

        settings = settings if isinstance(settings, Settings) else settings(None)
        # A calibration file given is read before the registrations, so a bad one costs no minutes.
        given = Calibration.load(job.calibration) if job.calibration and job.use_calibration else None
        # The localizer reads a path itself; a series chosen from a folder of several goes as the image read.
        image = job.image if job.series is None else array_to_image(volume, reference)
        localization = localize_scan(image, job.templates, settings, job.organs, job.localizer_options, progress)
        if job.use_calibration and settings.warps_labels(localization):
            calibration = given or find_calibration(localization.library, None, progress)
    else:
        if job.calibration:
            raise URSAMError("--calibration goes with --templates (the fusion needs the warped support labels)")
        if job.organs:
            raise URSAMError("--organs goes with --templates; with --boxes, edit the box file")
        boxes = load_boxes(job.boxes, size, warn=progress.warn)
        settings = settings if isinstance(settings, Settings) else settings(boxes)
        if settings.margin != (0, 0.0):
            orientation = Orientation.of(reference)  # the margin is on the slices SAM sees
            boxes = [orientation.add_margin(b, settings.margin[0], settings.margin[1]) for b in boxes]
        localization = Localization.from_boxes(boxes, Path(job.boxes).absolute())
    localize_seconds = time.perf_counter() - t0
    if job.atlas_prior == "on" and not settings.warps_labels(localization):
        progress.warn("the atlas prior in rectification needs the warped support labels (a template library "
                      "and the registration localizer); it is off for these boxes")
    truth = read_labels(job.reference, reference, "reference label map")[1] if job.reference else None
    percentile = percentile_for(job.modality, volume, job.image, progress)
    sam = backend(percentile)
    source = {"templates": str(Path(job.templates).absolute())} if job.templates else \
        {"boxes": str(Path(job.boxes).absolute())}
    inputs = {"image": str(Path(job.image).absolute()), **source,
              "margin_z_xy": list(settings.margin), "normalization": "percentile" if percentile else "ct-window"}
    if job.templates:
        inputs["localization"] = localization.info
    result = segment_query(volume, reference, localization, sam, settings, progress=progress, inputs=inputs,
                           calibration=calibration)
    result.timings["read_seconds"] = read_seconds
    result.timings["localize_seconds"] = localize_seconds
    extra_files = {}
    if job.templates:
        # Written after the run, so propagate's file holds the boxes it chose on each slice.
        extra_files["boxes.json"] = lambda path: save_boxes(result.boxes, path, extra={
            "localization": localization.info, "prompts": result.prompt_info})
        result.warnings += [f"{name} was not localized ({why}); it was skipped"
                            for name, why in localization.info.get("skipped", {}).items()]
    table = dice_table(result, truth) if truth is not None else None
    report = dict(extra_report or {})
    if export:
        extra_files.update(export.writers(result))
        report["dicom_out"] = export.info()
    if table:
        report["dice_vs_reference"] = table
    write_results(result, job.out, job.overwrite, progress, extra_files=extra_files, extra_report=report or None)
    return ScanOutcome(result, table)


def output_files(job):
    """The files :func:`segment_scan` writes into ``job.out``."""
    from .dicom.export import output_names
    from .segment import OUTPUT_FILES

    return OUTPUT_FILES + (("boxes.json",) if job.templates else ()) + output_names(job.dicom_out)
