"""The quality estimate: predicted Dice, ranked slices, the report's dict, its metrics, and an honest fit."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from URSAMLib.calibration.fit import Case, OrganFit
from URSAMLib.fusion import Evidence, OrganFusion
from URSAMLib.orientation import Orientation
from URSAMLib.quality import (
    QUALITY_KEYS,
    DiceModel,
    OrganEvidence,
    OrganOutcome,
    PairPrediction,
    QualityModel,
    VoxelErrorModel,
    base_error,
    cross_validate,
    dice_prediction_scores,
    expected_dice,
    fit_quality,
    held_out_cases,
    input_slice_index,
    organ_quality,
    quality_dict,
    quality_scores,
    ranked_slices,
    review_scores,
    slice_share,
    voxel_auroc,
)
from URSAMLib.quality.features import support_agreement
from URSAMLib.quality.model import DEFAULT_HALF_WIDTH, SPREAD_FLOOR, conformal_half_width

SHAPE = (24, 32, 32)


def _ellipsoid(centre, radii, shape=SHAPE):
    zz, yy, xx = np.ogrid[:shape[0], :shape[1], :shape[2]]
    return (((zz - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2
            + ((xx - centre[2]) / radii[2]) ** 2) <= 1.0


def _calibrated(truth, sigma=1.0):
    """A probability that is calibrated for ``truth`` at its boundary: the blurred truth."""
    return np.clip(ndimage.gaussian_filter(truth.astype(np.float32), sigma), 0, 1).astype(np.float32)


def _evidence(p, mask, name="organ", slice_index=None, vote=None):
    sources = {"sam": p, "atlas": p if vote is None else vote}
    return OrganEvidence(name, p, mask, sources, (3.0, 1.0, 1.0), 4, slice_index)


def _fitted_on_expected_dice():
    """A calibrated quality model whose Dice model follows the expected Dice (as fitted on a library)."""
    return QualityModel(None, DiceModel(("expected_dice",), (0.1,), (0.7,), (0.1,), 0.7, 0.08), {}, True)


# ----------------------------------------------------------------------------------------------
# a known error: the result shifted by several slices against a calibrated probability

def test_shifted_organ_predicts_lower_dice_and_ranks_the_shifted_slices_first():
    truth = _ellipsoid((11, 16, 16), (6, 8, 7))
    p = _calibrated(truth)
    aligned = p > 0.5
    shifted = np.roll(aligned, 4, axis=0)  # the result 4 slices too far up
    model = _fitted_on_expected_dice()
    good = model.assess(_evidence(p, aligned))
    bad = model.assess(_evidence(p, shifted))
    assert expected_dice(base_error(p, shifted), shifted) < expected_dice(base_error(p, aligned), aligned) - 0.2
    assert bad.predicted_dice < good.predicted_dice - 0.05
    # the slices where the shifted result and the truth differ most hold the most expected errors
    true_errors = (shifted != truth).reshape(SHAPE[0], -1).sum(1)
    worst = set(np.argsort(-true_errors)[:6].tolist())
    top = [z for z, _ in bad.slices[:6]]
    assert len(worst & set(top)) >= 5
    # and slices where the result and the truth agree come last
    assert all(true_errors[z] == 0 for z, _ in bad.slices[-3:])


def test_shift_in_plane_moves_the_errors_onto_the_organs_slices():
    truth = _ellipsoid((11, 16, 16), (4, 6, 6))
    p = _calibrated(truth)
    shifted = np.roll(p > 0.5, 3, axis=2)
    q = _fitted_on_expected_dice().assess(_evidence(p, shifted))
    organ_slices = set(np.flatnonzero(truth.reshape(SHAPE[0], -1).any(1)).tolist())
    assert {z for z, _ in q.slices[:5]} <= organ_slices
    assert q.predicted_dice < _fitted_on_expected_dice().assess(_evidence(p, p > 0.5)).predicted_dice


# ----------------------------------------------------------------------------------------------
# the report's dict

def test_quality_dict_has_exactly_the_report_keys_and_every_box_slice_once():
    truth = _ellipsoid((11, 16, 16), (5, 7, 7))
    p = _calibrated(truth)
    # the region's slices are slices 30..53 of the input file
    ev = _evidence(p, np.roll(p > 0.5, 2, axis=0), slice_index=np.arange(30, 30 + SHAPE[0]))
    q = organ_quality(ev, _fitted_on_expected_dice(), threshold=0.9)
    assert tuple(q) == QUALITY_KEYS
    assert isinstance(q["predicted_dice"], float) and len(q["interval"]) == 2
    assert q["interval"][0] <= q["predicted_dice"] <= q["interval"][1]
    assert q["review"] == "check"
    zs = [s["z"] for s in q["slices"]]
    assert sorted(zs) == list(range(30, 30 + SHAPE[0]))
    assert all(set(s) == {"z", "expected_error_voxels"} for s in q["slices"])
    values = [s["expected_error_voxels"] for s in q["slices"]]
    assert values == sorted(values, reverse=True)
    json.dumps(q)  # plain JSON
    assert organ_quality(ev, _fitted_on_expected_dice(), threshold=0.0)["review"] == "ok"


def test_quality_dict_from_plain_values():
    d = quality_dict(0.71234, (0.6, 0.8), "ok", [(4, 10.5), (3, 2.0)])
    assert d == {"predicted_dice": 0.7123, "interval": [0.6, 0.8], "review": "ok",
                 "slices": [{"z": 4, "expected_error_voxels": 10.5}, {"z": 3, "expected_error_voxels": 2.0}]}
    with pytest.raises(ValueError):
        quality_dict(0.5, (0.4, 0.6), "maybe", [])


def test_ranked_slices_sum_fp_and_fn_per_slice():
    p = np.zeros((3, 2, 2), np.float32)
    mask = np.zeros((3, 2, 2), bool)
    mask[0] = True  # slice 0: inside, p 0 -> 4 expected false positives
    p[2, 0, 0] = 0.5  # slice 2: outside, p 0.5 -> 0.5 expected false negatives
    assert ranked_slices(base_error(p, mask), mask) == [(0, 4.0), (2, 0.5), (1, 0.0)]


def test_slice_index_follows_the_input_files_flipped_axis():
    flipped = Orientation((8, 8, 20), (0, 1, 2), (False, False, True))
    assert input_slice_index(flipped, 3, 4).tolist() == [16, 15, 14, 13]
    assert input_slice_index(None, 3, 2).tolist() == [3, 4]


def test_uncalibrated_model_gives_the_expected_dice_and_a_default_interval():
    truth = _ellipsoid((11, 16, 16), (5, 7, 7))
    p = _calibrated(truth)
    ev = _evidence(p, p > 0.5)
    q = QualityModel().assess(ev)
    assert not q.calibrated
    assert q.predicted_dice == pytest.approx(expected_dice(base_error(p, p > 0.5), p > 0.5))
    # the default half-width at a Dice of 0.7, wider below it and narrower above
    h = DEFAULT_HALF_WIDTH * (1.0 - q.predicted_dice + SPREAD_FLOOR) / (0.3 + SPREAD_FLOOR)
    assert q.interval == pytest.approx([max(0.0, q.predicted_dice - h), min(1.0, q.predicted_dice + h)])


def test_expected_dice_and_support_agreement_known_values():
    mask = np.array([True, True, False, False])
    err = np.array([0.0, 0.5, 0.5, 0.0])  # E[TP] 1.5, E[|truth|] 2 -> 3 / 4
    assert expected_dice(err, mask) == pytest.approx(0.75)
    # two supports: one labels voxels 0-1, the other 1-2
    assert support_agreement(np.array([0.5, 1.0, 0.5, 0.0])) == pytest.approx(1.5 / 2)
    assert support_agreement(np.array([1.0, 1.0, 0.0])) == pytest.approx(1.0)
    assert support_agreement(np.array([0.25, 0.25, 0.25, 0.25])) == pytest.approx(0.25)


def test_model_json_round_trip():
    model = QualityModel(VoxelErrorModel((1.0, 0.1, -0.2, 0.3, 0.0, 0.5, -0.1), -0.4), _fitted_on_expected_dice().dice,
                         {}, True)
    again = QualityModel.from_json(json.loads(json.dumps(model.to_json())))
    truth = _ellipsoid((11, 16, 16), (5, 7, 7))
    p = _calibrated(truth)
    ev = _evidence(p, p > 0.5)
    assert again.assess(ev).predicted_dice == pytest.approx(model.assess(ev).predicted_dice)
    np.testing.assert_allclose(again.assess(ev).error, model.assess(ev).error)


# ----------------------------------------------------------------------------------------------
# metrics on hand-made inputs

def test_dice_prediction_scores_known_values():
    pairs = [PairPrediction("a", "x", 0.5, 0.4, 0.6, 0.55), PairPrediction("b", "x", 0.6, 0.5, 0.7, 0.75),
             PairPrediction("c", "x", 0.7, 0.6, 0.8, 0.65), PairPrediction("a", "y", 0.8, 0.7, 0.9, 0.8),
             PairPrediction("b", "y", 0.9, 0.8, 1.0, 0.95), PairPrediction("c", "y", 0.85, 0.75, 0.95, 0.9)]
    s = dice_prediction_scores(pairs)
    assert s.n == 6
    assert s.mae == pytest.approx((0.05 + 0.15 + 0.05 + 0 + 0.05 + 0.05) / 6)
    assert s.coverage == pytest.approx(5 / 6)  # 0.75 is outside [0.5, 0.7]
    assert s.per_organ["y"]["spearman"] == pytest.approx(1.0)
    assert s.per_organ["x"]["spearman"] == pytest.approx(0.5)
    assert s.within_spearman == pytest.approx(0.75)
    assert s.within_mae == pytest.approx(np.mean([0.25 / 3, 0.1 / 3]))
    assert s.spearman == pytest.approx(1 - 6 * 2 / (6 * 35))  # ranks differ by one at two pairs
    json.dumps(s.to_json())


def test_slice_share_known_values():
    expected = [5.0, 1.0, 3.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    errors = [8, 0, 4, 0, 2, 0, 0, 0, 0, 0]
    # top 10 %: one slice (8 of 20 errors; 6 more lie off the box), top 20 %: two slices (12 of 20)
    assert slice_share(expected, errors, 20, 0.1) == pytest.approx((0.4, 0.1 * 14 / 20))
    assert slice_share(expected, errors, 20, 0.2) == pytest.approx((0.6, 0.2 * 14 / 20))
    assert np.isnan(slice_share(expected, errors, 0, 0.2)[0])


def test_voxel_auroc_perfect_and_review_scores():
    truth = np.zeros((5, 9, 9), bool)
    truth[2, 3:6, 3:6] = True
    pred = truth.copy()
    pred[2, 3, 3] = False
    score = (pred != truth).astype(float)
    assert voxel_auroc(score, pred, truth, (1.0, 1.0, 1.0)) == pytest.approx(1.0)
    pairs = [PairPrediction("a", "x", 0.5, 0, 1, 0.4), PairPrediction("b", "x", 0.9, 0, 1, 0.5),
             PairPrediction("c", "x", 0.5, 0, 1, 0.9)]
    r = review_scores(pairs, {"x": 0.6})
    assert r == {"pairs": 3, "flagged": 2, "truly_below": 2, "sensitivity": 0.5, "precision": 0.5}


def test_conformal_half_width():
    assert conformal_half_width([0.1, -0.2, 0.3, 0.05], 0.6) == pytest.approx(0.2)  # ceil(5 * 0.6) = 3rd
    assert conformal_half_width([0.1], 0.8) == float("inf")
    # normalised by the spread 1 - predicted + floor: 0.1 / 0.2, 0.2 / 0.5, 0.3 / 0.6, 0.05 / 1.1
    assert conformal_half_width([0.1, -0.2, 0.3, 0.05], 0.6, [0.9, 0.6, 0.5, 0.0]) == pytest.approx(0.5)
    model = DiceModel(half_width=0.5)
    assert model.interval(0.9) == pytest.approx([0.8, 1.0]) and model.interval(0.5) == pytest.approx([0.2, 0.8])


# ----------------------------------------------------------------------------------------------
# the fit on the library is held out

def _library(n_supports=4, seed=3, shape=(14, 18, 18)):
    """Calibration cases of two organs on ``n_supports`` supports: a SAM map and an atlas vote that are
    informative, with a per-support shift so the results differ in quality."""
    rng = np.random.default_rng(seed)
    per_support, spacing, labels = {}, {}, {}
    for i in range(n_supports):
        cid = f"s{i}"
        organs = {}
        full = np.zeros(tuple(n + 6 for n in shape), np.int32)
        for k, (name, radii) in enumerate((("a", (4, 5, 5)), ("b", (2, 3, 6)))):
            truth = _ellipsoid((7, 9, 9), radii, shape)
            shift = int(rng.integers(0, 3))
            guess = np.roll(_calibrated(truth, 1.2), shift, axis=0)
            noise = rng.normal(0, 0.05, shape).astype(np.float32)
            ev = Evidence({"sam": np.clip(guess + noise, 0, 1), "atlas": np.clip(guess, 0, 1),
                           "atlas_lw": np.clip(guess, 0, 1)}, np.zeros(shape, np.float32))
            organs[name] = Case(ev, truth, 0)
            full[:shape[0], :shape[1], :shape[2]][truth] = k + 1
        per_support[cid] = {"slice": organs}
        spacing[cid] = (3.0, 1.0, 1.0)
        labels[cid] = (full, (3.0, 1.0, 1.0))
    return per_support, spacing, labels, {1: "a", 2: "b"}


def _threshold_fit(seen):
    """A cheap stand-in for the calibration's fit that depends on its cases' truth (the threshold of the
    best mean Dice), and records which cases it saw."""
    def fit(name, by_mode, budget):
        cases = by_mode["slice"]
        seen.append((name, [id(c) for c in cases]))
        best = max(np.linspace(0.2, 0.8, 13),
                   key=lambda t: np.mean([2 * np.sum((c.evidence.sources["atlas"] > t) & c.truth)
                                          / (np.sum(c.evidence.sources["atlas"] > t) + np.sum(c.truth))
                                          for c in cases]))
        model = OrganFusion(name, {"atlas": 1.0}, 0.0, threshold=float(best), sam_mode="slice")
        return OrganFit(model, model, {})
    return fit


def test_each_library_case_is_fused_by_a_model_that_never_saw_it():
    per_support, spacing, _, _ = _library()
    seen = []
    cases = held_out_cases(per_support, spacing, fit_fusion=_threshold_fit(seen))
    assert len(cases) == 8 and len(seen) == 8
    for case, (name, ids) in zip(cases, seen):
        own = per_support[case.support]["slice"][name]
        assert case.organ == name and id(own) not in ids and len(ids) == 3
    # changing a support's truth leaves its own fused result as it was
    before = {(c.support, c.organ): c.evidence.mask.copy() for c in cases}
    per_support["s0"]["slice"]["a"].truth[:] = False
    again = held_out_cases(per_support, spacing, fit_fusion=_threshold_fit([]))
    for c in again:
        if c.support == "s0":
            assert np.array_equal(c.evidence.mask, before[(c.support, c.organ)])


def test_cross_validated_prediction_of_a_support_does_not_use_it():
    per_support, spacing, labels, names = _library(n_supports=5)
    pairs, cases = cross_validate(per_support, spacing, labels, names, fit_fusion=_threshold_fit([]))
    assert len(pairs) == len(cases) == 10
    # everything about s0 that a fit could learn from (its truth, its evidence) changed: s0's own predictions
    # stay, as every model that predicts them was fitted without it
    altered = {cid: {m: dict(o) for m, o in modes.items()} for cid, modes in per_support.items()}
    for name, c in per_support["s0"]["slice"].items():
        altered["s0"]["slice"][name] = Case(c.evidence, np.roll(c.truth, 3, axis=1), 0)
    first = [c for c in cases if c.support != "s0"] + [
        c for c in held_out_cases(altered, spacing, fit_fusion=_threshold_fit([])) if c.support == "s0"]
    pairs2, _ = cross_validate(altered, spacing, {**labels, "s0": (np.roll(labels["s0"][0], 3, 1), (3.0, 1, 1))},
                               names, fit_fusion=_threshold_fit([]), first_level=first)
    own = {(p.case, p.organ): p.predicted for p in pairs if p.case == "s0"}
    own2 = {(p.case, p.organ): p.predicted for p in pairs2 if p.case == "s0"}
    assert own == pytest.approx(own2)
    # the others' predictions did use s0 (as training data): the check above is not vacuous
    other = {(p.case, p.organ): p.predicted for p in pairs if p.case != "s0"}
    other2 = {(p.case, p.organ): p.predicted for p in pairs2 if p.case != "s0"}
    assert other != pytest.approx(other2)


def test_too_small_a_library_is_uncalibrated():
    per_support, spacing, labels, names = _library(n_supports=2)
    cases = held_out_cases(per_support, spacing, fit_fusion=lambda n, b, bu: OrganFit(
        OrganFusion(n, {"atlas": 1.0}, sam_mode="slice"), None, {}))
    # with two supports each fit has one case: none can be made (the calibration needs two)
    assert cases == []
    model = fit_quality(cases, labels, names)
    assert not model.calibrated and model.dice is None


def test_fit_quality_on_a_library_gives_intervals_and_thresholds():
    per_support, spacing, labels, names = _library(n_supports=5)
    cases = held_out_cases(per_support, spacing, fit_fusion=_threshold_fit([]))
    model = fit_quality(cases, labels, names, features=("expected_dice", "expected_dice_voxel"))
    assert model.calibrated and model.dice is not None and model.voxel is not None
    assert np.isfinite(model.dice.half_width) and model.dice.half_width > 0
    assert set(model.organs) == {"a", "b"} and all(s.threshold is not None for s in model.organs.values())
    q = model.assess(cases[0].evidence)
    assert 0 <= q.interval[0] <= q.predicted_dice <= q.interval[1] <= 1


def test_ring_contrast_is_higher_where_the_result_follows_the_organs_edge():
    truth = _ellipsoid((11, 16, 16), (5, 8, 8))
    rng = np.random.default_rng(0)
    image = np.where(truth, 0.7, 0.3) + rng.normal(0, 0.02, SHAPE)
    p = _calibrated(truth)
    on_edge = OrganEvidence("x", p, p > 0.5, {"atlas": p}, (3.0, 1.0, 1.0), 4, intensity=image)
    off_edge = OrganEvidence("x", p, np.roll(p > 0.5, 3, axis=2), {"atlas": p}, (3.0, 1.0, 1.0), 4, intensity=image)
    assert QualityModel().features(on_edge)["ring_contrast"] > QualityModel().features(off_edge)["ring_contrast"] + 1


def test_quality_scores_gathers_every_figure():
    outcomes = [OrganOutcome("a", "x", 0.7, 0.6, 0.8, 0.75, np.array([3.0, 1.0, 0.0, 0.0, 0.0]),
                             np.array([4, 0, 1, 0, 0]), 5, 0.9, "ok"),
                OrganOutcome("b", "x", 0.5, 0.4, 0.6, 0.3, np.array([0.0, 2.0, 1.0, 0.0, 0.0]),
                             np.array([0, 1, 3, 0, 0]), 6, 0.8, "check")]
    s = quality_scores(outcomes, {"x": 0.6})
    # top 10 % and 20 % of 5 slices: one slice; a: slice 0 (4 of 5), b: slice 1 (1 of 6); best: 4/5, 3/6
    assert s.slices["top10"] == pytest.approx((0.8 + 1 / 6) / 2)
    assert s.slices["oracle20"] == pytest.approx((0.8 + 0.5) / 2)
    assert s.slices["random10"] == pytest.approx((0.2 * 5 / 5 + 0.2 * 4 / 6) / 2)
    assert s.auroc == pytest.approx(0.85)
    assert s.dice.coverage == pytest.approx(0.5) and s.dice.mae == pytest.approx(0.125)
    assert s.review == {"pairs": 2, "flagged": 1, "truly_below": 1, "sensitivity": 1.0, "precision": 1.0}
    json.dumps(s.to_json())


def test_dice_model_stays_within_the_dice_range_it_was_fitted_on():
    rows = [{"x": v} for v in (0.1, 0.2, 0.3, 0.4)]
    model = DiceModel.fit(rows, [0.3, 0.4, 0.5, 0.6], ("x",), l2=1e-6)
    assert model.predict({"x": 0.25}) == pytest.approx(0.45, abs=1e-3)
    assert model.predict({"x": 2.0}) == pytest.approx(0.6) and model.predict({"x": -2.0}) == pytest.approx(0.3)
    assert DiceModel.from_json(json.loads(json.dumps(model.to_json()))).predict({"x": 2.0}) == pytest.approx(0.6)
