"""Apply to results through the Slicer logic's worker process, and how fast Cancel ends it.

Loads a query CT into a real MRML scene (PyPI slicer-core, set up as Slicer sets it up), prepares the
job the panel's Segment prepares with no organ box checked (the panel's defaults: localize from the
template library, slice prompts, atlas prior, demons), starts the worker process and polls it every
0.1 s as the panel's timer does, until the results are in the scene. Prints the wall time from
Apply (the logic's start) to results and where it went: writing the job, the worker's start until its
first event, each engine stage, the worker's end until the nodes are written (main thread), and the
longest single poll (how long Slicer's main thread is held while the worker runs). Then starts the job
again --cancels times and cancels it once the worker is in the stage given (embedding by default),
measuring from cancel() until the worker's process group is gone. The last line is one JSON object.

    python3 benchmarks/slicer_worker.py [--data ../shared/data/hn-openkbp] [--case pt_34] [--cancels 3]
"""
import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "URSAM"))

import slicer  # noqa: E402

from URSAMLib.progress import STAGE_EMBED, stage_of  # noqa: E402
from URSAMMRML.jobs import processGroupAlive  # noqa: E402
from URSAMMRML.logic import URSAMProcessLogic  # noqa: E402


def scene_with_logics():
    """A scene with the logics Slicer attaches at start-up (as tests/slicer/slicer_scene.py)."""
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    logics = []
    for name, cls in (("Colors", slicer.vtkSlicerColorLogic),
                      ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
                      ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic)):
        logic = cls()
        logic.SetMRMLApplicationLogic(app_logic)
        logic.SetMRMLScene(scene)
        app_logic.SetModuleLogic(name, logic)
        logics.append(logic)
    for view in ("Red", "Yellow", "Green"):
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetLayoutName(view)
        composite.SetSingletonTag(view)
        scene.AddNode(composite)
    return scene, app_logic, logics


def load_volume(scene, path, name):
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    if not storage.ReadData(volume):
        raise SystemExit(f"could not read {path}")
    volume.SetAndObserveStorageNodeID(storage.GetID())
    return volume


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "hn-openkbp"))
    ap.add_argument("--case", default="pt_34")
    ap.add_argument("--cancels", type=int, default=3)
    ap.add_argument("--cancel-stage", default=STAGE_EMBED, help="cancel once the worker reports this stage")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--in-process", action="store_true",
                    help="also run the same job in this process (model loaded in the run), for the CPU ratio")
    args = ap.parse_args()
    data = Path(args.data)
    scene, app_logic, _logics = scene_with_logics()
    volume = load_volume(scene, data / "cases" / args.case / "image.nii.gz", args.case)
    temp = Path(tempfile.mkdtemp(prefix="ursam-bench-jobs-"))
    logic = URSAMProcessLogic(app_logic, tempRoot=temp)

    t0 = time.perf_counter()
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    job = logic.prepareSegmentation(volume, library=data, device=args.device)
    run = logic.startJob(job)
    t_started = time.perf_counter()
    first_event = None
    stages = {}
    longest_poll = 0.0
    while not run.done:
        p0 = time.perf_counter()
        events = run.poll()
        took = time.perf_counter() - p0
        if run.state == "running":
            longest_poll = max(longest_poll, took)
        now = time.perf_counter() - t0
        for event in events:
            if first_event is None:
                first_event = now
            if event.get("event") == "progress":
                stages.setdefault(stage_of(event["stage"]) or event["stage"], round(now, 2))
        if run.state == "writing":
            t_worker_end = time.perf_counter()
        time.sleep(0.1)
    t_end = time.perf_counter()
    if run.error is not None:
        raise run.error
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    worker_cpu = (children1.ru_utime - children0.ru_utime) + (children1.ru_stime - children0.ru_stime)
    result = {"case": args.case, "library": str(data), "supports": len(run.computed.localizeInfo["supports"]),
              "organs": len(run.computed.maps["organs"]), "prompts": run.computed.result.inputs["prompts"]["mode"],
              "apply_to_results_seconds": round(t_end - t0, 2),
              "write_job_seconds": round(t_started - t0, 2),
              "first_event_seconds": round(first_event or 0.0, 2),
              "stage_start_seconds": stages,
              "worker_seconds": round(run.process.endedAt - run.process.startedAt, 2),
              "worker_engine_seconds": round(run.computed.seconds, 2),
              "worker_cpu_seconds": round(worker_cpu, 1),
              "results_into_scene_seconds": round(t_end - t_worker_end, 2),
              "longest_poll_ms": round(1000 * longest_poll, 1),
              "load_average": [round(v, 2) for v in os.getloadavg()]}
    print("apply to results:", json.dumps(result), flush=True)

    if args.in_process:
        own = URSAMProcessLogic(app_logic)
        self0, p0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        own.process(volume, library=data, device=args.device)
        self1 = resource.getrusage(resource.RUSAGE_SELF)
        result["in_process_seconds"] = round(time.perf_counter() - p0, 2)
        result["in_process_cpu_seconds"] = round((self1.ru_utime - self0.ru_utime)
                                                 + (self1.ru_stime - self0.ru_stime), 1)
        print("in process:", json.dumps(result), flush=True)

    latencies = []
    for i in range(args.cancels):
        run = logic.startJob(logic.prepareSegmentation(volume, library=data, device=args.device))
        pid = run.process.proc.pid
        while not run.done and stage_of(run.progress[0]) != args.cancel_stage:
            run.poll()
            time.sleep(0.05)
        if run.done:
            raise SystemExit(f"the run ended before reaching {args.cancel_stage}")
        c0 = time.perf_counter()
        run.cancel()
        while processGroupAlive(pid):
            time.sleep(0.001)
        latencies.append(round(time.perf_counter() - c0, 3))
        assert not any(temp.iterdir()), "a job folder was left behind"
    result["cancel_stage"] = args.cancel_stage
    result["cancel_latency_seconds"] = latencies
    print(json.dumps(result))


if __name__ == "__main__":
    main()
