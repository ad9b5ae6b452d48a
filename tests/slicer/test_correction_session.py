"""SAM-assisted correction in a real MRML scene (slicer-core) through a real persistent worker process.

The scene holds the 7-slice crop of tsA_slab and URSAM's output nodes of a result: its labels (liver, right
kidney, spleen) with the spleen moved by 10 voxels on one slice, the flagged voxels there and the review
table of them. A box (a Markups ROI) around the true spleen on that slice is corrected in the session
worker, as the panel's Apply does; Undo puts every voxel back.
"""
import os
import time

import numpy as np
import pytest
import slicer
from slicer_scene import SlicerApp, full_mask

from URSAMLib.boxes import OrganBox
from URSAMLib.correction import CorrectionOptions, SliceBox, SliceSam, correct_organ
from URSAMLib.errors import URSAMError
from URSAMLib.metrics import dice
from URSAMLib.orientation import Orientation
from URSAMLib.review import flagged_components
from URSAMMRML import geometry, jobs, outputs, review, segmentations
from URSAMMRML.correction import CORRECTED
from URSAMMRML.logic import RunOptions, URSAMProcessLogic

ORGANS = [(1, "liver"), (2, "kidney_right"), (3, "spleen")]
WRONG = 3


class Scene:
    pass


def masks(node, volume):
    return {name: full_mask(node, name, volume) for _, name in ORGANS}


def statuses(table):
    column = table.GetTable().GetColumnByName("Status")
    return [str(column.GetValue(r)) for r in range(table.GetTable().GetNumberOfRows())]


@pytest.fixture(scope="module")
def scene(crop_paths, tmp_path_factory):
    s = Scene()
    s.app = SlicerApp()
    s.volume = s.app.loadVolume(crop_paths[0], "tsA crop")
    truth = slicer.util.arrayFromVolume(s.app.loadVolume(crop_paths[1], "labels")).copy()
    s.truth = np.where(np.isin(truth, [1, 2, 3]), truth, 0).astype(np.uint16)
    labels = s.truth.copy()
    plane = labels[WRONG]
    moved = np.roll(plane == 3, 10, axis=1) & (plane == 0)
    plane[plane == 3] = 0
    plane[moved] = 3
    s.labels = labels
    flagged = np.zeros_like(labels)
    flagged[WRONG][moved] = 3
    flagged[0][labels[0] == 1] = 1  # a liver region elsewhere, which the spleen's correction leaves alone
    ijkToRas = geometry.ijkToRas(s.volume)
    folder = outputs.outputFolder(s.app.scene, s.volume)
    created, notes = [], []
    s.rectified = outputs.obtainOutput(s.app.scene, s.volume, "rectified", folder, created, notes)
    segmentations.setSegmentsFromLabelmap(s.rectified, labels, ORGANS, ijkToRas, s.volume)
    s.flagged = outputs.obtainOutput(s.app.scene, s.volume, "flagged", folder, created, notes)
    segmentations.setSegmentsFromLabelmap(s.flagged, flagged, ORGANS, ijkToRas, s.volume)
    outputs.markWritten(s.flagged)
    s.review = outputs.obtainOutput(s.app.scene, s.volume, "review", folder, created, notes)
    review.fillReviewTable(s.review, flagged_components(flagged, flagged.astype(np.float32), ORGANS, 0.027),
                           ijkToRas)
    s.logic = URSAMProcessLogic(s.app.appLogic, tempRoot=tmp_path_factory.mktemp("sessions"))
    ys, xs = np.nonzero(s.truth[WRONG] == 3)
    s.roi = s.app.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    geometry.placeRoi(s.roi, OrganBox(3, "spleen", [int(xs.min()), int(ys.min()), WRONG],
                                      [int(xs.max()), int(ys.max()), WRONG]), ijkToRas)
    s.before = masks(s.rectified, s.volume)
    s.flags_before = masks(s.flagged, s.volume)
    s.statuses_before = statuses(s.review)
    s.options = RunOptions()
    run = s.logic.correction.start(s.volume, "spleen", s.roi, s.options, maxSlices=2)
    s.pid = s.logic.correction.session.process.proc.pid
    s.first = run.wait(timeout=600)
    s.first_seconds = run.seconds
    s.after = masks(s.rectified, s.volume)
    s.flags_after = masks(s.flagged, s.volume)
    s.statuses_after = statuses(s.review)
    yield s
    s.logic.correction.endSession()


def test_the_correction_fixes_the_segment_in_place_and_no_other(scene):
    s = scene
    spleen, truth = s.after["spleen"], s.truth == 3
    assert dice(spleen[WRONG], truth[WRONG]) > dice(s.before["spleen"][WRONG], truth[WRONG]) + 0.3
    assert WRONG in s.first.changed
    changed = np.flatnonzero((spleen != s.before["spleen"]).any(axis=(1, 2))).tolist()
    assert changed == s.first.changed
    for name in ("liver", "kidney_right"):
        assert np.array_equal(s.after[name], s.before[name]), name
    assert not (spleen & (s.after["liver"] | s.after["kidney_right"])).any()


def test_the_worker_gives_what_the_engine_gives_in_this_process(scene, litemedsam):
    s = scene
    orientation = Orientation.of(geometry.snapshotVolume(s.volume).reference())
    volume = orientation.to_canonical(slicer.util.arrayFromVolume(s.volume).astype(np.float32))
    labels = orientation.to_canonical(s.labels)
    ys, xs = np.nonzero(orientation.to_canonical(s.truth)[WRONG] == 3)
    here = correct_organ(SliceSam(litemedsam, volume, zoom=False), labels, 3,
                         SliceBox(WRONG, int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())),
                         CorrectionOptions(max_slices=2))
    expected = orientation.to_input(here.labels) == 3
    assert here.changed == s.first.changed
    assert np.count_nonzero(expected != s.after["spleen"]) <= 2


def test_the_flags_and_review_rows_of_the_corrected_slices_refresh(scene):
    s = scene
    assert not (s.flags_after["spleen"][s.first.changed]).any()
    assert np.array_equal(s.flags_after["liver"], s.flags_before["liver"])
    organs = [str(s.review.GetTable().GetColumnByName("Organ").GetValue(r)) for r in range(len(s.statuses_after))]
    assert [st for st, o in zip(s.statuses_after, organs) if o == "spleen"] == [CORRECTED]
    assert {st for st, o in zip(s.statuses_after, organs) if o != "spleen"} == {"pending"}
    assert not outputs.wasEdited(s.flagged)  # URSAM's own refresh: a rerun may replace the node
    assert outputs.wasEdited(s.rectified)  # the reviewer's correction: a rerun keeps it


def test_the_next_correction_pays_no_start_up_and_undo_restores_every_voxel(scene):
    s = scene
    run = s.logic.correction.start(s.volume, "spleen", s.roi, s.options, maxSlices=2)
    assert s.logic.correction.session.process.proc.pid == s.pid and run.progress[0] == "correcting"
    second = run.wait(timeout=300)
    assert second.info["encoder_calls"] == 0  # the slices' embeddings stayed in the worker
    assert second.changed == []  # the same box again: the slices already hold its masks
    assert s.logic.correction.undo(s.volume) is second
    now = masks(s.rectified, s.volume)
    assert all(np.array_equal(now[k], s.after[k]) for k in s.after)
    s.logic.correction.undo(s.volume)
    restored = masks(s.rectified, s.volume)
    for name in s.before:
        assert np.array_equal(restored[name], s.before[name]), name
    flags = masks(s.flagged, s.volume)
    for name in s.flags_before:
        assert np.array_equal(flags[name], s.flags_before[name]), name
    assert statuses(s.review) == s.statuses_before
    with pytest.raises(URSAMError, match="no correction to undo"):
        s.logic.correction.undo(s.volume)


def test_remove_from_a_slice_and_undo(scene):
    s = scene
    record = s.logic.correction.remove(s.volume, "liver", s.roi)
    liver = full_mask(s.rectified, "liver", s.volume)
    assert record.changed == [WRONG] and not liver[WRONG].any()
    s.logic.correction.undo(s.volume)
    assert np.array_equal(full_mask(s.rectified, "liver", s.volume), s.before["liver"])


@pytest.mark.skipif(os.name == "nt", reason="checks the POSIX process group")
def test_cancel_and_closing_the_session_end_the_worker(scene):
    s = scene
    run = s.logic.correction.start(s.volume, "spleen", s.roi, s.options)
    pid = s.logic.correction.session.process.proc.pid
    run.cancel()
    assert run.state == "cancelled" and s.logic.correction.session is None
    t0 = time.perf_counter()
    while jobs.processGroupAlive(pid) and time.perf_counter() - t0 < 5:
        time.sleep(0.01)
    assert not jobs.processGroupAlive(pid)
    assert np.array_equal(full_mask(s.rectified, "spleen", s.volume), s.before["spleen"])
    # a new session for the next correction; closing it (the scene closes) ends its process
    run = s.logic.correction.start(s.volume, "spleen", s.roi, s.options, propagate=False)
    session = s.logic.correction.session
    assert session.process.proc.pid != pid
    run.wait(timeout=600)
    s.logic.correction.undo(s.volume)
    s.logic.correction.endSession()
    assert not jobs.processGroupAlive(session.process.proc.pid) and not session.jobDir.exists()
