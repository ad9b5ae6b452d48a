"""The headless URSAM logic: Slicer nodes in, URSAMLib runs, Slicer nodes out. No Qt.

Every run has three steps:

1. ``prepare*`` (main thread): check the input nodes and copy what the engine
   needs (voxels, geometry, boxes from ROIs) into a job;
2. compute: the engine runs the job (:func:`URSAMMRML.worker.compute`),
   either in a worker process (:meth:`URSAMProcessLogic.startJob`, what the
   panel does: Slicer stays responsive and Cancel ends the process at once)
   or in this process (``compute*``, for scripts and tests); it reads and
   writes no node;
3. ``apply*`` (main thread): write the result into output nodes.

``process(...)`` does the three in a row. A cancelled or failed run raises
before step 3, so the scene is left exactly as it was.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace

import numpy as np
import SimpleITK as sitk

from URSAMLib import terminology
from URSAMLib.errors import Cancelled, URSAMError
from URSAMLib.localization import Localization
from URSAMLib.outputs import organ_voxels
from URSAMLib.progress import STAGE_RECTIFY, STAGE_WRITE, Progress
from URSAMLib.result import SegmentationResult
from URSAMLib.templates import Library, open_or_create

from . import display, jobs, outputs, review, segmentations, worker
from .correction import Corrector
from .geometry import VolumeSnapshot, boxFromRoi, ijkToFrameOf, ijkToRas, placeRoi, snapshotVolume
from .geometry import worldToLocal as geometryWorldToLocal
from .options import RunOptions

#: the RunOptions that Rectify may change (the others need a new SAM run)
RECTIFY_FIELDS = ("thresholdScope", "lowerBound", "alphaH", "fixedThreshold", "minComponentVoxels", "atlasPrior",
                  "atlasAdd", "atlasKeep")


@dataclass
class SegmentJob:
    """Everything a segmentation run needs, copied from the scene (prepare step)."""
    snapshot: VolumeSnapshot
    options: RunOptions
    boxes: list = None  # OrganBox from ROIs; None: localize from ``library``
    library: str = None
    organs: list = None
    warnings: list = field(default_factory=list)
    task = "segment"


@dataclass
class SegmentComputed:
    """A finished computation, not yet in the scene (the compute step's result)."""
    job: SegmentJob
    result: SegmentationResult
    localized: list = None  # boxes from the localizer, when it ran
    localizeInfo: dict = None
    maps: dict = field(default_factory=dict)
    components: list = field(default_factory=list)
    statistics: list = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class LocalizeJob:
    snapshot: VolumeSnapshot
    library: str
    organs: list
    options: RunOptions
    warnings: list = field(default_factory=list)
    boxes = None
    task = "localize"


def workerJob(job):
    """The :class:`URSAMMRML.worker.Job` of a prepared job (its voxels are the snapshot's, not a copy)."""
    snapshot = job.snapshot
    return worker.Job(job.task, snapshot.name, snapshot.array, snapshot.image(), job.options, job.boxes,
                      job.library, job.organs)


class CollectingProgress(Progress):
    """URSAMLib's Progress that keeps warnings instead of printing them.

    The warnings reach the user with the results (the engine also puts its
    own into the result); nothing is written to Slicer's Python console.
    """

    def __init__(self, callback=None, cancel=None):
        super().__init__(callback=callback, cancel=cancel, quiet=True)

    def warn(self, message):
        self.warnings.append(str(message))

    def info(self, message):
        pass


def _progress(progress, cancel):
    if isinstance(progress, Progress):
        if cancel is not None:
            progress.cancel = cancel
        return progress
    return CollectingProgress(callback=progress, cancel=cancel)


def _organNames(organs):
    if organs is None:
        return None
    if isinstance(organs, str):
        organs = [o.strip() for o in organs.split(",") if o.strip()]
    return [str(o) for o in organs]


class BackgroundRun:
    """A Localize or Segment run in a worker process, for the panel: :meth:`poll` it from a timer.

    The job was prepared on the main thread; the worker computes it; once it
    has ended, :meth:`poll` (main thread) loads the result into the scene.
    :meth:`cancel` kills the worker and removes the job folder: nothing was
    written to the scene, so it is as it was. Every way a run ends removes
    its job folder.

    After it ended: ``state`` is "done", "failed" or "cancelled"; ``outputs``
    (Segment: :class:`URSAMMRML.outputs.Outputs`), ``rois`` (the ROI nodes
    written), ``error`` (an exception with the one-line message), ``notes``.
    """

    def __init__(self, logic, job, jobDir, process):
        self.logic = logic
        self.job = job
        self.jobDir = jobDir
        self.process = process
        self.state = "ready"
        self.progress = ("starting", 0, 0)
        self.warnings = []
        self.outputs = None
        self.rois = []
        self.computed = None
        self.error = None
        self.startedAt = None
        self.seconds = None

    @property
    def name(self):
        return "Localize" if self.job.task == "localize" else "Segment"

    @property
    def done(self):
        return self.state in ("done", "failed", "cancelled")

    def start(self):
        self.startedAt = time.perf_counter()
        try:
            self.process.start()
        except Exception as err:
            self._end("failed", err)
            raise
        self.state = "running"
        return self

    def poll(self):
        """New events of the worker (dicts); loads the result into the scene once the worker has ended.

        It never raises: a failure ends the run with ``state`` "failed" and its ``error``.

        The poll that sees the worker end well returns a last progress event,
        "writing results", and the next one writes them: a panel can show that
        step before the main thread is busy with it.
        """
        if self.state == "writing":
            self._finish()
            return []
        if self.state != "running":
            return []
        try:
            events = self.process.poll()
        except OSError as err:  # the job folder went away under the worker (a full or cleaned disk)
            self._end("failed", URSAMError(f"the URSAM worker's events cannot be read ({err})"))
            return []
        for event in events:
            kind = event.get("event")
            if kind == "progress":
                self.progress = (event.get("stage") or "", int(event.get("done", 0)), int(event.get("total", 0)))
            elif kind == "warning":
                self.warnings.append(event.get("message", ""))
        if self.process.returncode is not None:
            message = self.process.error()
            if message is not None:
                self._end("failed", URSAMError(message))
            else:
                self.state = "writing"
                self.progress = (STAGE_WRITE, 0, 0)
                events.append({"event": "progress", "stage": STAGE_WRITE, "done": 0, "total": 0, "message": ""})
        return events

    def _finish(self):
        try:
            snapshot = self.job.snapshot
            outcome = worker.read_outcome(self.jobDir, snapshot.array, snapshot.reference())
            if self.job.task == "localize":
                self.rois = self.logic.applyLocalization(self.job, outcome.localized)
            else:
                self.computed = self.logic._computed(self.job, outcome)
                self.outputs = self.logic.applySegmentation(self.computed)
                self.rois = self.outputs.rois
        except Exception as err:
            self._end("failed", err)
            return
        self._end("done")

    def cancel(self):
        """Kill the worker now; the scene stays as it was (nothing is written before the worker ends)."""
        if self.done:
            return
        self.process.kill()
        self._end("cancelled", Cancelled("cancelled by the user"))

    def _end(self, state, error=None):
        if self.process.running:
            self.process.kill()
        self.state, self.error = state, error
        self.seconds = None if self.startedAt is None else time.perf_counter() - self.startedAt
        jobs.removeJobDir(self.jobDir)

    @property
    def notes(self):
        return self.outputs.notes if self.outputs is not None else list(self.job.warnings) + self.warnings

    def wait(self, progress=None, cancel=None, timeout=None, interval=0.05):
        """Poll until the run has ended (a script's synchronous run); raises its error.

        ``progress(stage, done, total)`` gets the worker's progress events in
        order; ``cancel() -> bool`` is asked between polls.
        """
        t0 = time.perf_counter()
        while not self.done:
            for event in self.poll():
                if event.get("event") == "progress" and progress is not None:
                    progress(event.get("stage") or "", int(event.get("done", 0)), int(event.get("total", 0)))
            if self.done:
                break
            if cancel is not None and cancel():
                self.cancel()
                break
            if timeout is not None and time.perf_counter() - t0 > timeout:
                self.cancel()
                self.error = URSAMError(f"the URSAM worker did not finish within {timeout:g} s; it was stopped")
                break
            time.sleep(interval)
        if self.error is not None:
            raise self.error
        return self.outputs if self.job.task == "segment" else self.rois


class URSAMProcessLogic:
    """Headless UR-SAM for Slicer scenes; the module's URSAMLogic is this plus Slicer's conveniences.

    ``appLogic`` (Slicer's application logic) gives the Colors module for the
    uncertainty legend; it may be None.
    """

    def __init__(self, appLogic=None, python=None, env=None, tempRoot=None):
        self.appLogic = appLogic
        #: the worker process's interpreter and environment, and where its job folders are made
        self.python = python or sys.executable
        self.env = env
        self.tempRoot = tempRoot
        self._backends = {}
        self._backendLock = threading.Lock()
        #: input volume node ID -> the last SegmentComputed, for Rectify without SAM
        self._cache = {}
        #: (input volume node ID, organ) -> the place in its ranked slices that "next slice" last went to
        self._sliceCursor = {}
        #: SAM-assisted correction: its session worker and each volume's undo stack (URSAMMRML.correction)
        self.correction = Corrector(self.python, env, tempRoot)

    # -- model --------------------------------------------------------------------------------
    def backend(self, options, progress=None, percentile=False):
        """The SAM backend for these options (and normalization), loaded once and kept (loading costs
        seconds)."""
        key = options.backendKey() + (bool(percentile),)
        with self._backendLock:
            if key not in self._backends:
                self._backends = {key: worker.makeBackend(options, progress, percentile)}
            return self._backends[key]

    # -- the worker process ---------------------------------------------------------------------
    def startJob(self, job, python=None, env=None, tempRoot=None, start=True):
        """Run a prepared job (Localize or Segment) in a worker process: a :class:`BackgroundRun`.

        ``python``: the interpreter that runs ``URSAMMRML.worker`` (default:
        :attr:`python`; in Slicer, PythonSlicer). ``tempRoot``: where the job
        folder is made (default: the system's temporary folder). ``start=False``
        writes the job folder without starting the worker (call ``run.start()``).
        """
        jobDir = jobs.newJobDir(tempRoot or self.tempRoot)
        try:
            worker.write_job(jobDir, workerJob(job))
        except Exception:
            jobs.removeJobDir(jobDir)
            raise
        process = jobs.WorkerProcess(jobDir, python or self.python, env if env is not None else self.env)
        run = BackgroundRun(self, job, jobDir, process)
        return run.start() if start else run

    def _computed(self, job, outcome):
        """A :class:`SegmentComputed` of a worker's (or this process's) outcome."""
        computed = SegmentComputed(job, outcome.result, localized=outcome.localized,
                                   localizeInfo=outcome.localizeInfo, seconds=outcome.seconds)
        # the engine's own warnings (progress.warn) are in the result already; the job's come first
        computed.result.warnings[:0] = job.warnings
        self._derive(computed)
        return computed

    # -- localize -------------------------------------------------------------------------------
    def prepareLocalization(self, inputVolume, library, organs=None, options=None):
        options = (options or RunOptions()).check()
        if not library:
            raise URSAMError("no template library folder is selected")
        self._library(library)  # fail early, on the main thread, with the library's own message
        return LocalizeJob(snapshotVolume(inputVolume), str(library), _organNames(organs), options)

    def computeLocalization(self, job, progress=None, cancel=None):
        """The :class:`URSAMLib.localization.Localization` of the job's volume from its library (in this
        process)."""
        progress = _progress(progress, cancel)
        outcome = worker.compute(workerJob(job), progress, library=self._library(job.library))
        return Localization(outcome.localized, outcome.localizeInfo)

    def applyLocalization(self, job, boxes, created=None):
        """One ROI per organ, named after it, in the input's output folder; returns the ROI nodes.

        New nodes are appended to ``created`` (if given) so that a caller can undo them.
        """
        inputVolume = self._liveInput(job.snapshot)
        scene = inputVolume.GetScene()
        created = [] if created is None else created
        rois = []
        try:
            folder = outputs.outputFolder(scene, inputVolume)
            for box in boxes:
                roi = outputs.obtainRoi(scene, inputVolume, box.name, box.label, folder, created)
                placeRoi(roi, box, job.snapshot.ijkToRas)
                if roi.GetDisplayNode() is None:
                    roi.CreateDefaultDisplayNodes()
                roi.GetDisplayNode().SetSelectedColor(*terminology.lookup(box.name, box.label)[1])
                roi.GetDisplayNode().SetHandlesInteractive(True)  # move and resize with the mouse
                rois.append(roi)
        except Exception:
            outputs.removeNodes(scene, created)
            raise
        return rois

    def localize(self, inputVolume, library, organs=None, options=None, progress=None, cancel=None, python=None):
        """Localize organs from the template library: one editable ROI per organ (synchronous).

        ``python``: run it in a worker process with this interpreter (default: in this process).
        """
        job = self.prepareLocalization(inputVolume, library, organs, options)
        if python:
            return self.startJob(job, python).wait(progress, cancel)
        return self.applyLocalization(job, self.computeLocalization(job, progress, cancel).boxes)

    # -- segment --------------------------------------------------------------------------------
    def prepareSegmentation(self, inputVolume, library=None, rois=None, organs=None, options=None, **overrides):
        """Check the inputs and copy them into a :class:`SegmentJob` (main thread).

        ``rois``: ROI nodes, one per organ, named after it; used as they stand,
        as box3d prompts (:func:`roiPromptNote`). Without ROIs, ``library`` (a
        template library folder) localizes the organs.
        """
        options = replace(options or RunOptions(), **overrides).check()
        snapshot = snapshotVolume(inputVolume)
        names = _organNames(organs)
        job = SegmentJob(snapshot, options, library=str(library) if library else None, organs=names)
        if rois:
            job.boxes = self._boxesFromRois(rois, snapshot, library, names, job.warnings)
            note = roiPromptNote(options, True)
            if note:
                job.warnings.append(note)
        elif not library:
            raise URSAMError("give organ ROIs or a template library to localize the organs")
        else:
            self._library(library)
        return job

    def computeSegmentation(self, job, progress=None, cancel=None, backend=None):
        """Run URSAMLib on a prepared job in this process (no scene access), as the worker does."""
        progress = _progress(progress, cancel)
        outcome = worker.compute(workerJob(job), progress, backend=backend, loadBackend=self.backend,
                                 library=self._library(job.library) if job.boxes is None else None)
        return self._computed(job, outcome)

    def _derive(self, computed):
        """Label maps, flagged components and statistics from the engine's result (no SAM)."""
        result = computed.result
        maps = result.output_maps()
        organs, ensemble, rectified = maps.organs, maps.ensemble, maps.rectified
        uncertainty, uncLabels = maps.uncertainty, maps.flagged
        computed.maps = {"ensemble": ensemble, "rectified": rectified, "uncertainty": uncertainty,
                         "flagged": uncLabels, "organs": organs}
        computed.components = review.flagged_components(uncLabels, uncertainty, organs, result.voxel_ml,
                                                        int(computed.job.options.minComponentVoxels),
                                                        error_probability=result.error_map(),
                                                        segmented=organ_voxels(rectified, organs))
        computed.statistics = review.organ_statistics(result, rectified, ensemble, uncLabels, computed.components)
        mode = promptMode(result)
        for row in computed.statistics:
            row["prompts"] = mode

    def applySegmentation(self, computed, progress=None, roles=None):
        """Write a computation into the output nodes of its input (main thread)."""
        progress = _progress(progress, None)
        progress.stage(STAGE_WRITE)
        snapshot = computed.job.snapshot
        inputVolume = self._liveInput(snapshot)
        scene = inputVolume.GetScene()
        roles = roles or ("ensemble", "rectified", "uncertainty", "flagged", "review", "statistics")
        result = outputs.Outputs()
        created = []
        sh = scene.GetSubjectHierarchyNode()
        folderExisted = bool(outputs.outputFolder(scene, inputVolume, create=False))
        try:
            result.folderItemID = outputs.outputFolder(scene, inputVolume)
            if computed.localized is not None:
                result.rois = self.applyLocalization(
                    LocalizeJob(snapshot, computed.job.library, computed.job.organs, computed.job.options),
                    computed.localized, created)
            maps = computed.maps
            localToWorld = np.linalg.inv(snapshot.worldToLocal) @ snapshot.ijkToRas
            for role in roles:
                node = outputs.obtainOutput(scene, inputVolume, role, result.folderItemID, created, result.notes)
                result.nodes[role] = node
                if role in ("ensemble", "rectified", "flagged"):
                    segmentations.setSegmentsFromLabelmap(node, maps[role], maps["organs"], snapshot.ijkToRas,
                                                          inputVolume)
                    outputs.markWritten(node)
                elif role == "uncertainty":
                    display.setScalarVolume(node, maps["uncertainty"], snapshot.ijkToRas)
                elif role == "review":
                    review.fillReviewTable(node, computed.components, localToWorld)
                elif role == "statistics":
                    review.fillStatisticsTable(node, computed.statistics)
            self._styleOutputs(scene, inputVolume, result)
        except Exception:
            outputs.removeNodes(scene, created)
            if not folderExisted and result.folderItemID:
                sh.RemoveItem(result.folderItemID)
            raise
        result.notes.extend(w for w in computed.result.warnings if w not in result.notes)
        if "rectified" in roles:
            self.correction.forget(snapshot.nodeID)  # its undo records are of the segments just replaced
        self._cache[snapshot.nodeID] = computed
        progress.done()
        return result

    def _styleOutputs(self, scene, inputVolume, result):
        nodes = result.nodes
        if "uncertainty" in nodes:
            display.showUncertainty(scene, nodes["uncertainty"], inputVolume, self.appLogic)
        if "rectified" in nodes:
            display.showSegmentation(nodes["rectified"], visible=True)
        if "ensemble" in nodes:
            display.showSegmentation(nodes["ensemble"], visible=False)
        if "flagged" in nodes:
            display.showSegmentation(nodes["flagged"], visible=True, outlineOnly=True)

    def process(self, inputVolume, library=None, rois=None, organs=None, options=None, progress=None,
                cancel=None, backend=None, python=None, **overrides):
        """Segment the organs of ``inputVolume`` with UR-SAM and write the output nodes (synchronous).

        - ``rois``: ROI nodes named after the organs (used as they stand), or
        - ``library``: a template library folder; the organs are localized first
          and their ROIs written too.
        - ``organs``: organ names to keep (None: every ROI / every library organ).
        - ``options``: :class:`RunOptions`; keyword ``overrides`` set single fields
          (``nAug=5``, ``backend="sam-vit-b"``, ``checkpoint=...``).
        - ``progress(stage, i, n)`` and ``cancel() -> bool`` callbacks; a cancel
          raises ``URSAMLib.errors.Cancelled`` and leaves the scene unchanged.
        - ``backend``: a model name (``"litemedsam"``, ``"sam-vit-b"``, ...; same as
          ``options.backend``) or an already built URSAMLib backend object.
        - ``python``: run the engine in a worker process with this interpreter
          (as the panel does); default: in this process, with the model kept
          between runs.

        Returns :class:`URSAMMRML.outputs.Outputs` (``.rectified``, ``.uncertainty``, ...).
        """
        if isinstance(backend, str):
            overrides["backend"], backend = backend, None
        job = self.prepareSegmentation(inputVolume, library, rois, organs, options, **overrides)
        if python:
            if backend is not None:
                raise ValueError("a worker process loads its own model: give python or a backend object, not both")
            return self.startJob(job, python).wait(progress, cancel)
        computed = self.computeSegmentation(job, progress, cancel, backend)
        return self.applySegmentation(computed, progress)

    # -- rectify ---------------------------------------------------------------------------------
    def hasCachedResult(self, inputVolume):
        return inputVolume is not None and inputVolume.GetID() in self._cache

    def forget(self, inputVolumeID):
        self._cache.pop(inputVolumeID, None)
        self.correction.forget(inputVolumeID)

    def rectify(self, inputVolume, options=None, progress=None, **overrides):
        """Rerun only the rectification with new options, from the cached maps (no SAM).

        Rewrites the rectified and flagged segmentations, the review and the
        statistics tables (an edited rectified segmentation is kept, as always).
        """
        if not self.hasCachedResult(inputVolume):
            raise URSAMError(f"no UR-SAM result of '{inputVolume.GetName() if inputVolume else None}' in this "
                             "session to rectify; run Segment first")
        cached = self._cache[inputVolume.GetID()]
        given = replace(options or cached.job.options, **overrides)
        # only the rectification options can change without SAM; the rest stays what the maps were made with
        newOptions = replace(cached.job.options, **{name: getattr(given, name) for name in RECTIFY_FIELDS}).check()
        progress = _progress(progress, None)
        progress.stage(STAGE_RECTIFY)
        job = replace(cached.job, options=newOptions)
        result = cached.result.rerectify(newOptions.rectifyOptions())
        computed = SegmentComputed(job, result, localizeInfo=cached.localizeInfo, maps={}, seconds=cached.seconds)
        self._derive(computed)
        return self.applySegmentation(computed, progress, roles=("rectified", "flagged", "review", "statistics"))

    # -- review ----------------------------------------------------------------------------------
    def reviewComponent(self, reviewTable, row, accept):
        """Accept (add to the organ's rectified segment) or reject (remove from it) one flagged region."""
        scene = reviewTable.GetScene()
        inputID = reviewTable.GetAttribute(outputs.INPUT)
        inputVolume = scene.GetNodeByID(inputID) if inputID else None
        if inputVolume is None:
            raise URSAMError(f"the input volume of '{reviewTable.GetName()}' is no longer in the scene")
        flagged = outputs.findOutput(scene, inputID, "flagged")
        rectified = outputs.findOutput(scene, inputID, "rectified")
        if flagged is None or rectified is None:
            raise URSAMError(f"the UR-SAM segmentations of '{inputVolume.GetName()}' are missing; run Segment again")
        component = review.componentFromTable(reviewTable, row)
        gridIjkToRas, gridWorldToLocal = ijkToRas(inputVolume), geometryWorldToLocal(inputVolume)
        flaggedId = segmentations.findOrganSegment(flagged, component.organ)
        if flaggedId is None:
            raise URSAMError(f"'{flagged.GetName()}' has no segment of {component.organ}")
        mask = review.component_mask(
            segmentations.segmentMask(flagged, flaggedId, ijkToFrameOf(gridIjkToRas, gridWorldToLocal, flagged),
                                      component.region), component)
        if mask is None:
            raise URSAMError(f"flagged region {component.id} ({component.organ}) is no longer in "
                             f"'{flagged.GetName()}'")
        target = segmentations.findOrganSegment(rectified, component.organ)
        if target is None:
            raise URSAMError(f"'{rectified.GetName()}' has no segment of {component.organ}")
        shape = tuple(inputVolume.GetImageData().GetDimensions())[::-1]
        offset = tuple(s.start for s in component.region)
        segmentations.modifySegmentRegion(rectified, target, mask, offset,
                                          ijkToFrameOf(gridIjkToRas, gridWorldToLocal, rectified), shape, add=accept)
        review.setStatus(reviewTable, row, review.ACCEPTED if accept else review.REJECTED)
        return int(mask.sum())

    def jumpToComponent(self, reviewTable, row):
        display.jumpSlices(reviewTable.GetScene(), review.rowCentre(reviewTable, row))

    def nextSliceToCheck(self, statisticsTable, organ):
        """Step the slice views to the organ's next slice to check: its slices of the input volume (k) ranked
        by expected wrong voxels (the statistics table's), most first, one further at each call and round
        again after the last. The views centre on the organ's rectified segment on that slice (on its
        centre where the slice holds none of it). Returns the slice k."""
        scene = statisticsTable.GetScene()
        inputID = statisticsTable.GetAttribute(outputs.INPUT)
        inputVolume = scene.GetNodeByID(inputID) if inputID else None
        if inputVolume is None:
            raise URSAMError(f"the input volume of '{statisticsTable.GetName()}' is no longer in the scene")
        slices = review.slicesToCheck(statisticsTable, organ)
        if not slices:
            raise URSAMError(f"'{statisticsTable.GetName()}' ranks no slice of {organ}; run Segment again")
        key = (inputID, organ)
        position = (self._sliceCursor.get(key, -1) + 1) % len(slices)
        self._sliceCursor[key] = position
        k = slices[position]
        rectified = outputs.findOutput(scene, inputID, "rectified")
        segmentId = segmentations.findOrganSegment(rectified, organ) if rectified is not None else None
        gridIjkToRas = ijkToRas(inputVolume)
        dims = tuple(inputVolume.GetImageData().GetDimensions())
        centre = [(dims[0] - 1) / 2.0, (dims[1] - 1) / 2.0]
        if segmentId is not None:
            whole = tuple(slice(0, s) for s in dims[::-1])
            mask = segmentations.segmentMask(rectified, segmentId, ijkToFrameOf(
                gridIjkToRas, geometryWorldToLocal(inputVolume), rectified), whole)
            on_slice = np.argwhere(mask[k]) if 0 <= k < mask.shape[0] else np.empty((0, 2))
            points = on_slice if len(on_slice) else np.argwhere(mask)[:, 1:]
            if len(points):
                centre = [float(points[:, 1].mean()), float(points[:, 0].mean())]
        ras = np.linalg.inv(geometryWorldToLocal(inputVolume)) @ gridIjkToRas @ np.array([centre[0], centre[1], k, 1.0])
        display.jumpSlices(scene, ras[:3])
        return k

    # -- template library ------------------------------------------------------------------------
    def addToLibrary(self, library, inputVolume, segmentationNode, caseId=None, progress=None):
        """Add a labelled scan (volume + segmentation) to a template library; creates the library if needed.

        Segments are matched to the library's organs by name; organs new to the
        library get new label values. The files are written by URSAMLib.templates.
        Returns the new case id.
        """

        snapshot = snapshotVolume(inputVolume)
        if segmentationNode is None:
            raise URSAMError("select the segmentation that labels the volume's organs")
        seg = segmentationNode.GetSegmentation()
        if seg.GetNumberOfSegments() == 0:
            raise URSAMError(f"segmentation '{segmentationNode.GetName()}' has no segments")
        names = {}
        for i in range(seg.GetNumberOfSegments()):
            segmentId = seg.GetNthSegmentID(i)
            names[i + 1] = segmentations.organNameOfSegment(seg.GetSegment(segmentId), segmentId)
        labels = np.zeros(snapshot.array.shape, np.uint16)
        region = tuple(slice(0, s) for s in labels.shape)
        # the segmentation may sit under another transform than the volume (drawn in world space)
        gridInSegmentation = ijkToFrameOf(snapshot.ijkToRas, snapshot.worldToLocal, segmentationNode)
        for value, name in names.items():
            mask = segmentations.segmentMask(segmentationNode, seg.GetNthSegmentID(value - 1), gridInSegmentation,
                                             region)
            labels[mask] = value
        if not labels.any():
            raise URSAMError(f"segmentation '{segmentationNode.GetName()}' is empty")
        lib = open_or_create(str(library), names)
        with tempfile.TemporaryDirectory(prefix="ursam-template-") as tmp:
            # the library names a new case after the image file
            imagePath = os.path.join(tmp, f"{caseId or _caseId(snapshot.name)}.nii.gz")
            labelsPath = os.path.join(tmp, "labels.nii.gz")
            image = snapshot.image()
            values = snapshot.array
            if np.array_equal(values, np.round(values)) and values.min() >= -32768 and values.max() <= 32767:
                image = sitk.Cast(image, sitk.sitkInt16)  # HU as read: a quarter of the float32 file
            sitk.WriteImage(image, imagePath, True)
            labelImage = sitk.GetImageFromArray(labels)
            labelImage.CopyInformation(snapshot.reference())
            sitk.WriteImage(labelImage, labelsPath, True)
            added, _ = lib.add(imagePath, labelsPath, case_id=caseId, names=names)
        return added

    # -- helpers ---------------------------------------------------------------------------------
    def _library(self, library):
        return library if isinstance(library, Library) else Library(library)

    def _boxesFromRois(self, rois, snapshot, library, organs, warnings):
        libNames = {}
        if library:
            libNames = {v.lower(): k for k, v in self._library(library).names.items()}
        boxes, seen, used = [], set(), set()
        pending = []
        for roi in rois:
            name = roi.GetAttribute(outputs.ORGAN_NAME) or roi.GetName()
            if organs is not None and name not in organs:
                continue
            if name.lower() in seen:
                raise URSAMError(f"two ROIs are named '{name}'; give each organ one ROI")
            seen.add(name.lower())
            label = roi.GetAttribute(outputs.ORGAN_LABEL)
            label = int(label) if label else libNames.get(name.lower())
            if label in used:
                label = None
            if label is not None:
                used.add(label)
            pending.append((roi, name, label))
        if not pending:
            raise URSAMError("none of the given ROIs is one of the selected organs")
        free = (v for v in range(1, 65536) if v not in used)
        for roi, name, label in pending:
            boxes.append(boxFromRoi(roi, snapshot, label if label is not None else next(free), name,
                                    warn=warnings.append))
        return boxes

    def _liveInput(self, snapshot):
        """The input node, still in the scene (it may have been deleted while the run was computing)."""
        node = snapshot.scene.GetNodeByID(snapshot.nodeID) if snapshot.scene is not None else None
        if node is None:
            raise URSAMError(f"the input volume '{snapshot.name}' was removed from the scene during the run")
        return node


def roiPromptNote(options, fromRois=True):
    """What the user is told when checked organ ROIs override the prompt mode (None if they do not):
    ROIs run as box3d prompts. The panel shows the same text."""
    return worker.roiPromptNote(options, fromRois)


def promptMode(result):
    """The prompt mode a URSAMLib result was made with (what ran, not what was asked for)."""
    return str(result.prompt_info.get("mode", result.settings.prompts.mode))



def _caseId(name):
    """A library case id from a volume name (letters, digits, _ . - only)."""
    text = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.-")
    return text or "case"
