"""`ursam evaluate` on one real H&N query with two supports: files, scores, resume."""
import csv
import json
import math
import subprocess
import sys

import pytest
import SimpleITK as sitk
from shared_data import HN

from URSAMLib.cli import main as ursam
from URSAMLib.errors import URSAMError
from URSAMLib.evaluation.evaluate import ALL_METHODS, parse_methods
from URSAMLib.metrics import dice
from URSAMLib.quality.features import FEATURES

ORGANS = ("Brainstem", "Parotid_L")


@pytest.fixture(scope="module")
def one_query_dataset(tmp_path_factory):
    """pt_34 as the query, pt_4 and pt_13 as supports (links to the shared data)."""
    ds = tmp_path_factory.mktemp("hn1")
    (ds / "cases").mkdir()
    for c in ("pt_4", "pt_13", "pt_34"):
        (ds / "cases" / c).symlink_to(HN / "cases" / c, target_is_directory=True)
    meta = json.loads((HN / "dataset.json").read_text(encoding="utf-8"))
    (ds / "dataset.json").write_text(json.dumps({"name": "hn-one", "labels": meta["labels"],
                                                 "support": ["pt_4", "pt_13"], "query": ["pt_34"]}))
    return ds


@pytest.fixture(scope="module")
def evaluated(one_query_dataset, tmp_path_factory):
    """One default evaluation of the query: its folder, its arguments and what it printed."""
    out = tmp_path_factory.mktemp("eval") / "eval"
    args = ["evaluate", str(one_query_dataset), "--organs", ",".join(ORGANS), "--out", str(out)]
    printed = subprocess.run([sys.executable, "-m", "URSAMLib.cli", *args, "--quiet"], capture_output=True,
                             text=True, encoding="utf-8")
    assert printed.returncode == 0, printed.stderr
    return out, args, printed.stdout


@pytest.mark.slow
def test_evaluate_writes_results_table_and_plot_then_resumes(evaluated, capsys):
    out, args, printed = evaluated
    assert "| UR-SAM |" in printed and "| Atlas" in printed

    rows = list(csv.DictReader((out / "results.csv").open()))
    # The default prompt mode (slice) warps the support labels, so rows come with it: UR-SAM with the atlas
    # prior in rectification (on by default), and three label fusions of those warps (majority vote, locally
    # weighted vote, STAPLE). The library has no calibration, so no row of the calibrated fusion.
    methods = set(ALL_METHODS) | {"ursam+atlas", "atlas@demons", "atlas-lw@demons", "atlas-staple@demons"}
    assert len(rows) == len(ORGANS) * len(methods)
    assert {r["method"] for r in rows} == methods
    assert {r["organ"] for r in rows} == set(ORGANS)
    assert {r["case"] for r in rows} == {"pt_34"}
    by = {(r["organ"], r["method"]): r for r in rows}
    for organ in ORGANS:
        for m in methods:
            d = float(by[organ, m]["dice"])
            assert 0.0 <= d <= 1.0
        # Real outcomes: SAM inside the localized box and the atlas both find the organ.
        assert float(by[organ, "ensemble"]["dice"]) > 0.3, by[organ, "ensemble"]
        assert float(by[organ, "atlas"]["dice"]) > 0.3, by[organ, "atlas"]
        assert float(by[organ, "auto"]["box_iou"]) >= 0.3
        assert float(by[organ, "auto"]["centre_error_mm"]) < 20
        # Uncertainty is scored on the ensemble rows: mean entropy in (0, log 2], AUROC a probability.
        u = float(by[organ, "ensemble"]["mean_uncertainty"])
        assert 0 < u <= math.log(2)
        assert 0.5 < float(by[organ, "ensemble"]["uncertainty_auroc"]) <= 1.0
        assert float(by[organ, "ensemble"]["truth_voxels"]) > 0

    table = (out / "table.md").read_text(encoding="utf-8")
    header = next(line for line in table.splitlines() if line.startswith("| method |"))
    assert header == "| method | Brainstem | Parotid_L | Avg |"
    for label in ("Auto prompting", "Ensemble", "Unc-FPC", "Unc-FNC", "Unc-FPNC", "UR-SAM", "Manual prompting",
                  "Atlas"):
        assert f"| {label}" in table
    assert "ground-truth slices only" in table
    png = (out / "dice_boxplot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    info = summary["case_info"]["pt_34"]
    assert set(info["localization"]["registration_seconds"]) == {"pt_4", "pt_13"}
    # All methods, the manual prompts included, shared one encoder pass per slice.
    assert info["sam_timings"]["encoder_calls"] == info["sam_timings"]["distinct_slices"] > 0
    # The quality section: each organ's predicted Dice beside the true Dice of the written result, the
    # share of its error voxels on its top ranked slices, the error map's voxel AUROC.
    written = {r["organ"]: float(r["dice"]) for r in rows if r["method"] == info["rectified_method"]}
    assert {q["organ"]: q["true_dice"] for q in info["quality"]} == pytest.approx(written, abs=1e-6)
    for q in info["quality"]:
        assert 0.0 <= q["low"] <= q["predicted"] <= q["high"] <= 1.0 and q["review"] in ("check", "ok")
        assert sum(q["errors_per_slice"]) <= q["total_errors"] and q["total_errors"] > 0
        assert len(q["slices"]) == len(set(q["slices"])) == len(q["expected_per_slice"])
        # No calibration: no error map ships (SAM's probabilities are not calibrated), so none is scored.
        assert q["auroc"] is None and not q["calibrated"]
        # the Dice model's inputs as the run saw them, every one a number
        assert set(FEATURES) <= set(q["features"]) and all(math.isfinite(v) for v in q["features"].values())
        assert q["features"]["expected_dice"] == pytest.approx(q["predicted"], abs=1e-4)
    quality = summary["quality"]
    assert quality["dice"]["n"] == len(ORGANS)
    assert quality["dice"]["mae"] == pytest.approx(
        sum(abs(q["predicted"] - q["true_dice"]) for q in info["quality"]) / len(ORGANS), abs=1e-3)
    assert 0.0 < quality["slices"]["top20"] <= quality["slices"]["oracle20"] <= 1.0
    assert "## Quality estimate" in table and "## Quality estimate" in printed

    # A rerun skips the finished case: same rows, and no model is loaded.
    before = (out / "results.csv").read_text(encoding="utf-8")
    assert ursam(args) == 0
    err = capsys.readouterr().err
    assert "pt_34: finished before, skipped" in err and "loading model" not in err
    assert (out / "results.csv").read_text(encoding="utf-8") == before
    # Other settings in the same folder are refused rather than mixed in.
    assert ursam(args + ["--n-aug", "5", "--quiet"]) == 2
    assert "output folder holds an evaluation with other settings" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_and_segment_agree_on_the_default_method(evaluated, one_query_dataset, tmp_path):
    """The mask evaluate scores under the default method's name is the one `ursam segment` writes as
    rectified.nii.gz with the same settings: per organ, the same Dice."""

    out, _, _ = evaluated
    query = one_query_dataset / "cases" / "pt_34"
    seg = tmp_path / "seg"
    assert ursam(["segment", str(query / "image.nii.gz"), "--templates", str(one_query_dataset),
                  "--organs", ",".join(ORGANS), "--out", str(seg), "--quiet"]) == 0
    report = json.loads((seg / "report.json").read_text(encoding="utf-8"))
    written = report["rectified_method"]["name"]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["case_info"]["pt_34"]["rectified_method"] == written == "ursam+atlas"
    rectified = sitk.GetArrayFromImage(sitk.ReadImage(str(seg / "rectified.nii.gz")))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(query / "labels.nii.gz")))
    names = {v: k for k, v in json.loads((one_query_dataset / "dataset.json").read_text())["labels"].items()}
    rows = {r["organ"]: float(r["dice"]) for r in csv.DictReader((out / "results.csv").open())
            if r["method"] == written}
    assert set(rows) == set(ORGANS)
    for organ in ORGANS:
        label = int(names[organ])
        assert rows[organ] == pytest.approx(dice(rectified == label, truth == label), abs=1e-6), organ
        assert rows[organ] > 0.3, organ
    # and the SAM ensemble too: the same SAM run under both commands
    ensemble = sitk.GetArrayFromImage(sitk.ReadImage(str(seg / "ensemble.nii.gz")))
    for r in csv.DictReader((out / "results.csv").open()):
        if r["method"] == "ensemble":
            label = int(names[r["organ"]])
            assert float(r["dice"]) == pytest.approx(dice(ensemble == label, truth == label), abs=1e-6)


def test_bad_methods_and_cases(one_query_dataset, tmp_path, capsys):
    with pytest.raises(URSAMError, match="unknown method"):
        parse_methods("auto,magic")
    assert parse_methods("atlas,auto") == ["auto", "atlas"]
    assert ursam(["evaluate", str(one_query_dataset), "--cases", "pt_4", "--out", str(tmp_path / "x")]) == 2
    assert "case 'pt_4' is a support scan; it cannot also be a query" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_compares_prompt_modes_side_by_side(one_query_dataset, tmp_path, capsys):
    """--prompts takes a list: each SAM method gets a row per mode, beside the atlas, with seconds."""
    out = tmp_path / "modes"
    args = ["evaluate", str(one_query_dataset), "--organs", "Brainstem", "--methods", "ensemble,ursam,atlas",
            "--prompts", "box3d,slice", "--deformable", "none", "--out", str(out), "--quiet"]
    assert ursam(args) == 0
    capsys.readouterr()
    rows = list(csv.DictReader((out / "results.csv").open()))
    dice = {r["method"]: float(r["dice"]) for r in rows}
    assert {"ensemble@box3d", "ensemble@slice", "ursam@box3d", "ursam@slice", "atlas"} <= set(dice)
    # Both modes find the brainstem (box3d's prompt is the localized box, slice's the warped labels).
    assert dice["ensemble@box3d"] > 0.3 and dice["ensemble@slice"] > 0.3, dice
    table = (out / "table.md").read_text(encoding="utf-8")
    assert "## Prompt modes" in table
    section = table[table.index("## Prompt modes"):]
    for mode in ("| box3d |", "| slice |", "| Atlas"):
        assert mode in section
    info = json.loads((out / "summary.json").read_text(encoding="utf-8"))["case_info"]["pt_34"]
    assert set(info["mode_seconds_alone"]) == {"box3d", "slice"}
    assert all(s > 0 for s in info["mode_seconds_alone"].values())
