"""SAM-assisted correction in the scene: a box (a Markups ROI) on a slice fixes one organ of "UR-SAM rectified"
there and on the slices around it (URSAMLib.correction). No Qt.

The model runs in a worker process kept for the session (:class:`CorrectionSession`, ``python -m
URSAMMRML.worker DIR --serve``): it loads the model and the scan once, then answers one correction after
another, keeping every slice embedding, so a correction costs no start-up. :meth:`Corrector.start` reads
the organ's slices around the box from the segmentation (the user's own edits included), sends them with
the box, and a :class:`PendingCorrection` (polled by the panel's timer, like a Segment run) writes the
answer into the segment in place. Only the organ's voxels change: other segments keep theirs. The
organ's flagged voxels on the changed slices leave "UR-SAM flagged" and the review rows of its regions there
read "corrected". :meth:`Corrector.undo` reverses the last correction of a volume exactly.

Boxes are mapped from the ROI (in any volume orientation) onto the canonical axial slices SAM works on
(URSAMLib.orientation): the box's slice is the middle one of the canonical slices the ROI covers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional

import numpy as np

from URSAMLib.boxes import OrganBox
from URSAMLib.correction import CorrectionOptions, SliceBox, remove_from_slice, slab_range
from URSAMLib.errors import Cancelled, URSAMError
from URSAMLib.orientation import Orientation
from URSAMLib.progress import STAGE_MODEL

from . import jobs, outputs, review, segmentations, worker
from .geometry import boxFromRoi, ijkToFrameOf, snapshotVolume

#: what a correction's progress says while SAM works
STAGE_CORRECT = "correcting"
#: the review table's status of a region on slices a correction changed
CORRECTED = "corrected"


@dataclass
class SceneCorrection:
    """One correction as written into the scene, enough to reverse it exactly."""
    inputID: str
    organ: str
    #: the region of the volume's grid ((z, y, x) offset) the masks cover
    offset: tuple
    shape: tuple
    added: np.ndarray
    removed: np.ndarray
    flagsCleared: Optional[np.ndarray]
    statuses: Dict[int, str]
    changed: List[int]
    info: dict = field(default_factory=dict)


class CorrectionSession:
    """A worker process that keeps the model and one volume's scan for a run of corrections."""

    def __init__(self, snapshot, runOptions, python, env=None, tempRoot=None):
        self.key = (snapshot.nodeID, runOptions.backendKey())
        self.jobDir = jobs.newJobDir(tempRoot)
        try:
            worker.write_job(self.jobDir, worker.Job(worker.SESSION, snapshot.name, snapshot.array, snapshot.image(),
                                                     runOptions))
            self.process = jobs.WorkerProcess(self.jobDir, python, env, serve=True).start()
        except Exception:
            jobs.removeJobDir(self.jobDir)
            raise
        self.ready = False
        self.answers = {}
        self.failure = None
        self._nextId = 1

    @property
    def alive(self):
        return self.process.running

    def poll(self):
        """Read the worker's events: ``ready``, and each request's answer (kept by request id)."""
        for event in self.process.poll():
            kind = event.get("event")
            if kind == "ready":
                self.ready = True
            elif kind in ("corrected", "error") and event.get("id") is not None:
                self.answers[event["id"]] = event
            elif kind == "error":
                self.failure = event.get("message")
        if self.process.returncode is not None and self.failure is None:
            self.failure = self.process.error() or "the URSAM correction worker ended"

    def send(self, request):
        """Send a request; its id."""
        request = dict(request, id=self._nextId)
        self._nextId += 1
        if not self.process.send(request):
            raise URSAMError("the URSAM correction worker has ended; apply the box again to start a new one")
        return request["id"]

    def close(self, timeout=2.0):
        """End the worker (asked to close, killed if it does not within ``timeout``) and remove its folder."""
        if self.process.running:
            self.process.send({"action": "close"})
            self.process.wait(timeout=timeout)
        self.process.kill()
        jobs.removeJobDir(self.jobDir)


class PendingCorrection:
    """One correction in the session worker, for the panel: :meth:`poll` it from a timer (the interface of
    :class:`URSAMMRML.logic.BackgroundRun`); once the answer is in, the next poll writes it into the scene.
    :meth:`cancel` ends the session's worker; the scene stays as it was."""

    name = "Correct"

    def __init__(self, corrector, session, request, context):
        self.corrector, self.session, self.request, self.context = corrector, session, request, context
        self.state = "running"
        self.progress = (STAGE_MODEL, 0, 0) if not session.ready else (STAGE_CORRECT, 0, 0)
        self.warnings, self.error, self.result = [], None, None
        self.requestId = None
        self.startedAt = time.perf_counter()
        self.seconds = None
        self._answer = None

    @property
    def done(self):
        return self.state in ("done", "failed", "cancelled")

    def poll(self):
        """Progress of the correction; writes it into the scene once the worker has answered. Never raises."""
        if self.done:
            return []
        try:
            if self._answer is not None:
                self.result = self.corrector.apply(self.context, self._answer)
                self._end("done")
                return []
            self.session.poll()
            if self.requestId is None and self.session.ready:
                self.requestId = self.session.send(self.request)
                self.progress = (STAGE_CORRECT, 0, 0)
            answer = self.session.answers.pop(self.requestId, None) if self.requestId is not None else None
            if answer is not None:
                if answer.get("event") == "error":
                    raise URSAMError(answer.get("message") or "the correction failed")
                self._answer = answer
                self.progress = ("writing results", 0, 0)
            elif self.session.failure is not None:
                self.corrector.endSession()
                raise URSAMError(self.session.failure)
        except Exception as err:
            self._end("failed", err)
        return []

    def cancel(self):
        """End the session's worker now (the next correction starts a new one); nothing was written."""
        if self.done:
            return
        self.corrector.endSession()
        self._end("cancelled", Cancelled("cancelled by the user"))

    def wait(self, timeout=None, interval=0.05):
        """Poll until the correction has ended (a script's synchronous correction); raises its error."""
        t0 = time.perf_counter()
        while not self.done:
            self.poll()
            if timeout is not None and time.perf_counter() - t0 > timeout:
                self.cancel()
                self.error = URSAMError(f"the correction did not finish within {timeout:g} s; the worker was stopped")
            if not self.done:
                time.sleep(interval)
        if self.error is not None:
            raise self.error
        return self.result

    def _end(self, state, error=None):
        self.state, self.error = state, error
        self.seconds = time.perf_counter() - self.startedAt

    @property
    def notes(self):
        return list(self.warnings)


@dataclass
class _Context:
    """What a correction read from the scene before SAM ran (main thread)."""
    inputVolume: object
    organ: str
    label: int
    orientation: Orientation
    first: int
    region: tuple
    labels: np.ndarray  # the slab's labels on the canonical grid
    box: Optional[SliceBox]


class Corrector:
    """SAM-assisted correction of one logic's scene: the session worker, the scene's reading and writing,
    and each volume's undo stack."""

    def __init__(self, python, env=None, tempRoot=None):
        self.python, self.env, self.tempRoot = python, env, tempRoot
        self.session = None
        self.undoStacks = {}

    # -- the session worker ----------------------------------------------------------------------
    def sessionFor(self, snapshot, runOptions):
        """The session worker of this volume and model: the running one, or a new one."""
        key = (snapshot.nodeID, runOptions.backendKey())
        if self.session is not None and (self.session.key != key or not self.session.alive):
            self.endSession()
        if self.session is None:
            self.session = CorrectionSession(snapshot, runOptions, self.python, self.env, self.tempRoot)
        return self.session

    def endSession(self):
        """End the session worker (Cancel, a closed scene, another volume or model)."""
        session, self.session = self.session, None
        if session is not None:
            session.close()

    # -- reading the scene -----------------------------------------------------------------------
    def _nodes(self, inputVolume):
        scene = inputVolume.GetScene()
        rectified = outputs.findOutput(scene, inputVolume.GetID(), "rectified")
        if rectified is None:
            raise URSAMError(f"'{inputVolume.GetName()}' has no UR-SAM rectified segmentation to correct; run Segment "
                             "first")
        return rectified, outputs.findOutput(scene, inputVolume.GetID(), "flagged"), \
            outputs.findOutput(scene, inputVolume.GetID(), "review")

    def _context(self, inputVolume, organ, roi, z=None, options=None):
        """Read the organ's slices around the box's slice (canonical) from the rectified segmentation."""
        rectified, _, _ = self._nodes(inputVolume)
        segmentId = segmentations.findOrganSegment(rectified, organ)
        if segmentId is None:
            raise URSAMError(f"'{rectified.GetName()}' has no segment of {organ}")
        snapshot = snapshotVolume(inputVolume)
        orientation = Orientation.of(snapshot.reference())
        size = orientation.canonical_size
        box = None
        if roi is not None:
            found = orientation.box_to_canonical(boxFromRoi(roi, snapshot, 1, organ))
            z = (found.min_ijk[2] + found.max_ijk[2]) // 2
            box = SliceBox(int(z), found.min_ijk[0], found.min_ijk[1], found.max_ijk[0], found.max_ijk[1])
        first, stop = slab_range(int(z), size[2], options or CorrectionOptions())
        region = _inputRegion(orientation, first, stop)
        labels, label = self._labels(rectified, snapshot, region, organ)
        return _Context(inputVolume, organ, label, orientation, first, region,
                        orientation.to_canonical(labels), box), snapshot

    def _labels(self, rectified, snapshot, region, organ):
        """The rectified segmentation as labels over ``region`` of the volume's grid (every segment, the user's
        own too, so that no other segment's voxel is taken); and the organ's label there."""
        grid = ijkToFrameOf(snapshot.ijkToRas, snapshot.worldToLocal, rectified)
        segmentation = rectified.GetSegmentation()
        shape = tuple(s.stop - s.start for s in region)
        labels = np.zeros(shape, np.uint16)
        target = segmentations.findOrganSegment(rectified, organ)
        label = None
        for i in range(segmentation.GetNumberOfSegments()):
            segmentId = segmentation.GetNthSegmentID(i)
            labels[segmentations.segmentMask(rectified, segmentId, grid, region)] = i + 1
            if segmentId == target:
                label = i + 1
        return labels, label

    def organs(self, inputVolume):
        """The organs of the volume's rectified segmentation (empty where it has none)."""
        rectified = outputs.findOutput(inputVolume.GetScene(), inputVolume.GetID(), "rectified") \
            if inputVolume is not None else None
        if rectified is None:
            return []
        segmentation = rectified.GetSegmentation()
        return [segmentations.organNameOfSegment(segmentation.GetSegment(i), i)
                for i in (segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments()))]

    # -- corrections -----------------------------------------------------------------------------
    def start(self, inputVolume, organ, roi, runOptions, options=None, propagate=None, maxSlices=None):
        """Correct ``organ`` of the volume's rectified segmentation from the box ``roi`` (a Markups ROI node):
        a :class:`PendingCorrection` running in the session worker. ``options``: the engine's
        :class:`URSAMLib.correction.CorrectionOptions`; ``propagate`` and ``maxSlices`` set those two."""
        options = options or CorrectionOptions()
        if propagate is not None or maxSlices is not None:
            options = replace(options, propagate=options.propagate if propagate is None else bool(propagate),
                              max_slices=options.max_slices if maxSlices is None else int(maxSlices))
        options = options.check()
        if roi is None:
            raise URSAMError("draw a box (a Markups ROI) around the organ on a slice first")
        context, snapshot = self._context(inputVolume, organ, roi, options=options)
        session = self.sessionFor(snapshot, runOptions.check())
        path = session.jobDir / f"labels-{session._nextId}.npy"
        np.save(path, context.labels, allow_pickle=False)
        b = context.box
        request = {"action": "correct", "label": context.label, "first": context.first, "labels": path.name,
                   "box": {"z": b.z, "x0": b.x0, "y0": b.y0, "x1": b.x1, "y1": b.y1},
                   "options": options.to_json()}
        run = PendingCorrection(self, session, request, context)
        run.poll()
        return run

    def remove(self, inputVolume, organ, roi):
        """Remove ``organ`` from the slice of ``roi`` (its middle axial slice), now: the
        :class:`SceneCorrection`."""
        if roi is None:
            raise URSAMError("place a box (a Markups ROI) on the slice to clear first")
        context, _ = self._context(inputVolume, organ, roi, options=CorrectionOptions(propagate=False))
        outcome = remove_from_slice(context.labels, context.label, context.box.z, first=context.first)
        return self._write(context, outcome.labels, outcome.changed, {"action": "remove"})

    def apply(self, context, answer):
        """Write a worker's answer into the scene (main thread): the :class:`SceneCorrection`."""
        path = self.session.jobDir / answer["file"] if self.session is not None else None
        if path is None or not path.is_file():
            raise URSAMError("the correction worker's answer is gone (the session ended)")
        labels = np.load(path, allow_pickle=False)
        path.unlink()
        return self._write(context, labels, [int(z) for z in answer["changed"]],
                           {k: answer.get(k) for k in ("stops", "seconds", "encoder_calls", "steps")})

    def _write(self, context, canonicalLabels, changed, info):
        inputVolume = context.inputVolume
        rectified, flagged, table = self._nodes(inputVolume)
        old = context.orientation.to_input(context.labels) == context.label
        new = context.orientation.to_input(canonicalLabels) == context.label
        offset = tuple(s.start for s in context.region)
        shape = tuple(inputVolume.GetImageData().GetDimensions())[::-1]
        snapshot = snapshotVolume(inputVolume)
        record = SceneCorrection(inputVolume.GetID(), context.organ, offset, new.shape, new & ~old, old & ~new,
                                 None, {}, list(changed), info)
        segmentId = segmentations.findOrganSegment(rectified, context.organ)
        grid = ijkToFrameOf(snapshot.ijkToRas, snapshot.worldToLocal, rectified)
        _modify(rectified, segmentId, record.removed, offset, grid, shape, add=False)
        _modify(rectified, segmentId, record.added, offset, grid, shape, add=True)
        if flagged is not None and changed:
            flaggedId = segmentations.findOrganSegment(flagged, context.organ)
            if flaggedId is not None:
                onChanged = np.zeros(context.labels.shape, bool)
                onChanged[[z - context.first for z in changed]] = True
                flaggedGrid = ijkToFrameOf(snapshot.ijkToRas, snapshot.worldToLocal, flagged)
                flags = segmentations.segmentMask(flagged, flaggedId, flaggedGrid, context.region)
                record.flagsCleared = flags & context.orientation.to_input(onChanged)
                _modify(flagged, flaggedId, record.flagsCleared, offset, flaggedGrid, shape, add=False)
                outputs.markWritten(flagged)
        if table is not None and changed:
            record.statuses = _markCorrected(table, context.organ, context.orientation, set(changed))
        self.undoStacks.setdefault(inputVolume.GetID(), []).append(record)
        return record

    def canUndo(self, inputVolume):
        return inputVolume is not None and bool(self.undoStacks.get(inputVolume.GetID()))

    def undo(self, inputVolume):
        """Reverse the volume's last correction: the segment's voxels, the flags and the review statuses as
        they were. Returns the :class:`SceneCorrection` undone."""
        stack = self.undoStacks.get(inputVolume.GetID()) if inputVolume is not None else None
        if not stack:
            raise URSAMError("there is no correction to undo")
        record = stack[-1]
        rectified, flagged, table = self._nodes(inputVolume)
        snapshot = snapshotVolume(inputVolume)
        shape = tuple(inputVolume.GetImageData().GetDimensions())[::-1]
        segmentId = segmentations.findOrganSegment(rectified, record.organ)
        if segmentId is None:
            raise URSAMError(f"'{rectified.GetName()}' no longer has a segment of {record.organ}")
        grid = ijkToFrameOf(snapshot.ijkToRas, snapshot.worldToLocal, rectified)
        _modify(rectified, segmentId, record.added, record.offset, grid, shape, add=False)
        _modify(rectified, segmentId, record.removed, record.offset, grid, shape, add=True)
        if flagged is not None and record.flagsCleared is not None:
            flaggedId = segmentations.findOrganSegment(flagged, record.organ)
            if flaggedId is not None:
                flaggedGrid = ijkToFrameOf(snapshot.ijkToRas, snapshot.worldToLocal, flagged)
                _modify(flagged, flaggedId, record.flagsCleared, record.offset, flaggedGrid, shape, add=True)
                outputs.markWritten(flagged)
        if table is not None:
            for row, status in record.statuses.items():
                review.setStatus(table, row, status)
        stack.pop()
        return record

    def forget(self, inputVolumeID):
        self.undoStacks.pop(inputVolumeID, None)


def _inputRegion(orientation, first, stop):
    """(z, y, x) slices of the input grid that hold canonical slices ``first .. stop - 1``."""
    size = orientation.canonical_size
    box = orientation.box_to_input(OrganBox(0, "", [0, 0, first], [size[0] - 1, size[1] - 1, stop - 1]))
    return tuple(slice(box.min_ijk[a], box.max_ijk[a] + 1) for a in (2, 1, 0))


def _modify(node, segmentId, mask, offset, grid, shape, add):
    if mask is not None and mask.any():
        segmentations.modifySegmentRegion(node, segmentId, mask, offset, grid, shape, add=add)


def _markCorrected(table, organ, orientation, changed):
    """Review rows of ``organ`` whose region lies on corrected canonical slices read "corrected"; their
    previous statuses by row."""
    previous = {}
    columns = table.GetTable()
    for row in range(columns.GetNumberOfRows()):
        if str(columns.GetColumnByName("Organ").GetValue(row)) != organ:
            continue
        i0, i1, j0, j1, k0, k1 = (int(v) for v in str(columns.GetColumnByName("Box IJK").GetValue(row)).split(","))
        box = orientation.box_to_canonical(OrganBox(0, "", [i0, j0, k0], [i1, j1, k1]))
        if any(box.min_ijk[2] <= z <= box.max_ijk[2] for z in changed):
            status = str(columns.GetColumnByName("Status").GetValue(row))
            if status != CORRECTED:
                previous[row] = status
                review.setStatus(table, row, CORRECTED)
    return previous
