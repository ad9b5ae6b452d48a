"""The headless URSAM logic: Slicer nodes in, URSAMLib runs, Slicer nodes out. No Qt.

Every run has three steps so that the panel can keep Slicer responsive:

1. ``prepare*`` (main thread): check the input nodes and copy what the engine
   needs (voxels, geometry, boxes from ROIs) into a job;
2. ``compute*`` (any thread): run URSAMLib on the job; it reads no node and
   writes no node, and honours ``cancel`` between slices;
3. ``apply*`` (main thread): write the result into output nodes.

``process(...)`` does the three in a row, for scripts, Slicer's Python
console and tests. A cancelled or failed run raises before step 3, so the
scene is left exactly as it was.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field, replace

import numpy as np

from URSAMLib import terminology
from URSAMLib.errors import URSAMError
from URSAMLib.progress import STAGE_LOCALIZE, STAGE_MODEL, STAGE_RECTIFY, STAGE_WRITE, Progress

from . import display, outputs, review, segmentations
from .geometry import arrayToMatrix, boxFromRoi, ijkToRas, roiPlacement, snapshotVolume
from .options import RunOptions


#: the RunOptions that Rectify may change (the others need a new SAM run)
RECTIFY_FIELDS = ("thresholdScope", "lowerBound", "alphaH", "fixedThreshold", "minComponentVoxels", "atlasPrior")


@dataclass
class SegmentJob:
    """Everything a segmentation run needs, copied from the scene (prepare step)."""
    snapshot: object
    options: RunOptions
    boxes: list = None  # OrganBox from ROIs; None: localize from ``library``
    library: str = None
    organs: list = None
    warnings: list = field(default_factory=list)


@dataclass
class SegmentComputed:
    """A finished computation, not yet in the scene (the compute step's result)."""
    job: SegmentJob
    result: object  # URSAMLib.segment.SegmentationResult
    localized: list = None  # boxes from the localizer, when it ran
    localizeInfo: dict = None
    maps: dict = field(default_factory=dict)
    components: list = field(default_factory=list)
    statistics: list = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class LocalizeJob:
    snapshot: object
    library: str
    organs: list
    options: RunOptions


class CollectingProgress(Progress):
    """URSAMLib's Progress that keeps warnings instead of printing them.

    Runs may compute off Slicer's main thread, where nothing should write to
    the Python console; the warnings reach the user with the results.
    """

    def __init__(self, callback=None, cancel=None):
        super().__init__(callback=callback, cancel=cancel, quiet=True)
        self.warnings = []

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


class URSAMProcessLogic:
    """Headless UR-SAM for Slicer scenes; the module's URSAMLogic is this plus Slicer's conveniences.

    ``appLogic`` (Slicer's application logic) gives the Colors module for the
    uncertainty legend; it may be None.
    """

    def __init__(self, appLogic=None):
        self.appLogic = appLogic
        self._backends = {}
        self._backendLock = threading.Lock()
        #: input volume node ID -> the last SegmentComputed, for Rectify without SAM
        self._cache = {}

    # -- model --------------------------------------------------------------------------------
    def backend(self, options, progress=None):
        """The SAM backend for these options, loaded once and kept (loading costs seconds)."""
        key = options.backendKey()
        with self._backendLock:
            if key not in self._backends:
                from URSAMLib.sam.backends import make_backend

                if progress is not None:
                    progress.stage(f"{STAGE_MODEL} {options.backend}")
                self._backends = {key: make_backend(options.backend, options.checkpoint or None, options.device)}
            return self._backends[key]

    # -- localize -------------------------------------------------------------------------------
    def prepareLocalization(self, inputVolume, library, organs=None, options=None):
        options = (options or RunOptions()).check()
        if not library:
            raise URSAMError("no template library folder is selected")
        self._library(library)  # fail early, on the main thread, with the library's own message
        return LocalizeJob(snapshotVolume(inputVolume), str(library), _organNames(organs), options)

    def computeLocalization(self, job, progress=None, cancel=None):
        """The :class:`URSAMLib.localize.Localization` of the job's volume from its library."""
        from URSAMLib.localize import localize

        progress = _progress(progress, cancel)
        progress.stage(STAGE_LOCALIZE)
        localization = localize(job.snapshot.image(), self._library(job.library), organs=job.organs,
                                progress=progress, margin=job.options.settings().margin)
        if not localization.boxes:
            raise URSAMError(f"the template library localized none of the organs in '{job.snapshot.name}'")
        return localization

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
                objectToNode, radius = roiPlacement(box, job.snapshot.ijkToRas)
                wasModified = roi.StartModify()
                roi.SetAndObserveObjectToNodeMatrix(arrayToMatrix(objectToNode))
                roi.SetRadiusXYZ(*[float(r) for r in radius])
                roi.EndModify(wasModified)
                if roi.GetDisplayNode() is None:
                    roi.CreateDefaultDisplayNodes()
                roi.GetDisplayNode().SetSelectedColor(*terminology.lookup(box.name, box.label)[1])
                roi.GetDisplayNode().SetHandlesInteractive(True)  # move and resize with the mouse
                rois.append(roi)
        except Exception:
            outputs.removeNodes(scene, created)
            raise
        return rois

    def localize(self, inputVolume, library, organs=None, options=None, progress=None, cancel=None):
        """Localize organs from the template library: one editable ROI per organ (synchronous)."""
        job = self.prepareLocalization(inputVolume, library, organs, options)
        return self.applyLocalization(job, self.computeLocalization(job, progress, cancel).boxes)

    # -- segment --------------------------------------------------------------------------------
    def prepareSegmentation(self, inputVolume, library=None, rois=None, organs=None, options=None, **overrides):
        """Check the inputs and copy them into a :class:`SegmentJob` (main thread).

        ``rois``: ROI nodes, one per organ, named after it; used as they stand.
        Without ROIs, ``library`` (a template library folder) localizes the organs.
        """
        options = replace(options or RunOptions(), **overrides).check()
        snapshot = snapshotVolume(inputVolume)
        names = _organNames(organs)
        job = SegmentJob(snapshot, options, library=str(library) if library else None, organs=names)
        if rois:
            job.boxes = self._boxesFromRois(rois, snapshot, library, names, job.warnings)
            if options.prompts != "box3d":
                job.warnings.append(
                    f"prompt mode {options.prompts} needs the organs localized from a template library (it follows "
                    "the support labels warped into the scan); the organ ROIs were used as box3d prompts "
                    "(uncheck the ROIs to localize from the library)")
        elif not library:
            raise URSAMError("give organ ROIs or a template library to localize the organs")
        else:
            self._library(library)
        return job

    def computeSegmentation(self, job, progress=None, cancel=None, backend=None):
        """Run URSAMLib on a prepared job (no scene access; safe off the main thread)."""
        from URSAMLib.segment import segment_query

        t0 = time.perf_counter()
        progress = _progress(progress, cancel)
        progress.check_cancel()
        computed = SegmentComputed(job, None)
        options = job.options
        calibration = None
        if job.boxes is None:
            from URSAMLib.calibration import find_calibration

            localization = self.computeLocalization(
                LocalizeJob(job.snapshot, job.library, job.organs, options), progress)
            computed.localized, computed.localizeInfo = localization.boxes, localization.info
            settings = options.settings()
            if settings.warps_labels(localization):
                # the library's own calibration.json, as ursam segment --templates uses it
                calibration = find_calibration(localization.library, None, progress)
        else:
            # ROIs have no per-slice boxes and nothing to warp: prepareSegmentation told the user
            localization = job.boxes
            settings = options.settings(mode="box3d")
        sam = backend if backend is not None else self.backend(options, progress)
        inputs = {"volume": job.snapshot.name, "boxes": [b.to_json() for b in localization_boxes(localization)]}
        computed.result = segment_query(job.snapshot.array, job.snapshot.reference(), localization, sam, settings,
                                        progress=progress, inputs=inputs, calibration=calibration)
        # the engine's own warnings (progress.warn) are in the result already; the job's come first
        computed.result.warnings[:0] = job.warnings
        self._derive(computed)
        progress.check_cancel()
        computed.seconds = time.perf_counter() - t0
        return computed

    def _derive(self, computed):
        """Label maps, flagged components and statistics from the engine's result (no SAM)."""
        result = computed.result
        organs = [(o.label, o.name) for o in result.main_organs()]
        ensemble = result.label_map("ensemble")
        rectified = result.label_map()
        uncertainty, uncLabels = result.uncertainty_maps()
        computed.maps = {"ensemble": ensemble, "rectified": rectified, "uncertainty": uncertainty,
                         "flagged": uncLabels, "organs": organs}
        computed.components = review.flagged_components(uncLabels, uncertainty, organs, result.voxel_ml,
                                                        int(computed.job.options.minComponentVoxels),
                                                        error_probability=result.error_map())
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
                cancel=None, backend=None, **overrides):
        """Segment the organs of ``inputVolume`` with UR-SAM and write the output nodes.

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

        Returns :class:`URSAMMRML.outputs.Outputs` (``.rectified``, ``.uncertainty``, ...).
        """
        if isinstance(backend, str):
            overrides["backend"], backend = backend, None
        job = self.prepareSegmentation(inputVolume, library, rois, organs, options, **overrides)
        computed = self.computeSegmentation(job, progress, cancel, backend)
        return self.applySegmentation(computed, progress)

    # -- rectify ---------------------------------------------------------------------------------
    def hasCachedResult(self, inputVolume):
        return inputVolume is not None and inputVolume.GetID() in self._cache

    def forget(self, inputVolumeID):
        self._cache.pop(inputVolumeID, None)

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
        snapshotIjkToRas = ijkToRas(inputVolume)
        flaggedId = segmentations.findOrganSegment(flagged, component.organ)
        if flaggedId is None:
            raise URSAMError(f"'{flagged.GetName()}' has no segment of {component.organ}")
        mask = review.component_mask(
            segmentations.segmentMask(flagged, flaggedId, snapshotIjkToRas, component.region), component)
        if mask is None:
            raise URSAMError(f"flagged region {component.id} ({component.organ}) is no longer in "
                             f"'{flagged.GetName()}'")
        target = segmentations.findOrganSegment(rectified, component.organ)
        if target is None:
            raise URSAMError(f"'{rectified.GetName()}' has no segment of {component.organ}")
        shape = tuple(inputVolume.GetImageData().GetDimensions())[::-1]
        offset = tuple(s.start for s in component.region)
        segmentations.modifySegmentRegion(rectified, target, mask, offset, snapshotIjkToRas, shape, add=accept)
        review.setStatus(reviewTable, row, review.ACCEPTED if accept else review.REJECTED)
        return int(mask.sum())

    def jumpToComponent(self, reviewTable, row):
        display.jumpSlices(reviewTable.GetScene(), review.rowCentre(reviewTable, row))

    # -- template library ------------------------------------------------------------------------
    def addToLibrary(self, library, inputVolume, segmentationNode, caseId=None, progress=None):
        """Add a labelled scan (volume + segmentation) to a template library; creates the library if needed.

        Segments are matched to the library's organs by name; organs new to the
        library get new label values. The files are written by URSAMLib.templates.
        Returns the new case id.
        """
        import os
        import tempfile

        import SimpleITK as sitk
        from URSAMLib.templates import open_or_create

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
        for value, name in names.items():
            mask = segmentations.segmentMask(segmentationNode, seg.GetNthSegmentID(value - 1), snapshot.ijkToRas, region)
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
        from URSAMLib.templates import Library

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


def promptMode(result):
    """The prompt mode a URSAMLib result was made with (what ran, not what was asked for)."""
    return str(result.prompt_info.get("mode", result.settings.prompts.mode))


def localization_boxes(localization):
    """The boxes of a Localization, or the list of boxes itself (ROIs)."""
    return getattr(localization, "boxes", localization)


def _caseId(name):
    """A library case id from a volume name (letters, digits, _ . - only)."""
    text = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.-")
    return text or "case"
