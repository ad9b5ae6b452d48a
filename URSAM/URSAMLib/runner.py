"""The one scan runner: every caller's scan goes through :func:`run_scan`.

``ursam segment``, each ``ursam batch`` task, ``ursam evaluate``, ``ursam
demo``, ``ursam bench``, the calibration's leave-one-out runs and the Slicer
worker describe their scan as a :class:`ScanJob` and call :func:`run_scan`,
which takes it through the method's steps, each its own module, data
flowing one way as named objects:

1. read (:func:`URSAMLib.imageio.read_scan` -> :class:`~URSAMLib.imageio.Scan`,
   with the normalization decided);
2. localize (:func:`URSAMLib.localizers.localize_source` ->
   :class:`~URSAMLib.localization.Localization`: from the template library,
   or the boxes of a box file or ROIs);
3. the canonical orientation (:class:`~URSAMLib.orientation.CanonicalScan`);
4. warp the supports (:func:`URSAMLib.atlas_prior.warp_supports` ->
   :class:`~URSAMLib.atlas_prior.WarpedSupports`: the deformable stage and the
   atlas priors), where the run needs them;
5. prompts, SAM, fusion and rectification (:func:`URSAMLib.segment.segment`
   -> :class:`~URSAMLib.segment.Segmentation`);
6. score against a reference and write the outputs
   (:func:`URSAMLib.outputs.write_results`).

A job's calibration comes resolved (:func:`URSAMLib.calibration.file.find_calibration`,
which its callers call before any registration, so that a bad file fails at
once).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple, Union

from .atlas_prior import LocalWeighting, WarpedSupports, warp_supports
from .boxes import OrganBox, save_boxes
from .imageio import Scan, read_labels, read_scan
from .localization import Localization
from .localizers import boxes_localization, localize_library
from .orientation import CanonicalScan
from .outputs import OUTPUT_FILES, check_output_dir, write_results
from .progress import STAGE_MODEL, Progress
from .segment import Segmentation, segment
from .settings import Settings

if TYPE_CHECKING:
    from .calibration.file import Calibration
    from .templates import Library


@dataclass
class LibrarySource:
    """Organs localized from a template library.

    ``organs``: names or label values (None: all of the library);
    ``localizer_options``: the localizer's own options beyond the settings
    (support workers, the MedLAM checkpoint); ``missing``: "error" (an organ
    no support labels fails the run) or "skip" (it is left out, and a scan
    where none is localized gives no segmentation); ``relabel``: library
    value -> the value the boxes get (an evaluation dataset numbers its
    organs its own way), ``keep``: only the organs of these new values.
    """
    library: Union[str, Path, Library]
    organs: Optional[Union[str, Sequence]] = None
    localizer_options: dict = field(default_factory=dict)
    missing: str = "error"
    relabel: Optional[Dict[int, int]] = None
    keep: Optional[set] = None


@dataclass
class BoxSource:
    """Organ boxes given: a box file (voxel indices of the image as stored), or boxes (ROIs). They keep their
    own prompts: nothing is warped."""
    boxes: Union[str, Path, List[OrganBox]]


@dataclass
class ScanJob:
    """One scan and everything a run of it depends on, besides the SAM model.

    ``image``: a path (NIfTI, NRRD, MHA, DICOM series folder) or a
    :class:`URSAMLib.imageio.Scan` in memory. ``settings``: may hold "auto"
    for the prompt mode and None for the margin, resolved for the source
    (:meth:`URSAMLib.settings.Settings.resolved`). ``calibration``: the
    library's calibration, resolved by the caller (None: uncalibrated).
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
    calibration: Optional[Calibration] = None
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
    #: "localize": the run ends with the organs localized (the Slicer panel's Localize; an evaluation of the
    #: atlas alone); "warp": with the supports warped too (``ursam localize``); None: every step
    stop_after: Optional[str] = None

    @property
    def from_library(self):
        return isinstance(self.source, LibrarySource)

    def output_files(self):
        """The files a run of this job writes into ``out``."""
        return OUTPUT_FILES + (("boxes.json",) if self.from_library else ())


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


def run_scan(job: ScanJob, backend: BackendProvider, progress: Optional[Progress] = None) -> ScanOutcome:
    """Run the method on one scan (the steps of this module's docstring): a :class:`ScanOutcome`.

    ``backend(percentile)`` returns the SAM backend (``percentile``: the scan
    is not CT in HU); it is asked for once the organs are localized. Bad
    input raises URSAMError naming the file; nothing is written before the
    end, and then atomically.
    """
    started = time.perf_counter()
    progress = progress or Progress()
    if job.stop_after not in STOPS:
        raise ValueError(f"unknown stop_after {job.stop_after!r}")
    timings = {}
    if job.out is not None:
        check_output_dir(job.out, job.overwrite)
    t0 = time.perf_counter()
    scan = read_scan(job.image, job.modality, progress.warn)
    timings["read_seconds"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if job.from_library:
        settings = job.settings.resolved()
        localization = localize_library(job.source, scan, settings, progress)
    else:
        localization = boxes_localization(job.source.boxes, scan, job.settings, progress)
        settings = job.settings.resolved(localization.boxes)
    timings["localize_seconds"] = time.perf_counter() - t0
    canonical = CanonicalScan.of(scan.reference, scan.volume)
    outcome = ScanOutcome(scan, settings, localization, canonical, timings=timings)
    if not localization.boxes or job.stop_after == "localize":
        return outcome  # (no boxes: a library source that skips what it cannot localize)

    warps = settings.warps_labels(localization)
    if job.atlas_prior_asked and not warps:
        progress.warn("the atlas prior in rectification needs the warped support labels (a template library "
                      "and the registration localizer); it is off for these boxes")
    calibration = job.calibration if warps else None
    local = job.local or (calibration.local if calibration is not None else None)
    if warps:
        outcome.warped = warp_supports(localization, canonical.reference, settings.deformable, local, progress,
                                       canonical.hu_image() if local is not None else None)
    timings["deformable_seconds"] = outcome.warped.seconds if outcome.warped is not None else 0.0
    timings["prior_seconds"] = outcome.warped.prior_seconds if outcome.warped is not None else 0.0
    if job.stop_after == "warp":
        return outcome

    t0 = time.perf_counter()
    progress.stage(f"{STAGE_MODEL}")
    sam = backend(scan.percentile)
    timings["model_seconds"] = time.perf_counter() - t0
    boxes = [canonical.box_to_canonical(b) for b in localization.boxes]
    inputs = _inputs(job, scan, settings, localization)
    outcome.segmentation = segment(canonical, boxes, outcome.warped, sam, settings, calibration, progress,
                                   job.baselines, job.joint_modes, inputs)
    for mode in job.compare_modes:
        mode_settings = settings.with_mode(mode)
        outcome.compared[mode] = segment(canonical, boxes, outcome.warped, sam, mode_settings, None, progress,
                                         None, (), inputs)
    result = outcome.result
    result.timings.update(timings)
    if job.from_library:
        result.warnings += [f"{name} was not localized ({why}); it was skipped"
                            for name, why in localization.info.get("skipped", {}).items()]
    if job.reference:
        truth = read_labels(job.reference, scan.reference, "reference label map")[1]
        outcome.dice_table = result.dice_table(truth)
    if job.out is not None:
        _write(job, outcome, progress, started)
    else:
        result.timings["total_seconds"] = time.perf_counter() - started
    return outcome


def _inputs(job, scan, settings, localization):
    """What report.json says of the run's inputs."""
    if job.from_library:
        library = job.source.library
        source = {"templates": str(Path(getattr(library, "path", library)).absolute())}
    elif isinstance(job.source.boxes, (str, Path)):
        source = {"boxes": str(Path(job.source.boxes).absolute())}
    else:
        source = {"boxes": [b.to_json() for b in localization.boxes]}
    image = str(Path(scan.source).absolute()) if isinstance(scan.source, str) else scan.name
    inputs = {"image": image, **source, "margin_z_xy": list(settings.margin),
              "normalization": "percentile" if scan.percentile else "ct-window"}
    if job.from_library:
        inputs["localization"] = localization.info
    return inputs


def _write(job, outcome, progress, started):
    result = outcome.result
    extra_files = {}
    if job.from_library:
        # Written after the run, so propagate's file holds the boxes it chose on each slice.
        extra_files["boxes.json"] = lambda path: save_boxes(result.boxes, path, extra={
            "localization": outcome.localization.info, "prompts": result.prompt_info})
    report = dict(job.extra_report)
    if outcome.dice_table:
        report["dice_vs_reference"] = outcome.dice_table
    write_results(result, job.out, job.overwrite, progress, extra_files=extra_files, extra_report=report or None,
                  started=started)
