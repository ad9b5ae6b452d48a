"""The worker process through the Slicer logic: a real ``python -m URSAMMRML.worker`` on a real CT.

The query is the 7-slice crop of tsA_slab and the library abdomen-ts (as in test_prompt_modes), in
slice mode with the atlas prior, n = 2 and no deformable stage, so that one run costs seconds: the
checks are of the process wiring (the same nodes as the in-process engine, progress, Cancel, failures),
not of accuracy.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import slicer
from slicer_scene import SlicerApp, full_mask, voxel_hash

from URSAMLib.boxes import boxes_from_labels
from URSAMLib.errors import Cancelled, URSAMError
from URSAMLib.progress import STAGE_EMBED, STAGE_MODEL, STAGE_WRITE, stage_of
from URSAMMRML import geometry, jobs, outputs, worker
from URSAMMRML.logic import RunOptions, URSAMProcessLogic, workerJob

ORGANS = {2: "kidney_right", 3: "spleen"}
OPTIONS = dict(prompts="slice", deformable="none", nAug=2)
SEGMENTATIONS = ("ensemble", "rectified", "flagged")


def table_rows(node):
    table = node.GetTable()
    return [[table.GetValue(r, c).ToString() for c in range(table.GetNumberOfColumns())]
            for r in range(table.GetNumberOfRows())]


def table_dicts(node):
    """The table's rows as ``{column name: text}``."""
    table = node.GetTable()
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    return [dict(zip(names, row)) for row in table_rows(node)]


def temp_listing(folder):
    return sorted(p.name for p in Path(folder).iterdir())


class Run:
    pass


@pytest.fixture(scope="module")
def runs(slab_paths, crop_paths, litemedsam, tmp_path_factory):
    """The same job in a worker process (scene A) and in this process (scene B)."""
    r = Run()
    r.library = slab_paths[0].parents[2]
    r.temp = tmp_path_factory.mktemp("jobs")
    r.app = SlicerApp()
    r.volume = r.app.loadVolume(crop_paths[0], "tsA crop")
    r.hash_before = voxel_hash(r.volume)
    r.logic = URSAMProcessLogic(r.app.appLogic, tempRoot=r.temp)
    job = r.logic.prepareSegmentation(r.volume, library=r.library, organs=list(ORGANS.values()), **OPTIONS)
    t0 = time.perf_counter()
    r.run = r.logic.startJob(job)
    r.job_dir = r.run.jobDir
    r.job_files = None
    r.events, r.polls = [], 0
    while not r.run.done:
        if r.job_files is None and r.job_dir.exists():
            r.job_files = sorted(p.name for p in r.job_dir.iterdir())
        r.events += r.run.poll()
        r.polls += 1
        time.sleep(0.05)
    r.seconds = time.perf_counter() - t0
    assert r.run.error is None, r.run.error
    r.outputs = r.run.outputs

    r.app_b = SlicerApp()
    r.volume_b = r.app_b.loadVolume(crop_paths[0], "tsA crop")
    r.logic_b = URSAMProcessLogic(r.app_b.appLogic)
    r.stages_b = []
    r.outputs_b = r.logic_b.process(r.volume_b, library=r.library, organs=list(ORGANS.values()),
                                    backend=litemedsam, progress=lambda s, i, n: r.stages_b.append((s, i, n)),
                                    **OPTIONS)
    return r


def test_the_worker_result_is_in_the_nodes_exactly(runs):
    """What the worker computed is what the scene shows: its label maps and uncertainty, voxel for voxel."""
    a, maps = runs.outputs, runs.run.computed.maps
    assert runs.run.state == "done" and runs.polls > 3  # the caller kept polling while the worker ran
    result = runs.run.computed.result
    assert result.inputs["prompts"]["mode"] == "slice" and result.rectified_method == "ursam+atlas"
    for role in SEGMENTATIONS:
        for label, organ in maps["organs"]:
            mask = full_mask(a.nodes[role], organ, runs.volume)
            assert np.array_equal(mask, maps[role] == label), (role, organ)
            if role != "flagged":
                assert mask.sum() > 100, (role, organ)
    assert np.array_equal(slicer.util.arrayFromVolume(a.uncertainty), maps["uncertainty"])
    assert [row[0] for row in table_rows(a.statistics)] == [organ for _, organ in maps["organs"]]


def mismatch(x, y):
    return int(np.count_nonzero(x != y))


def test_the_worker_makes_the_nodes_the_in_process_engine_makes(runs):
    """The same job in the worker process and in this one. The engine repeats itself only to float
    rounding: two runs in one process differ by up to 1e-6 in an organ's mean probability (measured),
    so a voxel at 0.5 may fall either way and the entropies agree to 1e-4."""
    a, b = runs.outputs, runs.outputs_b
    result, result_b = runs.run.computed.result, runs.logic_b._cache[runs.volume_b.GetID()].result
    assert result.backend == result_b.backend  # the same model on the same encoder path
    for role in SEGMENTATIONS:
        for organ in ORGANS.values():
            mask, mask_b = full_mask(a.nodes[role], organ, runs.volume), full_mask(b.nodes[role], organ,
                                                                                   runs.volume_b)
            assert mismatch(mask, mask_b) <= max(2, mask_b.sum() // 1000), (role, organ, mismatch(mask, mask_b))
    assert np.allclose(slicer.util.arrayFromVolume(a.uncertainty), slicer.util.arrayFromVolume(b.uncertainty),
                       atol=1e-4)
    stats, stats_b = table_dicts(a.statistics), table_dicts(b.statistics)
    same = ("Organ", "Label", "Prompts", "Review")
    assert [[r[k] for k in same] for r in stats] == [[r[k] for k in same] for r in stats_b]
    close = ("Volume", "Ensemble volume", "Mean uncertainty", "Predicted Dice")
    for row, row_b in zip(stats, stats_b):
        assert np.allclose([float(row[k]) for k in close], [float(row_b[k]) for k in close], rtol=1e-2, atol=1e-3)
    assert table_rows(a.review) and table_rows(b.review)
    assert sorted(r.GetName() for r in a.rois) == sorted(ORGANS.values())
    snapshot_a, snapshot_b = geometry.snapshotVolume(runs.volume), geometry.snapshotVolume(runs.volume_b)
    for roi in a.rois:
        roi_b = next(x for x in b.rois if x.GetName() == roi.GetName())
        label = int(roi.GetAttribute(outputs.ORGAN_LABEL))
        box_a, box_b = geometry.boxFromRoi(roi, snapshot_a, label), geometry.boxFromRoi(roi_b, snapshot_b, label)
        assert (box_a.min_ijk, box_a.max_ijk) == (box_b.min_ijk, box_b.max_ijk)
    assert [b.to_json() for b in result.boxes] == [b.to_json() for b in result_b.boxes]  # the same prompts
    assert a.notes == b.notes


def test_progress_events_arrive_in_order(runs):
    progress = [(e["stage"], e["done"], e["total"]) for e in runs.events if e["event"] == "progress"]
    # the worker loads its own model; the in-process run had the session's
    assert [p for p in progress if stage_of(p[0]) == STAGE_MODEL] == [(f"{STAGE_MODEL} litemedsam", 0, 0)]
    worker_stages = [p for p in progress if stage_of(p[0]) != STAGE_MODEL]
    assert worker_stages == [p for p in runs.stages_b if stage_of(p[0]) != STAGE_MODEL]
    embed = [done for stage, done, total in worker_stages if stage == STAGE_EMBED]
    assert embed == sorted(embed) and embed[-1] == 7  # one step per slice of the crop
    assert worker_stages[-1][0] == STAGE_WRITE
    kinds = [e["event"] for e in runs.events]
    assert kinds.index("done") == len(kinds) - 2  # then only the logic's own "writing results"
    assert set(kinds) <= {"progress", "warning", "done"}


def test_the_job_folder_held_the_input_and_is_gone_and_the_input_is_unchanged(runs):
    assert {worker.JOB_FILE, worker.INPUT_FILE} <= set(runs.job_files)
    assert not runs.job_dir.exists() and temp_listing(runs.temp) == []
    assert voxel_hash(runs.volume) == runs.hash_before


def test_rectify_after_a_worker_run_needs_no_model(runs):
    assert runs.logic._backends == {}  # this process never loaded SAM
    a = runs.logic.rectify(runs.volume, fixedThreshold=0.05, atlasPrior=False)
    b = runs.logic_b.rectify(runs.volume_b, fixedThreshold=0.05, atlasPrior=False)
    assert runs.logic._backends == {}
    assert runs.logic._cache[runs.volume.GetID()].result.rectified_method == "ursam"
    maps = runs.logic._cache[runs.volume.GetID()].maps
    for label, organ in maps["organs"]:
        mask = full_mask(a.rectified, organ, runs.volume)
        assert np.array_equal(mask, maps["rectified"] == label)
        mask_b = full_mask(b.rectified, organ, runs.volume_b)
        assert mismatch(mask, mask_b) <= max(2, mask_b.sum() // 1000), organ


def roi_job(logic, volume, labels, slices):
    scene = volume.GetScene()
    snapshot = geometry.snapshotVolume(volume)
    rois = []
    for box in boxes_from_labels(labels, ORGANS):
        box.min_ijk[2], box.max_ijk[2] = slices
        roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", box.name)
        geometry.placeRoi(roi, box, snapshot.ijkToRas)
        rois.append(roi)
    return logic.prepareSegmentation(volume, rois=rois, prompts="box3d", nAug=3)


@pytest.mark.skipif(os.name == "nt", reason="checks the POSIX process group")
def test_cancel_mid_run_ends_the_process_at_once_and_leaves_everything_as_it_was(crop_paths, tmp_path):
    app = SlicerApp()
    volume = app.loadVolume(crop_paths[0], "tsA crop")
    labels = slicer.util.arrayFromVolume(app.loadVolume(crop_paths[1], "labels")).copy()
    logic = URSAMProcessLogic(app.appLogic, tempRoot=tmp_path)
    job = roi_job(logic, volume, labels, (0, 6))
    ids, items, hash_before = app.nodeIDs(), app.scene.GetSubjectHierarchyNode().GetNumberOfItems(), voxel_hash(volume)
    listing = temp_listing(tmp_path)
    run = logic.startJob(job)
    pid = run.process.proc.pid
    deadline = time.perf_counter() + 120
    while run.progress[0] != STAGE_EMBED or run.progress[1] < 1:  # in the middle of the SAM loop
        run.poll()
        assert not run.done, run.error
        assert time.perf_counter() < deadline
        time.sleep(0.02)
    assert jobs.processGroupAlive(pid)
    t0 = time.perf_counter()
    run.cancel()
    while jobs.processGroupAlive(pid) and time.perf_counter() - t0 < 5:
        time.sleep(0.01)
    latency = time.perf_counter() - t0
    assert not jobs.processGroupAlive(pid) and latency < 2.0, latency
    assert run.state == "cancelled" and isinstance(run.error, Cancelled)
    assert app.nodeIDs() == ids and app.scene.GetSubjectHierarchyNode().GetNumberOfItems() == items
    assert voxel_hash(volume) == hash_before
    assert temp_listing(tmp_path) == listing
    assert not logic.hasCachedResult(volume)
    assert run.poll() == [] and run.state == "cancelled"


def test_a_worker_that_fails_on_a_corrupt_input_says_so_in_one_line_and_leaves_nothing(crop_paths, tmp_path):
    app = SlicerApp()
    volume = app.loadVolume(crop_paths[0], "tsA crop")
    labels = slicer.util.arrayFromVolume(app.loadVolume(crop_paths[1], "labels")).copy()
    logic = URSAMProcessLogic(app.appLogic, tempRoot=tmp_path)
    job = roi_job(logic, volume, labels, (2, 3))
    ids = app.nodeIDs()
    run = logic.startJob(job, start=False)
    path = run.jobDir / worker.INPUT_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a cut-off file, as a full disk leaves it
    run.start()
    with pytest.raises(URSAMError) as err:
        run.wait(timeout=120)
    message = str(err.value)
    assert "\n" not in message and "truncated or corrupt" in message and str(path) in message
    assert run.state == "failed" and run.process.returncode == worker.EXIT_BAD_INPUT
    assert app.nodeIDs() == ids and temp_listing(tmp_path) == []
    assert not logic.hasCachedResult(volume)


def test_a_worker_python_that_does_not_exist_is_named_and_leaves_nothing(crop_paths, tmp_path):
    app = SlicerApp()
    volume = app.loadVolume(crop_paths[0], "tsA crop")
    labels = slicer.util.arrayFromVolume(app.loadVolume(crop_paths[1], "labels")).copy()
    logic = URSAMProcessLogic(app.appLogic, python=str(tmp_path / "no-python"), tempRoot=tmp_path / "jobs")
    job = roi_job(logic, volume, labels, (2, 3))
    with pytest.raises(URSAMError, match="cannot start the URSAM worker with .*no-python"):
        logic.startJob(job)
    assert temp_listing(tmp_path / "jobs") == []


BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('slicer', 'vtk', 'vtkmodules', 'qt', 'ctk', 'PythonQt'):
            raise ImportError('the worker must not import ' + name)
sys.meta_path.insert(0, Block())
from URSAMMRML.worker import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_worker_imports_no_slicer_qt_or_vtk_and_localizes_as_the_logic_does(slab_paths, crop_paths, tmp_path):
    app = SlicerApp()
    volume = app.loadVolume(crop_paths[0], "tsA crop")
    logic = URSAMProcessLogic(app.appLogic)
    job = logic.prepareLocalization(volume, slab_paths[0].parents[2], ["spleen"], RunOptions(**OPTIONS))
    worker.write_job(tmp_path, workerJob(job))
    done = subprocess.run([sys.executable, "-c", BLOCKER, str(tmp_path)], cwd=jobs.MODULE_DIR,
                          env=jobs.workerEnvironment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert events[-1]["event"] == "done" and events[0]["stage"] == "localizing"
    outcome = worker.read_outcome(tmp_path)
    assert outcome.result is None
    in_process = logic.computeLocalization(job)
    assert [b.to_json() for b in outcome.localized] == [b.to_json() for b in in_process.boxes]


@pytest.mark.skipif(os.name == "nt", reason="uses a POSIX stand-in for the parent")
def test_a_worker_whose_slicer_died_ends_itself(crop_paths, tmp_path):
    app = SlicerApp()
    volume = app.loadVolume(crop_paths[0], "tsA crop")
    labels = slicer.util.arrayFromVolume(app.loadVolume(crop_paths[1], "labels")).copy()
    logic = URSAMProcessLogic(app.appLogic)
    worker.write_job(tmp_path, workerJob(roi_job(logic, volume, labels, (0, 6))))
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    process = jobs.WorkerProcess(tmp_path, parentPid=parent.pid).start()
    time.sleep(0.5)
    parent.kill()
    parent.wait()
    t0 = time.perf_counter()
    process.wait(timeout=30)
    assert process.returncode == worker.EXIT_ORPHANED, process.lastLogLine()
    assert time.perf_counter() - t0 < 2.0
    assert not (tmp_path / worker.OUTCOME_FILE).exists()
