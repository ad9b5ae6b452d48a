"""The calibrated atlas–SAM fusion: its model, its fit, and its calibration on a small real library."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from shared_data import ABD, HN, make_small_library, organ_slab

from URSAMLib.calibrate import SELECTION_CANDIDATES, calibrate
from URSAMLib.calibration.file import Calibration
from URSAMLib.calibration.fit import Case, _flag_threshold, fit_organ
from URSAMLib.cli import main as ursam
from URSAMLib.fusion import Evidence, OrganFusion, cap_flags, fuse
from URSAMLib.localizers import LibrarySource
from URSAMLib.pipeline import Params
from URSAMLib.runner import ScanJob, run_scan
from URSAMLib.settings import Settings
from URSAMLib.templates import Library

rng = np.random.default_rng(7)


def _sphere(shape, centre, radius):
    zz, yy, xx = np.ogrid[:shape[0], :shape[1], :shape[2]]
    return (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= radius ** 2


def _case(truth, good, noisy, intensity=None):
    """Evidence where ``good`` is an informative source and ``noisy`` pure noise."""
    ev = Evidence({good: np.clip(np.where(truth, 0.8, 0.15) + rng.normal(0, 0.1, truth.shape), 0, 1).astype(np.float32),
                   noisy: rng.uniform(0, 1, truth.shape).astype(np.float32)},
                  intensity if intensity is not None else np.zeros(truth.shape, np.float32))
    return Case(ev, truth, 0)


def test_one_source_with_weight_one_reproduces_it():
    truth = _sphere((12, 20, 20), (6, 10, 10), 5)
    p_sam = rng.uniform(0.02, 0.98, truth.shape).astype(np.float32)
    p_atlas = rng.uniform(0.02, 0.98, truth.shape).astype(np.float32)
    ev = Evidence({"sam": p_sam, "atlas": p_atlas})
    for name, p in (("sam", p_sam), ("atlas", p_atlas)):
        model = OrganFusion("x", {name: 1.0}, 0.0)
        np.testing.assert_allclose(model.probability(ev), p, atol=1e-5)
        assert np.array_equal(fuse(ev, model).mask, p > 0.5)
    # the fused entropy is the source's own
    out = fuse(ev, OrganFusion("x", {"atlas": 1.0}))
    p = np.clip(p_atlas, 1e-3, 1 - 1e-3)
    np.testing.assert_allclose(out.uncertainty, -(p * np.log(p) + (1 - p) * np.log(1 - p)), atol=1e-4)


def test_the_fit_puts_the_weight_on_the_informative_source():
    cases = [_case(_sphere((12, 24, 24), (6, 12 + d, 12), 6), "atlas", "sam") for d in (-2, 0, 2)]
    fit = fit_organ("organ", {"slice": cases}, budget=0.1)
    model = fit.model
    assert model.weights.get("atlas", 0) > 0.5 and abs(model.weights.get("sam", 0)) < 0.2 * model.weights["atlas"]
    cases = [_case(_sphere((12, 24, 24), (6, 12 + d, 12), 6), "sam", "atlas") for d in (-2, 0, 2)]
    model = fit_organ("organ", {"slice": cases}, budget=0.1).model
    assert model.weights.get("sam", 0) > 0.5 and abs(model.weights.get("atlas", 0)) < 0.2 * model.weights["sam"]
    # never worse on its own data than a source alone
    loo = fit_organ("organ", {"slice": cases}, budget=0.1).loo_dice
    assert loo["fusion"] >= max(loo["sam (0.5)"], loo["atlas (0.5)"])


def test_flags_stay_within_the_review_budget():
    cases = [_case(_sphere((12, 24, 24), (6, 12, 12 + d), 6), "atlas", "sam") for d in (-1, 0, 1)]
    model = fit_organ("organ", {"slice": cases}, budget=0.1).model
    flagged = segmented = 0
    for c in cases:
        out = fuse(c.evidence, model, budget=0.1)
        flagged += int(out.flagged.sum())
        segmented += int(out.mask.sum())
        assert out.flagged.sum() <= 0.1 * out.mask.sum() + 1
    assert 0 < flagged <= 0.1 * segmented + len(cases)
    # the threshold alone meets the budget on the calibration data taken together
    tau = _flag_threshold(cases, model, 0.1)
    assert sum(int((fuse(c.evidence, model).uncertainty >= tau).sum()) for c in cases) <= 0.1 * segmented + 3
    u = np.linspace(0, 0.69, 50)
    assert cap_flags(u > 0.3, u, 5).sum() == 5 and cap_flags(u > 0.3, u, 5)[-5:].all()


@pytest.fixture(scope="module")
def small_library(tmp_path_factory):
    """Three real H&N supports cropped to the slices of the brainstem and the left parotid, labelled with those
    two alone (a small, fast library)."""
    return make_small_library(tmp_path_factory.mktemp("lib3"))


@pytest.mark.slow
def test_calibration_on_a_small_real_library_beats_each_source(small_library, litemedsam, capsys):
    lib = Library(small_library)
    settings = Settings(params=Params(n_aug=2))
    cal = calibrate(lib, litemedsam, settings, modes=("slice",))
    assert (small_library / "calibration.json").is_file()
    again = Calibration.load(small_library / "calibration.json")
    assert set(again.organs) == {"Brainstem", "Parotid_L"} and again.supports == ["pt_4", "pt_13", "pt_17"]
    # both organs lie whole in every support's slab: each is segmented in each leave-one-out run
    assert cal.loo_dice["Parotid_L"]["cases"] == 3 and cal.loo_dice["Brainstem"]["cases"] == 3
    # each organ's number of voting supports, chosen on the same runs (two supports vote in each of them)
    assert set(cal.per_organ) == {"Brainstem", "Parotid_L"}
    assert all(k in SELECTION_CANDIDATES for k in cal.per_organ.values())
    for name, loo in cal.loo_dice.items():
        for source in ("atlas (0.5)", "atlas_lw (0.5)", "sam (0.5)"):
            assert loo["fusion"] >= loo[source] - 1e-9, (name, loo)
        assert loo["fusion"] > 0.5, (name, loo)
    # a rerun resumes from what the leave-one-out runs computed: no SAM call, and the same calibration
    # as the run that made them (the fit reads the runs as the cache keeps them, both times)
    before = litemedsam.encoder_calls
    fresh = json.loads((small_library / "calibration.json").read_text(encoding="utf-8"))
    calibrate(lib, litemedsam, settings, modes=("slice",))
    assert litemedsam.encoder_calls == before
    resumed = json.loads((small_library / "calibration.json").read_text(encoding="utf-8"))
    for key in ("organs", "ablations", "loo_dice", "per_organ", "quality"):
        assert resumed[key] == fresh[key], key
    # a library larger than the subset bound is calibrated on a subset, recorded; a time bound already spent
    # starts no new run (here the subset's runs are all kept from before)
    subset = calibrate(lib, litemedsam, settings, modes=("slice",), out=small_library / "subset.json",
                       max_queries=2, max_minutes=0)
    assert litemedsam.encoder_calls == before
    assert subset.queries["subset"] and len(subset.queries["segmented"]) == 2 and subset.queries["not_run"] == []
    assert subset.loo_dice["Brainstem"]["cases"] == 2 and subset.supports == ["pt_4", "pt_13", "pt_17"]
    # `ursam templates check` shows it
    assert ursam(["templates", "check", str(small_library)]) == 0
    assert "| Brainstem | slice |" in capsys.readouterr().out


@pytest.mark.slow
def test_segment_with_a_calibrated_library_writes_the_fusion(small_library, tmp_path, capsys):
    """`ursam segment --templates` fuses with the library's calibration and says so; without one it warns
    and writes UR-SAM with the atlas prior."""

    # a whole scan against the library's slabs (pt_31 is not in the small library)
    image = sitk.ReadImage(str(HN / "cases" / "pt_31" / "image.nii.gz"))
    labels = sitk.ReadImage(str(HN / "cases" / "pt_31" / "labels.nii.gz"))
    kept = sitk.GetImageFromArray(np.where(np.isin(sitk.GetArrayFromImage(labels), [1, 4]),
                                           sitk.GetArrayFromImage(labels), 0).astype(np.uint8))
    kept.CopyInformation(labels)
    sitk.WriteImage(image, str(tmp_path / "q.nii.gz"))
    sitk.WriteImage(kept, str(tmp_path / "q_labels.nii.gz"))
    if not (small_library / "calibration.json").is_file():
        assert ursam(["templates", "calibrate", str(small_library), "--modes", "slice", "--n-aug", "2",
                      "--quiet"]) == 0
    out = tmp_path / "fused"
    assert ursam(["segment", str(tmp_path / "q.nii.gz"), "--templates", str(small_library), "--out", str(out),
                  "--n-aug", "2", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["rectified_method"]["name"] == "fusion"
    assert report["inputs"]["calibration"]["used"] and len(report["inputs"]["calibration"]["sha256"]) == 64
    # the model loaded beside the registrations: the run waited for it at most as long as it took to load
    timings = report["timings_seconds"]
    assert 0 < timings["model_load_seconds"] and timings["model_seconds"] <= timings["model_load_seconds"] + 0.5
    organs = {o["name"]: o for o in report["organs"]}
    assert all(organs[n]["fusion"] is not None for n in ("Brainstem", "Parotid_L"))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "q_labels.nii.gz")))
    rect = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "rectified.nii.gz")))
    for value in (1, 4):
        assert Case(None, truth == value, 0).dice(rect == value) > 0.5
        # flags within the review budget (10% of the organ's segmented volume)
        unc = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "uncertain.nii.gz")))
        assert (unc == value).sum() <= 0.1 * (rect == value).sum() + 1
    # the review list is ordered by the expected Dice gain of fixing each region
    gains = [c["expected_dice_gain"] for c in report["flagged_components"]]
    assert gains == sorted(gains, reverse=True)
    # every organ's quality estimate: a predicted Dice inside its interval, a decision, and every slice of the
    # organ's box once, ranked by expected wrong voxels (indices along the file's own slice axis, as boxes.json)
    boxes = {b["name"]: b for b in json.loads((out / "boxes.json").read_text(encoding="utf-8"))["boxes"]}
    for name, organ in organs.items():
        q = organ["quality"]
        assert list(q) == ["predicted_dice", "interval", "review", "slices"]
        assert 0.0 <= q["interval"][0] <= q["predicted_dice"] <= q["interval"][1] <= 1.0
        assert q["review"] in ("check", "ok")
        # three supports hold too few organ results to fit the quality model: the estimate says so
        assert organ["quality_calibrated"] is False
        k0, k1 = boxes[name]["min_ijk"][2], boxes[name]["max_ijk"][2]
        assert sorted(s["z"] for s in q["slices"]) == list(range(k0, k1 + 1))
        expected = [s["expected_error_voxels"] for s in q["slices"]]
        assert expected == sorted(expected, reverse=True) and expected[0] > 0
    capsys.readouterr()
    # without a calibration: a warning, and the uncalibrated result
    (small_library / "calibration.json").rename(small_library / "kept.json")
    try:
        out2 = tmp_path / "plain"
        assert ursam(["segment", str(tmp_path / "q.nii.gz"), "--templates", str(small_library), "--out", str(out2),
                      "--n-aug", "2", "--quiet"]) == 0
        assert "has no calibration" in capsys.readouterr().err
        report = json.loads((out2 / "report.json").read_text(encoding="utf-8"))
        assert report["rectified_method"]["name"] == "ursam+atlas"
    finally:
        (small_library / "kept.json").rename(small_library / "calibration.json")


@pytest.mark.slow
def test_sam_does_not_run_for_an_organ_whose_fusion_gives_it_no_weight(small_library, litemedsam, tmp_path):
    """An organ fused from the warped supports alone is not prompted, and the slices only it covers are not
    embedded: its result, and every other organ's, are those of a run where SAM segments every organ; where no
    organ uses SAM, no slice is embedded."""
    if not (small_library / "calibration.json").is_file():
        assert ursam(["templates", "calibrate", str(small_library), "--modes", "slice", "--n-aug", "2",
                      "--quiet"]) == 0
    data = json.loads((small_library / "calibration.json").read_text(encoding="utf-8"))
    data["organs"]["Brainstem"].update(weights={"atlas": 1.0}, bias=0.0)
    data["organs"]["Parotid_L"]["weights"].setdefault("sam", 0.5)  # the other organ keeps SAM
    atlas_only = tmp_path / "atlas_only.json"
    atlas_only.write_text(json.dumps(data), encoding="utf-8")
    data["organs"]["Parotid_L"].update(weights={"atlas": 1.0}, bias=0.0)
    no_sam = tmp_path / "no_sam.json"
    no_sam.write_text(json.dumps(data), encoding="utf-8")
    image, _ = organ_slab(HN / "cases" / "pt_34")
    query = tmp_path / "q.nii.gz"
    sitk.WriteImage(image, str(query))

    def run(calibration, everywhere):
        job = ScanJob(str(query), LibrarySource(small_library), Settings(params=Params(n_aug=2)), calibration,
                      sam_everywhere=everywhere)
        calls = litemedsam.encoder_calls
        result = run_scan(job, lambda percentile: litemedsam).result
        return result, litemedsam.encoder_calls - calls

    (skipped, calls_skipped), (full, calls_full) = run(atlas_only, False), run(atlas_only, True)
    assert skipped.rectified_method == full.rectified_method == "fusion"
    assert np.array_equal(skipped.label_map("fusion"), full.label_map("fusion"))
    organs = {o.name: o for o in skipped.main_organs()}
    assert not organs["Brainstem"].sam_run and organs["Parotid_L"].sam_run
    assert all(o.sam_run for o in full.main_organs())
    assert not organs["Brainstem"].masks["ensemble"].any() and organs["Brainstem"].fused.mask.any()
    # each slice embedded once: the parotid's alone, or the parotid's and the brainstem's
    parotid = set(organs["Parotid_L"].box.prompt_slices)
    assert calls_skipped == len(parotid)
    assert calls_full == len(parotid | set(organs["Brainstem"].box.prompt_slices))
    assert skipped.timings["sam_not_run"] == ["Brainstem"]
    for name in organs:
        assert skipped.quality[name].predicted_dice == pytest.approx(full.quality[name].predicted_dice, abs=1e-6)

    # no organ uses SAM: nothing embedded, and the brainstem's fusion is the one above
    alone, calls_none = run(no_sam, False)
    assert calls_none == 0 and not any(o.sam_run for o in alone.main_organs())
    assert sorted(alone.timings["sam_not_run"]) == ["Brainstem", "Parotid_L"]
    brainstem = {o.name: o for o in alone.main_organs()}["Brainstem"]
    assert np.array_equal(brainstem.fused.mask, organs["Brainstem"].fused.mask)


def test_a_bad_calibration_file_is_one_error_before_any_registration(tmp_path, capsys):
    """`ursam segment --calibration FILE` reads the file first: broken JSON is exit 2 naming it, no output."""

    bad = tmp_path / "calibration.json"
    bad.write_text("{not json", encoding="utf-8")
    out = tmp_path / "out"
    assert ursam(["segment", str(ABD / "cases" / "tsA_slab" / "image.nii.gz"), "--templates", str(ABD),
                  "--calibration", str(bad), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ursam: error: calibration file is not valid JSON") and str(bad) in err[-1]
    assert not any("registering" in line or "localized" in line for line in err)
    assert not out.exists()
