"""`ursam demo` end to end on a reduced synthetic cohort (no data needed)."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from URSAMLib.cli import main as ursam
from URSAMLib.evaluation.phantom import ORGANS, PhantomGrid, make_cohort, make_patient


def test_phantoms_differ_between_patients_and_have_ct_values():
    grid = PhantomGrid((64, 64, 16), (6.0, 6.0, 11.25))
    (im1, lab1), (_, lab2) = make_patient(1, grid), make_patient(2, grid)
    a1, l1 = sitk.GetArrayFromImage(im1), sitk.GetArrayFromImage(lab1)
    l2 = sitk.GetArrayFromImage(lab2)
    assert sorted(np.unique(l1)) == [0] + sorted(ORGANS)
    assert not np.array_equal(l1, l2)
    # Organ sizes vary between patients, HU values are CT-like.
    assert any(abs(int((l1 == v).sum()) - int((l2 == v).sum())) > 0.05 * (l1 == v).sum() for v in ORGANS)
    # Contrast-filled aorta brighter than the liver (blurred at this coarse size), air outside the body.
    assert a1.min() < -900 and 80 < np.median(a1[l1 == 1]) < 130 and np.median(a1[l1 == 4]) > np.median(a1[l1 == 1])
    # Seeded: the same seed gives the same patient.
    np.testing.assert_array_equal(sitk.GetArrayFromImage(make_patient(1, grid)[0]), a1)


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_small_cohort(tmp_path, capsys):
    out = tmp_path / "demo"
    assert ursam(["demo", "--out", str(out), "--size", "64,64,16", "--templates", "2", "--quiet",
                  "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "| method | liver | kidney_right | spleen | aorta | kidney_left | Avg |" in printed
    for name in ("ensemble.nii.gz", "uncertainty.nii.gz", "uncertain.nii.gz", "rectified.nii.gz",
                 "rectified.seg.nrrd", "report.json", "overview.png", "boxes.json"):
        assert (out / "segment" / name).is_file(), name
    assert (out / "dice.md").read_text(encoding="utf-8").count("|") > 20
    # The library the demo built passes `ursam templates check`.
    assert ursam(["templates", "check", str(out / "templates")]) == 0
    assert "2 support scans, 5 organs" in capsys.readouterr().out
    report = json.loads((out / "segment" / "report.json").read_text(encoding="utf-8"))
    assert set(report["inputs"]["localization"]["registration_seconds"]) == {"phantom_01", "phantom_02"}
    # Real outcome: the segmented liver overlaps the phantom's liver.
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "cohort" / "cases" / "phantom_03" / "labels.nii.gz")))
    rect = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "segment" / "rectified.nii.gz")))
    inter = np.logical_and(rect == 1, truth == 1).sum()
    assert 2 * inter / ((rect == 1).sum() + (truth == 1).sum()) > 0.6


@pytest.mark.slow
def test_segment_with_templates_saves_boxes_and_records_skipped_organs(tmp_path, capsys):
    """`ursam segment --templates`: localize, segment, boxes.json; an organ no support labels is skipped."""

    grid = PhantomGrid((64, 64, 16), (6.0, 6.0, 11.25))
    lib = make_cohort(tmp_path / "cohort", n_templates=2, n_queries=1, seed=3, grid=grid)
    meta = json.loads((lib / "dataset.json").read_text())
    meta["labels"]["6"] = "pancreas"  # named, but labelled in no scan
    (lib / "dataset.json").write_text(json.dumps(meta))
    query = lib / "cases" / "phantom_03"
    out = tmp_path / "seg"
    assert ursam(["segment", str(query / "image.nii.gz"), "--templates", str(lib), "--out", str(out),
                  "--reference", str(query / "labels.nii.gz"), "--quiet", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "pancreas was not localized: no support scan labels it" in captured.err
    report = json.loads((out / "report.json").read_text())
    loc = report["inputs"]["localization"]
    assert loc["skipped"] == {"pancreas": "no support scan labels it"}
    assert any("pancreas" in w for w in report["warnings"])
    assert set(loc["registration_seconds"]) == {"phantom_01", "phantom_02"}
    assert report["inputs"]["margin_z_xy"] == [2, 10.0]
    boxes = json.loads((out / "boxes.json").read_text())
    assert sorted(b["name"] for b in boxes["boxes"]) == sorted(ORGANS.values())
    assert [o["name"] for o in report["organs"]] == [b["name"] for b in boxes["boxes"]]
    # The Dice table printed against the reference: the ensemble finds the liver.
    lines = captured.out.splitlines()
    header = [c.strip() for c in next(line for line in lines if line.startswith("| method")).split("|")]
    ensemble = [c.strip() for c in next(line for line in lines if line.startswith("| ensemble")).split("|")]
    assert float(ensemble[header.index("liver")]) > 0.6
    # Asking for the unlabelled organ by name is an error, before any registration.
    assert ursam(["segment", str(query / "image.nii.gz"), "--templates", str(lib), "--organs", "pancreas",
                  "--out", str(tmp_path / "seg2"), "--quiet"]) == 2
    assert "no support scan of the library labels pancreas" in capsys.readouterr().err
    assert not (tmp_path / "seg2").exists()
