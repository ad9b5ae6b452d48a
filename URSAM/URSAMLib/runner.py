"""The one scan runner: every caller's scan goes through :func:`run_scan`.

``ursam segment``, each ``ursam batch`` task, ``ursam evaluate``, ``ursam
demo``, ``ursam bench``, the calibration's leave-one-out runs and the Slicer
worker describe their scan as a :class:`ScanJob` and call :func:`run_scan`,
which takes it through the method's steps, each its own module, data
flowing one way as named objects:

1. read (:func:`URSAMLib.imageio.read_scan` -> :class:`~URSAMLib.imageio.Scan`,
   with the normalization decided);
2. localize (the source's own: :func:`URSAMLib.localizers.localize_library`
   or :func:`URSAMLib.localizers.given_boxes` ->
   :class:`~URSAMLib.localization.Localization`: from the template library,
   or the boxes of a box file or ROIs), and the settings and the calibration
   this source gives;
3. the canonical orientation (:class:`~URSAMLib.orientation.CanonicalScan`);
4. warp the supports (:func:`URSAMLib.atlas_prior.warp_supports` ->
   :class:`~URSAMLib.atlas_prior.WarpedSupports`: the deformable stage and the
   atlas priors), where the run needs them;
5. prompts, SAM, fusion and rectification (:func:`URSAMLib.segment.segment`
   -> :class:`~URSAMLib.segment.Segmentation`);
6. the quality estimate of every organ (:func:`URSAMLib.quality.assess.assess_result`: predicted Dice, its
   interval, the review decision, the slices ranked by expected wrong voxels);
7. score against a reference and write the outputs
   (:func:`URSAMLib.outputs.write_results`).

"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

from .atlas_prior import LocalWeighting, WarpedSupports, warp_supports
from .boxes import OrganBox
from .calibration.file import Calibration, find_calibration
from .dicom.export import DicomExport
from .dicom.export import output_names as dicom_output_names
from .imageio import Scan, read_labels, read_scan
from .localization import Localization
from .localizers import BoxSource, LibrarySource
from .orientation import CanonicalScan
from .outputs import OUTPUT_FILES, check_output_dir, write_results
from .progress import STAGE_MODEL, STAGE_WRITE, Progress
from .quality.assess import assess_result
from .sam import BackendOptions
from .segment import Segmentation, segment
from .settings import Settings


@dataclass
class ScanJob:
    """One scan and everything a run of it depends on, besides the SAM model.

    ``image``: a path (NIfTI, NRRD, MHA, DICOM series folder) or a
    :class:`URSAMLib.imageio.Scan` in memory. ``settings``: may hold "auto"
    for the prompt mode and None for the margin, resolved for the source
    (:meth:`URSAMLib.settings.Settings.resolved`). ``calibration``: the
    fusion's calibration, a file or one already read (a file is read
    first, so that a bad one fails before any registration); None: the
    library's own
    (:func:`URSAMLib.calibration.file.find_calibration`), unless not
    ``use_calibration``. ``backend``: the SAM model, where the caller gives
    no model of its own.
    ``reference``: a label map to score every method against. ``out``: the
    output folder (None: nothing is written). ``baselines``: more boxes
    decoded once each beside the method's (the evaluation's manual prompts);
    ``joint_modes``: more prompt modes segmented in the same pipeline pass
    (the calibration's candidate modes); ``compare_modes``: more prompt modes
    each segmented on its own after the main run, uncalibrated (an
    evaluation's comparison); ``local``: the locally weighted votes of the
    atlas prior (default: the calibration's, else none).
    """
    image: Union[str, Path, Scan]
    source: Union[LibrarySource, BoxSource]
    settings: Settings = field(default_factory=Settings)
    calibration: Optional[Union[Calibration, str, Path]] = None
    use_calibration: bool = True
    backend: BackendOptions = field(default_factory=BackendOptions)
    #: auto, ct or other (URSAMLib.imageio.MODALITIES)
    modality: str = "auto"
    reference: Optional[str] = None
    out: Optional[str] = None
    overwrite: bool = False
    #: the user asked for the atlas prior (--atlas-prior on): warned where nothing is warped
    atlas_prior_asked: bool = False
    baselines: Dict[str, List[OrganBox]] = field(default_factory=dict)
    joint_modes: Tuple[str, ...] = ()
    compare_modes: Tuple[str, ...] = ()
    local: Optional[LocalWeighting] = None
    #: more keys for report.json
    extra_report: dict = field(default_factory=dict)
    #: an organ whose predicted Dice is below this is to be checked (None: the library's threshold per organ)
    review_threshold: Optional[float] = None
    #: no progress bar (warnings are still shown), where the caller gives no progress of its own
    quiet: bool = True
    #: the Series Instance UID to read where the input DICOM folder holds several series
    series: Optional[str] = None
    #: DICOM objects of the result (URSAMLib.dicom.export: "rtstruct", "seg") for a DICOM CT series input
    dicom_out: Tuple[str, ...] = ()
    #: SAM segments every organ, also those whose calibrated fusion gives it no weight (an evaluation that
    #: scores SAM's own masks); by default it does not, their result being the same without it
    sam_everywhere: bool = False
    #: "localize": the run ends with the organs localized (the Slicer panel's Localize; an evaluation of the
    #: atlas alone); "warp": with the supports warped too (``ursam localize``); None: every step
    stop_after: Optional[str] = None

    @property
    def from_library(self):
        return isinstance(self.source, LibrarySource)

    def output_files(self):
        """The files a run of this job writes into ``out``."""
        return OUTPUT_FILES + (("boxes.json",) if self.from_library else ()) + dicom_output_names(self.dicom_out)


@dataclass
class ScanOutcome:
    """What :func:`run_scan` gives back: every step's result (``segmentation`` None where a library source
    with ``missing="skip"`` localized no organ), the comparison modes' segmentations, and the Dice table
    against the job's reference."""
    scan: Scan
    settings: Settings
    localization: Localization
    canonical: CanonicalScan
    warped: Optional[WarpedSupports] = None
    segmentation: Optional[Segmentation] = None
    compared: Dict[str, Segmentation] = field(default_factory=dict)
    #: per-method, per-organ Dice against ``ScanJob.reference``
    dice_table: Optional[dict] = None
    #: seconds of the steps before SAM (read, localize, deformable, prior, model)
    timings: dict = field(default_factory=dict)

    @property
    def result(self):
        return self.segmentation.result if self.segmentation is not None else None


#: where a run may end early (ScanJob.stop_after)
STOPS = (None, "localize", "warp")
#: what a run asks of its caller for the SAM model: ``backend(percentile)`` gives it, loaded or kept
BackendProvider = Callable[[bool], object]


class ModelLoad:
    """The SAM model loaded in a background thread while the supports are registered (SimpleITK releases
    the GIL while it registers; loading the model reads and compiles its weights), so that a library run
    does not wait for it after the registrations. :meth:`get` returns it, or raises its loading error."""

    def __init__(self, options: BackendOptions, percentile: bool):
        self.model, self.error, self.seconds = None, None, None
        self._thread = threading.Thread(target=self._load, args=(options, percentile), daemon=True,
                                        name="ursam-model-load")
        self._thread.start()

    def _load(self, options, percentile):
        t0 = time.perf_counter()
        try:
            self.model = options.make(percentile)
        except BaseException as err:  # re-raised in the run's own thread by get()
            self.error = err
        self.seconds = time.perf_counter() - t0

    def get(self):
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.model


@contextmanager
def stage_clock(timings, stage):
    """``timings[stage + "_seconds"]`` and ``timings[stage + "_cpu_seconds"]``: the wall and CPU seconds (this
    process, every thread) of the block."""
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        timings[f"{stage}_seconds"] = time.perf_counter() - t0
        timings[f"{stage}_cpu_seconds"] = time.process_time() - c0


def run_scan(job: ScanJob, backend: Optional[BackendProvider] = None,
             progress: Optional[Progress] = None) -> ScanOutcome:
    """Run the method on one scan (the steps of this module's docstring): a :class:`ScanOutcome`.

    ``backend(percentile)`` returns the SAM backend (``percentile``: the scan
    is not CT in HU), loaded or kept by the caller; None: the job's
    ``backend`` is loaded. It is asked for once the organs are localized.
    Bad input raises URSAMError naming the file; nothing is written before
    the end, and then atomically.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    if job.stop_after not in STOPS:
        raise ValueError(f"unknown stop_after {job.stop_after!r}")
    progress = progress or Progress(quiet=job.quiet)
    # the calibration first: a bad file fails before any registration
    calibration = find_calibration(getattr(job.source, "library", None), job.calibration, progress,
                                   job.use_calibration and job.stop_after is None, job.settings.warps_labels())
    if job.out is not None:
        check_output_dir(job.out, job.overwrite)
    timings = {}
    scan = read_scan(job.image, job.modality, progress.warn, job.series)
    export = DicomExport.plan(scan, job.dicom_out)  # checked before any work
    timings["read_seconds"] = time.perf_counter() - started
    timings["read_cpu_seconds"] = time.process_time() - cpu_started
    # the model loads while a library's supports are registered (boxes from a file have nothing to wait on)
    loading = ModelLoad(job.backend, scan.percentile) if (
        backend is None and job.stop_after is None and job.from_library) else None

    with stage_clock(timings, "localize"):
        localization = job.source.localize(scan, job.settings, progress,
                                           calibration.per_organ if calibration is not None else None)
    settings = job.settings.resolved(localization)
    warps = settings.warps_labels(localization)
    calibration = calibration if warps else None
    canonical = CanonicalScan.of(scan.reference, scan.volume)
    outcome = ScanOutcome(scan, settings, localization, canonical, timings=timings)
    if not localization.boxes or job.stop_after == "localize":
        return outcome  # (no boxes: a library source that skips what it cannot localize)
    if job.atlas_prior_asked and not warps:
        progress.warn("the atlas prior in rectification needs the warped support labels (a template library "
                      "and the registration localizer); it is off for these boxes")

    local = job.local or (calibration.local if calibration is not None else None)
    if warps:
        with stage_clock(timings, "warp"):
            outcome.warped = warp_supports(localization, canonical.hu_image(), settings.deformable, local, progress)
        timings["deformable_seconds"] = outcome.warped.seconds
        timings["prior_seconds"] = outcome.warped.prior_seconds
    if job.stop_after == "warp":
        return outcome

    if backend is None:
        progress.stage(f"{STAGE_MODEL} {job.backend.name}")
    with stage_clock(timings, "model"):  # with a model loaded beside the registrations: what is left to wait
        sam = loading.get() if loading is not None else (backend or job.backend.make)(scan.percentile)
    if loading is not None:
        timings["model_load_seconds"] = loading.seconds
    inputs = {"image": scan.name, **job.source.describe(localization), "margin_z_xy": list(settings.margin),
              "normalization": "percentile" if scan.percentile else "ct-window"}
    boxes = [canonical.box_to_canonical(b) for b in localization.boxes]
    c0 = time.process_time()
    outcome.segmentation = segment(canonical, boxes, outcome.warped, sam, settings, calibration, progress,
                                   job.baselines, job.joint_modes, inputs, job.sam_everywhere)
    timings["segment_cpu_seconds"] = time.process_time() - c0
    for mode in job.compare_modes:
        outcome.compared[mode] = segment(canonical, boxes, outcome.warped, sam, settings.with_mode(mode), None,
                                         progress, None, (), inputs)
    result = outcome.result
    with stage_clock(timings, "quality"):
        result.quality = assess_result(result, calibration.quality if calibration is not None else None,
                                       job.review_threshold)
    result.timings.update(timings)
    result.warnings += [f"{name} was not localized ({why}); it was skipped"
                        for name, why in localization.info.get("skipped", {}).items()]
    report = dict(job.extra_report)
    if job.reference:
        outcome.dice_table = report["dice_vs_reference"] = result.dice_table(
            read_labels(job.reference, scan.reference, "reference label map")[1])
    result.timings["total_seconds"] = time.perf_counter() - started
    result.timings["total_cpu_seconds"] = time.process_time() - cpu_started
    if job.out is not None:
        progress.stage(STAGE_WRITE)
        boxes_info = {"localization": localization.info, "prompts": result.prompt_info} if job.from_library else None
        extra_files = export.writers(result) if export else {}
        if export:
            report["dicom_out"] = export.info()
        write_results(result, job.out, job.overwrite, boxes_info, report, started, extra_files, cpu_started)
    return outcome
