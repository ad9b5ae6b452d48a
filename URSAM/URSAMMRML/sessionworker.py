"""The worker's persistent mode: the model and the scan loaded once, corrections served one after another.

    python -m URSAMMRML.worker SESSIONDIR --serve [--parent-pid PID]

The session folder holds the scan (``input.nrrd``) and ``job.json`` (task ``session``: the model's
options as :class:`URSAMMRML.options.RunOptions` fields, the scan's exact grid), written by
:func:`URSAMMRML.worker.write_job`. The worker loads the model and the scan, prints ``{"event": "ready"}``,
then reads one request per line on stdin and answers each with one event on stdout (its events file):

    {"id": 1, "action": "correct", "label": 3, "box": {"z": 12, "x0": 40, "y0": 30, "x1": 70, "y1": 66},
     "first": 7, "labels": "labels-1.npy", "options": {"max_slices": 5, ...}}
    -> {"event": "corrected", "id": 1, "file": "corrected-1.npy", "changed": [11, 12, 13], "stops": {...},
        "steps": 5, "encoder_calls": 4, "seconds": 2.1}
    {"id": 2, "action": "close"}   -> the worker ends (so does the end of stdin)

Boxes and slices are on the scan's canonical grid (URSAMLib.orientation); ``labels-N.npy`` is the current
label map of slices ``first ..`` (canonical), which the logic reads from the scene, and
``corrected-N.npy`` the same slab corrected. A request that fails answers ``{"event": "error", "id": N,
"kind": "input" | "internal", "message": "..."}`` and the worker serves the next one. Every slice
embedding stays in the worker (:class:`URSAMLib.correction.SliceSam`), so a box drawn again on a slice
costs no encoder call. Like the one-job worker, it imports only the engine.
"""
from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import fields
from pathlib import Path

import numpy as np

from URSAMLib.correction import CorrectionOptions, SliceBox, SliceSam, correct_organ
from URSAMLib.errors import URSAMError
from URSAMLib.imageio import looks_like_ct
from URSAMLib.orientation import Orientation

#: embeddings the session keeps (LiteMedSAM's are 4 MiB each)
KEPT_SLICES = 64
ACTIONS = ("correct", "close")


def _options(raw):
    known = {f.name for f in fields(CorrectionOptions)}
    unknown = sorted(set(raw or {}) - known)
    if unknown:
        raise URSAMError(f"the correction request has options this worker does not know: {', '.join(unknown)}")
    return CorrectionOptions(**(raw or {})).check()


class Session:
    """The model and the scan of a session, and the answer to one request."""

    def __init__(self, job_dir, job, backend):
        self.job_dir = Path(job_dir)
        orientation = Orientation.of(job.image)
        self.volume = orientation.to_canonical(job.volume)
        self.sams = {zoom: SliceSam(backend, self.volume, zoom=zoom, keep=KEPT_SLICES) for zoom in (False, True)}

    def answer(self, request):
        action = request.get("action")
        if action not in ACTIONS:
            raise URSAMError(f"unknown request {action!r}; this worker serves {', '.join(ACTIONS)}")
        options = _options(request.get("options"))
        b = request.get("box") or {}
        try:
            box = SliceBox(int(b["z"]), int(b["x0"]), int(b["y0"]), int(b["x1"]), int(b["y1"]))
            label, first = int(request["label"]), int(request["first"])
        except (KeyError, TypeError, ValueError):
            raise URSAMError("the correction request needs label, first and a box z, x0, y0, x1, y1") from None
        path = self.job_dir / Path(str(request.get("labels", ""))).name
        try:
            labels = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise URSAMError(f"the correction's label slab is unreadable ({err})", path) from None
        if labels.ndim != 3 or labels.shape[1:] != self.volume.shape[1:]:
            raise URSAMError(f"the label slab has shape {labels.shape}; the scan's slices are {self.volume.shape[1:]}",
                             path)
        outcome = correct_organ(self.sams[options.zoom], labels, label, box, options, first=first)
        out = self.job_dir / f"corrected-{int(request.get('id', 0))}.npy"
        np.save(out, outcome.labels, allow_pickle=False)
        return {"event": "corrected", "id": request.get("id"), "file": out.name, "changed": outcome.changed,
                "stops": {d: {"last": s.last, "why": s.why} for d, s in outcome.stops.items()},
                "steps": len(outcome.steps), "encoder_calls": outcome.encoder_calls,
                "voxels_added": outcome.voxels_added, "voxels_removed": outcome.voxels_removed,
                "seconds": round(outcome.seconds, 3)}


def serve(job_dir, job, backend_of, emit, requests=None):
    """Load the session, then answer requests (lines of ``requests``, default stdin) until ``close`` or their
    end. ``backend_of(options, percentile)`` loads the model."""
    t0 = time.perf_counter()
    percentile = not looks_like_ct(job.volume)
    session = Session(job_dir, job, backend_of(job.options, percentile))
    emit(event="ready", seconds=round(time.perf_counter() - t0, 3))
    for line in requests if requests is not None else sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
        except ValueError:
            emit(event="error", id=None, kind="input", message=f"a request that is not JSON: {line.strip()[:80]}")
            continue
        if request.get("action") == "close":
            break
        try:
            emit(**session.answer(request))
        except URSAMError as err:
            emit(event="error", id=request.get("id"), kind="input", message=" ".join(str(err).split()))
        except Exception as err:
            traceback.print_exc()
            emit(event="error", id=request.get("id"), kind="internal",
                 message=" ".join(f"{type(err).__name__}: {err}".split()))
    emit(event="closed")
