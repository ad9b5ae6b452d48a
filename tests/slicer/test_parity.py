"""The Slicer worker and ``ursam segment`` run the same scan runner: the same masks, uncertainty and flags.

The query is not a CT in HU (a real H&N slab rescaled to positive values, so that both must switch to
percentile normalization), and the library is calibrated with a review budget of 0.05 (so that both must
cap the flags at the calibration's budget, not at the default 0.1).
"""
import json

import numpy as np
import pytest
import SimpleITK as sitk
import vtk
from shared_data import HN, make_small_library, organ_slab
from slicer_scene import SlicerApp

from URSAMLib.calibration.file import Calibration
from URSAMLib.cli import main as ursam
from URSAMMRML import geometry
from URSAMMRML.logic import RunOptions, URSAMProcessLogic

BUDGET = 0.05
N_AUG = 2


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parity")
    library = make_small_library(folder / "lib")
    assert ursam(["templates", "calibrate", str(library), "--modes", "slice", "--n-aug", str(N_AUG),
                  "--budget", str(BUDGET), "--device", "cpu", "--quiet"]) == 0
    image, _ = organ_slab(HN / "cases" / "pt_31")
    # not HU: no air near -1000, every voxel positive
    rescaled = sitk.Cast(sitk.ShiftScale(sitk.Cast(image, sitk.sitkFloat32), 1024.0, 2.0), sitk.sitkFloat32)
    query = folder / "not_hu.nii.gz"
    sitk.WriteImage(rescaled, str(query))
    return library, query, folder


@pytest.mark.slow
def test_worker_and_segment_agree_on_a_scan_that_is_not_hu_with_a_budget_calibration(calibrated, capsys):
    library, query, folder = calibrated
    assert Calibration.load(library / "calibration.json").budget == BUDGET

    out = folder / "cli"
    assert ursam(["segment", str(query), "--templates", str(library), "--out", str(out), "--n-aug", str(N_AUG),
                  "--device", "cpu", "--quiet"]) == 0
    assert "does not look like a CT in HU" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["inputs"]["normalization"] == "percentile"
    assert report["rectified_method"]["name"] == "fusion"
    assert report["parameters"]["params"]["review_budget"] == BUDGET

    app = SlicerApp()
    volume = app.loadVolume(query, "not HU")
    logic = URSAMProcessLogic(app.appLogic, tempRoot=folder / "jobs")
    job = logic.prepareSegmentation(volume, library=library, options=RunOptions(nAug=N_AUG, device="cpu"))
    run = logic.startJob(job)
    run.wait(timeout=900)
    assert run.error is None, run.error
    result = run.computed.result
    assert result.inputs["normalization"] == "percentile"
    assert result.settings.params.review_budget == BUDGET
    assert any("does not look like a CT in HU" in w for w in result.warnings)

    maps = run.computed.maps
    files = {name: sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{name}.nii.gz")))
             for name in ("rectified", "uncertainty", "uncertain")}
    assert np.array_equal(maps["rectified"], files["rectified"])
    assert np.array_equal(maps["uncertainty"], files["uncertainty"])
    assert np.array_equal(maps["flagged"], files["uncertain"])
    # flags within the calibration's budget, not the default's
    for organ in report["organs"]:
        assert organ["flagged_voxels"] <= BUDGET * organ["rectified_voxels"] + 1, organ
    assert files["uncertain"].any() and files["rectified"].any()

    # The panel's organ table shows the same quality estimate as report.json, and "next slice to check"
    # steps the axial view through the organ's ranked slices in order, round again after the last.
    statistics = run.outputs.statistics.GetTable()
    column = {statistics.GetColumnName(c): c for c in range(statistics.GetNumberOfColumns())}
    quality = {o["name"]: o["quality"] for o in report["organs"]}
    assert statistics.GetNumberOfRows() == len(quality)
    for r in range(statistics.GetNumberOfRows()):
        organ = statistics.GetValue(r, column["Organ"]).ToString()
        assert statistics.GetValue(r, column["Predicted Dice"]).ToDouble() == pytest.approx(
            quality[organ]["predicted_dice"], abs=1e-4)
        assert statistics.GetValue(r, column["Review"]).ToString() == quality[organ]["review"]
    organ = report["organs"][0]["name"]
    ranked = [s["z"] for s in quality[organ]["slices"]]
    red = app.scene.GetSingletonNode("Red", "vtkMRMLSliceNode")
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    ijk_to_ras = geometry.matrixToArray(matrix)
    first = ranked[:3]
    for k in first:
        assert logic.nextSliceToCheck(run.outputs.statistics, organ) == k
        # the axial view's plane lies on slice k of the input volume
        assert geometry.matrixToArray(red.GetSliceToRAS())[2, 3] == pytest.approx((ijk_to_ras @ [0, 0, k, 1])[2],
                                                                                  abs=1e-3)
    for _ in range(len(ranked) - len(first)):
        logic.nextSliceToCheck(run.outputs.statistics, organ)
    assert logic.nextSliceToCheck(run.outputs.statistics, organ) == ranked[0]
