"""`ursam batch` on Dask: a cohort of real CT crops on a local cluster, failures recorded, resume after a kill."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
from distributed.diagnostics.plugin import SchedulerPlugin
from shared_data import ABD, HN, ROOT, case, names
from test_imageio import write_dicom

from URSAMLib.batch import executor
from URSAMLib.batch.scans import find_scans
from URSAMLib.boxes import boxes_from_labels, save_boxes
from URSAMLib.cli import main
from URSAMLib.imageio import read_ct
from URSAMLib.outputs import OUTPUT_FILES

#: three crops of tsA_slab, each a few slices: small enough that SAM runs in seconds
CROPS = {"a": (4, 7), "b": (12, 15), "c": (20, 23)}
ORGANS = [1, 2, 3, 13]  # liver, kidney_right, spleen, kidney_left
MASKS = ("ensemble", "uncertainty", "uncertain", "rectified")


def read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """The crops with their labels and box files, a corrupt scan, and a manifest of all four."""
    folder = tmp_path_factory.mktemp("cohort")
    image, labels = case(ABD, "tsA_slab")
    img, lab = sitk.ReadImage(str(image)), sitk.ReadImage(str(labels))
    lines = ["id,image,labels,boxes"]
    for name, (z0, z1) in CROPS.items():
        sitk.WriteImage(img[:, :, z0:z1], str(folder / f"{name}.nii.gz"))
        sitk.WriteImage(lab[:, :, z0:z1], str(folder / f"{name}_labels.nii.gz"))
        save_boxes(boxes_from_labels(sitk.GetArrayFromImage(lab[:, :, z0:z1]), names(ABD), labels=ORGANS),
                   folder / f"{name}_boxes.json")
        lines.append(f"{name},{name}.nii.gz,{name}_labels.nii.gz,{name}_boxes.json")
    (folder / "broken.nii.gz").write_bytes(b"this is no image file " * 20)
    lines.append("broken,broken.nii.gz,,a_boxes.json")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def two_workers(cohort, tmp_path_factory):
    """One batch of the cohort on a local cluster of two workers: its folder and exit code."""
    out = tmp_path_factory.mktemp("batch") / "out"
    code = main(["batch", str(cohort / "manifest.csv"), "--out", str(out), "--workers", "2", "--device", "cpu",
                 "--quiet"])
    return out, code


@pytest.fixture(scope="module")
def sequential(cohort, tmp_path_factory):
    """`ursam segment` on each crop, one after another, with the same (default) seed."""
    outs = {}
    for name in CROPS:
        out = tmp_path_factory.mktemp("seq") / name
        assert main(["segment", str(cohort / f"{name}.nii.gz"), "--boxes", str(cohort / f"{name}_boxes.json"),
                     "--reference", str(cohort / f"{name}_labels.nii.gz"), "--out", str(out), "--device", "cpu",
                     "--quiet"]) == 0
        outs[name] = out
    return outs


def test_two_workers_match_sequential_segment_and_record_the_corrupt_scan(two_workers, sequential, cohort):
    out, code = two_workers
    assert code == 1  # one scan failed, the others finished
    for name in CROPS:
        assert sorted(p.name for p in (out / name).iterdir()) == sorted(OUTPUT_FILES)
        for mask in MASKS:
            assert np.array_equal(read(out / name / f"{mask}.nii.gz"), read(sequential[name] / f"{mask}.nii.gz")), \
                (name, mask)
        report = json.loads((out / name / "report.json").read_text(encoding="utf-8"))
        assert len(report["batch"]["hash"]) == 64
        assert report["inputs"]["image"] == str(cohort / f"{name}.nii.gz")
    assert not (out / "broken").exists()  # nothing half-written for the scan that failed
    failed = read_csv(out / "failed.csv")
    assert [r["id"] for r in failed] == ["broken"]
    assert failed[0]["error"].startswith("cannot read image: not an image or a corrupt file")
    assert str(cohort / "broken.nii.gz") in failed[0]["error"]
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "## Scans to review first" in summary and "| broken | cannot read image" in summary


def test_summary_volumes_and_dice_are_those_of_each_report(two_workers):
    out, _ = two_workers
    rows = read_csv(out / "summary.csv")
    assert [r for r in rows if r["id"] == "broken"] == [
        {"id": "broken", "organ": "", "label": "", "status": "failed", "volume_ml": "", "predicted_dice": "",
         "dice_low": "", "dice_high": "", "review": "", "mean_uncertainty": "", "flagged_ml": "",
         "flagged_share": "", "dice": "", "seconds": ""}]
    worst = {}
    for name in CROPS:
        report = json.loads((out / name / "report.json").read_text(encoding="utf-8"))
        mine = [r for r in rows if r["id"] == name]
        assert [r["organ"] for r in mine] == [o["name"] for o in report["organs"]]
        voxel_ml = np.prod(report["image"]["spacing_xyz"]) / 1000.0
        dice = report["dice_vs_reference"][report["rectified_method"]["name"]]
        for row, organ in zip(mine, report["organs"]):
            assert row["status"] == "done"
            assert float(row["volume_ml"]) == organ["rectified_ml"] > 0
            assert float(row["flagged_ml"]) == pytest.approx(organ["flagged_voxels"] * voxel_ml, abs=1e-3)
            assert float(row["flagged_share"]) == pytest.approx(organ["flagged_fraction"], abs=1e-4)
            assert 0 < organ["flagged_fraction"] == organ["flagged_voxels"] / organ["flagged_or_rectified_voxels"] < 1
            assert float(row["dice"]) == pytest.approx(dice[organ["name"]], abs=1e-4)
            assert float(row["dice"]) > 0.5  # SAM inside boxes from the labels finds these organs
            quality = organ["quality"]
            assert float(row["predicted_dice"]) == pytest.approx(quality["predicted_dice"], abs=1e-4)
            assert [float(row["dice_low"]), float(row["dice_high"])] == pytest.approx(quality["interval"], abs=1e-4)
            assert row["review"] == quality["review"] in ("check", "ok")
        worst[name] = min((o["quality"]["predicted_dice"], o["name"]) for o in report["organs"])
    # The review table ranks the scans by their worst organ's predicted Dice, lowest first, and names it.
    table = (out / "summary.md").read_text(encoding="utf-8").split("## Scans to review first")[1].split("##")[0]
    listed = [[c.strip() for c in line.split("|")[1:4]] for line in table.splitlines()
              if line.startswith("| ") and line.split("|")[1].strip() in CROPS]
    assert [scan for scan, _, _ in listed] == sorted(CROPS, key=lambda n: worst[n])
    for scan, organ, predicted in listed:
        assert organ == worst[scan][1] and float(predicted) == pytest.approx(worst[scan][0], abs=1e-3)


class CountTasks(SchedulerPlugin):
    """A scheduler plugin that records the keys of the tasks that started running."""

    name = "count-tasks"

    def __init__(self):
        self.keys = []

    def transition(self, key, start, finish, *args, **kwargs):
        if finish == "processing":
            self.keys.append(str(key))


def _tasks(counter):
    return [k for k in counter.keys if k.startswith("ursam-segment-")]


def test_a_killed_run_resumes_with_only_the_missing_scans(cohort, tmp_path):
    from distributed import LocalCluster  # noqa: PLC0415 (Dask loads only where a cluster runs)

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "URSAM"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.Popen([sys.executable, "-m", "URSAMLib.cli", "batch", str(cohort / "manifest.csv"), "--out",
                            str(out), "--workers", "1", "--device", "cpu", "--quiet"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600

        def summarized():  # a scan's folder is in place before the coordinator writes its summary row
            rows = read_csv(out / "summary.csv") if (out / "summary.csv").is_file() else []
            return {r["id"] for r in rows if r["status"] == "done"}

        while not summarized():
            assert run.poll() is None and time.monotonic() < deadline, "the batch ended before any scan finished"
            time.sleep(0.2)
    finally:
        os.killpg(run.pid, signal.SIGKILL)  # the batch and its cluster, all at once
        run.wait()
    finished = [n for n in CROPS if (out / n / "report.json").exists()]
    missing = [n for n in CROPS if n not in finished] + ["broken"]
    assert 1 <= len(finished) < len(CROPS)
    stamps = {n: (out / n / "report.json").stat().st_mtime_ns for n in finished}
    # written as the run went: every scan it calls done has its outputs (one may have finished since)
    done = summarized()
    assert done and done <= set(finished)

    counter = CountTasks()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        cluster.scheduler.add_plugin(counter)
        args = ["batch", str(cohort / "manifest.csv"), "--out", str(out), "--scheduler", cluster.scheduler_address,
                "--device", "cpu", "--quiet"]
        assert main(args) == 1
        assert len(_tasks(counter)) == len(missing)  # one task per missing scan; the corrupt one is retried
        for n in CROPS:
            assert sorted(p.name for p in (out / n).iterdir()) == sorted(OUTPUT_FILES)
        assert {n: (out / n / "report.json").stat().st_mtime_ns for n in finished} == stamps
        status = {r["id"]: r["status"] for r in read_csv(out / "summary.csv")}
        assert status == {**{n: "done before" for n in finished}, **{n: "done" for n in missing if n != "broken"},
                          "broken": "failed"}
        # Once more: only the failed scan runs again.
        before = len(_tasks(counter))
        assert main(args) == 1
        assert len(_tasks(counter)) - before == 1
    assert not [p for p in out.iterdir() if ".partial-" in p.name]  # the killed run's staging folder is gone


def test_other_settings_in_the_same_folder_are_refused(two_workers, cohort, capsys):
    out, _ = two_workers
    assert main(["batch", str(cohort / "manifest.csv"), "--out", str(out), "--n-aug", "5", "--quiet"]) == 2
    assert "output folder holds a batch run with other settings" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Inputs and arguments (no SAM)

def test_a_folder_of_scans_gives_files_and_dicom_series(tmp_path):
    img = sitk.ReadImage(str(case(ABD, "tsA_slab")[0]))[:, :, 10:13]
    sitk.WriteImage(img, str(tmp_path / "one.nii.gz"))
    sitk.WriteImage(img, str(tmp_path / "two.nrrd"))
    sitk.WriteImage(img, str(tmp_path / "three.mha"))
    write_dicom(img, tmp_path / "four")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a scan")
    (tmp_path / "manifest.txt").write_text("not a scan either")
    skipped = []
    scans = find_scans(tmp_path, skipped)
    assert [(s.id, os.path.basename(s.image)) for s in scans] == [
        ("four", "four"), ("one", "one.nii.gz"), ("three", "three.mha"), ("two", "two.nrrd")]
    assert skipped == [(str(tmp_path / "notes"), "no DICOM series in it")]
    _, volume = read_ct(scans[0].image)  # the DICOM folder reads as the scan it holds
    assert np.array_equal(volume, sitk.GetArrayFromImage(img).astype(np.float32))


@pytest.mark.parametrize("manifest, message", [
    ("id,path\na,a.nii.gz\n", "manifest needs a header with the columns id and image"),
    ("id,image\na,a.nii.gz\na,b.nii.gz\n", "manifest lists the id 'a' twice"),
    ("id,image\n../up,a.nii.gz\n", "cannot name an output folder"),
    ("id,image,weight\na,a.nii.gz,3\n", "unknown column(s) weight"),
    ("id,image\na,a.nii.gz\n", "every scan needs boxes"),
])
def test_bad_manifests_are_bad_arguments(tmp_path, capsys, manifest, message):
    path = tmp_path / "manifest.csv"
    path.write_text(manifest, encoding="utf-8")
    assert main(["batch", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err
    assert not (tmp_path / "out").exists()


def test_bad_executor_arguments(tmp_path, capsys, cohort, monkeypatch):
    monkeypatch.setattr(executor, "CONNECT_TIMEOUT_S", 2)  # nothing listens there: no need to wait 30 s
    assert main(["batch", str(cohort / "manifest.csv"), "--out", str(tmp_path / "o"), "--workers", "0"]) == 2
    assert "--workers must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: the two are exclusive
        main(["batch", str(cohort / "manifest.csv"), "--out", str(tmp_path / "o"), "--workers", "2",
              "--scheduler", "tcp://127.0.0.1:1"])
    assert main(["batch", str(cohort / "manifest.csv"), "--out", str(tmp_path / "o"), "--scheduler",
                 "tcp://127.0.0.1:9", "--quiet"]) == 2
    assert "cannot reach the Dask scheduler" in capsys.readouterr().err



def test_a_bad_calibration_is_one_error_before_any_scan(tmp_path, capsys, cohort):
    """--calibration is read once, before the cluster starts: a missing file is exit 2 naming it, and no scan
    runs; without --templates it is refused as it is by ursam segment."""
    first = next(iter(CROPS))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"id,image\n{first},{cohort / (first + '.nii.gz')}\n", encoding="utf-8")
    missing = tmp_path / "nope.json"
    assert main(["batch", str(manifest), "--templates", str(ABD), "--calibration", str(missing),
                 "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ursam: error: calibration file not found") and str(missing) in err[-1]
    assert not (tmp_path / "out").exists()
    assert main(["batch", str(cohort / "manifest.csv"), "--calibration", str(missing),
                 "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "--calibration goes with --templates" in capsys.readouterr().err

# ----------------------------------------------------------------------------------------------
# ursam evaluate on the same executor

@pytest.fixture(scope="module")
def two_query_dataset(tmp_path_factory):
    """pt_34 and pt_59 as queries, pt_4 and pt_13 as supports (links to the shared data)."""

    ds = tmp_path_factory.mktemp("hn2")
    (ds / "cases").mkdir()
    for c in ("pt_4", "pt_13", "pt_34", "pt_59"):
        (ds / "cases" / c).symlink_to(HN / "cases" / c, target_is_directory=True)
    meta = json.loads((HN / "dataset.json").read_text(encoding="utf-8"))
    (ds / "dataset.json").write_text(json.dumps({"name": "hn-two", "labels": meta["labels"],
                                                 "support": ["pt_4", "pt_13"], "query": ["pt_34", "pt_59"]}))
    return ds


@pytest.mark.slow
def test_evaluate_on_two_workers_scores_as_one_after_another(two_query_dataset, tmp_path):
    args = ["evaluate", str(two_query_dataset), "--methods", "atlas", "--organs", "Brainstem,Mandible",
            "--prompts", "box3d", "--deformable", "none", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "here")]) == 0
    assert main(args + ["--out", str(tmp_path / "dask"), "--workers", "2"]) == 0
    here, dask = read_csv(tmp_path / "here" / "results.csv"), read_csv(tmp_path / "dask" / "results.csv")
    assert [r["case"] for r in dask] == ["pt_34", "pt_34", "pt_59", "pt_59"]  # the cases' order, not the finish order
    assert dask == here
    assert float(next(r for r in dask if r["organ"] == "Brainstem")["dice"]) > 0.5


def test_workers_and_support_workers_are_checked(two_query_dataset, tmp_path, capsys):
    base = ["evaluate", str(two_query_dataset), "--out", str(tmp_path / "e"), "--quiet"]
    assert main(base + ["--workers", "0"]) == 2
    assert "--workers must be at least 1, got 0" in capsys.readouterr().err
    assert main(base + ["--support-workers", "0"]) == 2
    assert "--support-workers must be at least 1, got 0" in capsys.readouterr().err


def test_scans_are_ranked_by_their_worst_predicted_organ():
    from URSAMLib.batch.summary import review_order, rows_from_report, scan_figures  # noqa: PLC0415

    def report(predicted, flagged):
        organs = [{"name": n, "label": i + 1, "rectified_ml": 10.0, "flagged_voxels": flagged,
                   "flagged_fraction": flagged / 100, "flagged_or_rectified_voxels": 100,
                   "quality": {"predicted_dice": d, "interval": [d - 0.1, min(d + 0.1, 1.0)],
                               "review": "check" if d < 0.6 else "ok", "slices": []}}
                  for i, (n, d) in enumerate(predicted.items())]
        return {"image": {"spacing_xyz": [1, 1, 1]}, "organs": organs}

    reports = {"s1": report({"Liver": 0.95, "Spleen": 0.7}, 5),        # worst 0.7
               "s2": report({"Liver": 0.9, "Spleen": 0.4}, 1),         # worst 0.4: first, though least flagged
               "s3": report({"Liver": 0.8, "Spleen": 0.85}, 50)}       # worst 0.8
    no_quality = report({"Liver": 0.5}, 90)
    del no_quality["organs"][0]["quality"]
    reports["s4"] = no_quality                                          # no estimate: last
    figures = {i: scan_figures(rows_from_report(i, r, "done")) for i, r in reports.items()}
    assert review_order(figures) == ["s2", "s1", "s3", "s4"]
    assert figures["s2"]["worst_organ"] == "Spleen" and figures["s2"]["to_check"] == ["Spleen"]
    assert figures["s4"]["worst_predicted_dice"] is None
