"""Fitting the quality estimate on a template library's own leave-one-out runs.

The calibration (:mod:`URSAMLib.calibration`) segments each support with the
others as its templates and keeps, per support, mode and organ, the fusion's
evidence and the truth over the organ's region (its ``Case``). Those runs are
this module's training data, with one rule that makes them honest: the fused
probability of a support's organ comes from a fusion model fitted **without
that support** (a query's model never saw the query either). So per organ and
support the fusion is fitted again on the other supports
(:func:`held_out_cases`), and the quality model is fitted on those results
(:func:`fit_quality`).

Its interval comes from residuals one level further out
(:func:`cross_validate`): for each support in turn, everything (the fusions of
the other supports' cases, the voxel model, the Dice model) is fitted without
it and its organs are predicted; the conformal quantile of those residuals is
the interval's half-width.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .features import OrganEvidence, expected_dice, organ_features
from .metrics import PairPrediction
from .model import (
    COVERAGE,
    DEFAULT_FEATURES,
    DEFAULT_L2_ORGAN,
    REVIEW_MARGIN,
    DiceModel,
    OrganStats,
    QualityModel,
    VoxelErrorModel,
    conformal_half_width,
)

#: fewer supports (or fewer leave-one-out cases) than this and nothing is fitted: the estimate is uncalibrated
MIN_SUPPORTS = 3
MIN_CASES = 8


@dataclass
class LibraryCase:
    """One organ of one support's leave-one-out run, fused by a model fitted without ``held_out``
    (the support itself, and any others left out of this fit). ``truth``: bool over the region;
    ``outside``: the truth's voxels outside the region; ``dice``: the result's true Dice (``outside``
    counted)."""
    support: str
    evidence: OrganEvidence
    truth: np.ndarray
    outside: int
    dice: float
    held_out: tuple = ()
    mode: Optional[str] = None

    @property
    def organ(self):
        return self.evidence.name


def case_dice(mask, truth, outside=0):
    """Dice of a mask over the region against the truth there, with ``outside`` truth voxels beyond it."""
    inter = int(np.count_nonzero(mask & truth))
    total = int(np.count_nonzero(mask)) + int(np.count_nonzero(truth)) + int(outside)
    return 1.0 if total == 0 else 2.0 * inter / total


def organ_stats(labels, names, exclude=()):
    """``{name: OrganStats}``: each organ's median volume and cranio-caudal extent over the supports'
    label maps (``labels``: support id -> (int array [z, y, x], spacing_zyx)) not in ``exclude``."""
    out = {}
    for value, name in names.items():
        vols, exts = [], []
        for cid, (arr, spacing) in labels.items():
            if cid in exclude:
                continue
            m = arr == value
            n = int(np.count_nonzero(m))
            if not n:
                continue
            zs = np.flatnonzero(m.reshape(m.shape[0], -1).any(1))
            vols.append(n * float(np.prod(spacing)) / 1000.0)
            exts.append((zs[-1] - zs[0] + 1) * float(spacing[0]))
        if vols:
            out[name] = OrganStats(float(np.median(vols)), float(np.median(exts)))
    return out


def held_out_cases(per_support, spacing, budget=0.1, exclude=(), fit_fusion=None, progress=None):
    """Every organ of every support not in ``exclude``, fused by a model fitted on the other supports'
    cases (never its own, nor those of ``exclude``): a list of :class:`LibraryCase`.

    ``per_support``: support id -> {mode: {organ: calibration Case}} (what the calibration keeps);
    ``spacing``: support id -> voxel size (z, y, x) in mm; ``fit_fusion(name, by_mode, budget)``: the
    calibration's per-organ fit (:func:`URSAMLib.calibration.fit.fit_organ`), giving its ``model``.
    """
    ids = [c for c in per_support if c not in exclude]
    names = list(dict.fromkeys(n for c in ids for organs in per_support[c].values() for n in organs))
    out = []
    for name in names:
        for c in ids:
            own = {m: organs[name] for m, organs in per_support[c].items() if name in organs}
            if not own:
                continue
            others = [d for d in ids if d != c]
            by_mode = {m: [per_support[d][m][name] for d in others if name in per_support[d].get(m, {})]
                       for m in own}
            by_mode = {m: cs for m, cs in by_mode.items() if len(cs) >= 2}
            if not by_mode:
                continue
            model = fit_fusion(name, by_mode, budget).model
            mode = model.sam_mode if model.sam_mode in own else next(iter(own))
            case = own[mode]
            p = model.probability(case.evidence)
            mask = model.mask(p, None, case.evidence.intensity)
            ev = OrganEvidence(name, p, mask, dict(case.evidence.sources), tuple(spacing[c]),
                               n_supports=len(per_support) - 1, intensity=case.evidence.intensity)
            out.append(LibraryCase(c, ev, case.truth, int(case.outside), case_dice(mask, case.truth, case.outside),
                                   tuple(sorted({c, *exclude})), mode))
            if progress is not None:
                progress(f"{name} of {c}: Dice {out[-1].dice:.3f} "
                         f"(fusion fitted without {', '.join(out[-1].held_out)})")
    return out


@dataclass
class TrainingSet:
    """A library's held-out cases made ready for the Dice model: ``rows`` (one feature dict per case, each
    taken as its run would see it: against the library's statistics without its support, under a voxel
    model fitted without its support, the organ's mean Dice among the other supports), ``y`` (their
    true Dice), the voxel model fitted on all of them, and the library's per-organ statistics (with each
    organ's mean Dice and review threshold)."""
    cases: list
    rows: list
    y: list
    voxel: Optional[VoxelErrorModel]
    stats: dict

    @property
    def supports(self):
        return sorted({c.support for c in self.cases})

    @property
    def enough(self):
        return len(self.supports) >= MIN_SUPPORTS and len(self.cases) >= MIN_CASES


def training_set(cases, labels, names, review_margin=REVIEW_MARGIN, seed=0):
    """The :class:`TrainingSet` of these :class:`LibraryCase`. ``labels``: support id -> (label array,
    spacing_zyx) of the library's supports; ``names``: value -> organ name."""
    stats = organ_stats(labels, names)
    for name, st in stats.items():
        own = [c.dice for c in cases if c.organ == name]
        if own:
            st.mean_dice = float(np.mean(own))
            st.threshold = round(st.mean_dice - review_margin, 4)
    ts = TrainingSet(list(cases), [], [c.dice for c in cases], None, stats)
    if not ts.enough:
        return ts
    supports = ts.supports
    stats_wo = {s: organ_stats(labels, names, exclude=(s,)) for s in supports}
    # each case's expected Dice under the voxel model is held out: that model never saw its support
    voxel_wo = {s: VoxelErrorModel.fit([c.evidence for c in cases if c.support != s],
                                       [c.truth for c in cases if c.support != s], seed) for s in supports}
    ts.voxel = VoxelErrorModel.fit([c.evidence for c in cases], [c.truth for c in cases], seed)
    for c in cases:
        st = stats_wo[c.support].get(c.organ, OrganStats())
        f = organ_features(c.evidence, st.volume_ml, st.z_extent_mm)
        f["expected_dice_voxel"] = expected_dice(voxel_wo[c.support].error(c.evidence), c.evidence.mask)
        peers = [d.dice for d in cases if d.organ == c.organ and d.support != c.support]
        f["organ_mean_dice"] = float(np.mean(peers)) if peers else float(np.mean(ts.y))
        ts.rows.append(f)
    return ts


def inner_residuals(ts, features=DEFAULT_FEATURES, l2=1.0, l2_organ=DEFAULT_L2_ORGAN):
    """``(residuals, predicted)``: leave-one-support-out residuals of the Dice model within ``ts`` and its
    predictions (in principle a little optimistic: the fusions of the other supports' cases saw the
    left-out support, :func:`cross_validate`'s never do; on hn-openkbp's library the two give the default
    model's 80 % half-width as 0.243 and 0.245, so a calibration can spare the nested fits)."""
    residuals, predicted = [], []
    for s in ts.supports:
        train = [i for i, c in enumerate(ts.cases) if c.support != s]
        m = DiceModel.fit([ts.rows[i] for i in train], [ts.y[i] for i in train], features, l2,
                          organs=[ts.cases[i].organ for i in train], l2_organ=l2_organ)
        for i, c in enumerate(ts.cases):
            if c.support == s:
                predicted.append(m.predict(ts.rows[i], c.organ))
                residuals.append(ts.y[i] - predicted[-1])
    return residuals, predicted


def fit_from(ts, features=DEFAULT_FEATURES, l2=1.0, half_width=None, coverage=COVERAGE,
             l2_organ=DEFAULT_L2_ORGAN):
    """The :class:`QualityModel` of a :class:`TrainingSet`; ``half_width`` None: from
    :func:`inner_residuals`. An uncalibrated model where the set is too small."""
    features = tuple(features)
    if not ts.enough:
        return QualityModel(None, None, ts.stats, False, coverage, {"why": "too few leave-one-out cases"})
    if half_width is None:
        residuals, predicted = inner_residuals(ts, features, l2, l2_organ)
        half_width = conformal_half_width(residuals, coverage, predicted)
    dice = DiceModel.fit(ts.rows, ts.y, features, l2, half_width, [c.organ for c in ts.cases], l2_organ)
    # what the Dice model was fitted on, kept with it: which evidence followed the Dice in the library's
    # runs can be set beside what follows it on queries (benchmarks/quality_features.py)
    training = [{"support": c.support, "organ": c.organ, "dice": round(float(y), 6),
                 "features": {k: round(float(v), 6) for k, v in row.items()}}
                for c, row, y in zip(ts.cases, ts.rows, ts.y)]
    return QualityModel(ts.voxel, dice, ts.stats, True, coverage,
                        {"cases": len(ts.cases), "supports": ts.supports, "features": list(features), "l2": l2,
                         "l2_organ": l2_organ, "half_width": half_width, "training": training})


def fit_quality(cases, labels, names, features=None, l2=1.0, half_width=None, coverage=COVERAGE,
                review_margin=REVIEW_MARGIN, seed=0, l2_organ=DEFAULT_L2_ORGAN):
    """The :class:`QualityModel` of these :class:`LibraryCase` (a library's held-out results):
    :func:`training_set`, then :func:`fit_from`. ``features``: the Dice model's (default
    :data:`URSAMLib.quality.model.DEFAULT_FEATURES`); ``half_width``: the interval's, from
    :func:`cross_validate` (None: :func:`inner_residuals`). Too few supports or cases: an uncalibrated
    model (the expected Dice alone)."""
    ts = training_set(cases, labels, names, review_margin, seed)
    return fit_from(ts, features or DEFAULT_FEATURES, l2, half_width, coverage, l2_organ)


def nested_sets(per_support, spacing, labels, names, budget=0.1, fit_fusion=None, progress=None, supports=None):
    """``{support: TrainingSet}``: for each support, the other supports' organs fused without it too (and
    without their own), made ready for the Dice model against the library without it."""
    out = {}
    for s in supports or list(per_support):
        train = held_out_cases(per_support, spacing, budget, exclude=(s,), fit_fusion=fit_fusion, progress=progress)
        out[s] = training_set(train, {k: v for k, v in labels.items() if k != s}, names)
    return out


def cross_validated_pairs(cases, nested, features=DEFAULT_FEATURES, l2=1.0, l2_organ=DEFAULT_L2_ORGAN):
    """:class:`PairPrediction` of each first-level case (fused without its support) by the quality model
    of ``nested[its support]`` (fitted without that support at every level)."""
    pairs = []
    for s, ts in nested.items():
        model = fit_from(ts, features, l2, l2_organ=l2_organ)
        for c in cases:
            if c.support == s:
                q = model.assess(c.evidence)
                pairs.append(PairPrediction(s, c.organ, q.predicted_dice, q.interval[0], q.interval[1], c.dice))
    return pairs


def cross_validate(per_support, spacing, labels, names, budget=0.1, features=None, l2=1.0, fit_fusion=None,
                   first_level=None, progress=None, l2_organ=DEFAULT_L2_ORGAN):
    """Leave one support out, all of it: for each support, the fusions of the other supports' organs are
    fitted without it too, the quality model on them, and its organs (fused without it) predicted.
    Returns ``(pairs, cases)``: :class:`PairPrediction` per organ of every support, and the first-level
    :class:`LibraryCase` list (each fused without its own support), which the final model is fitted on.
    ``first_level``: those cases when already made."""
    cases = first_level if first_level is not None else held_out_cases(per_support, spacing, budget,
                                                                       fit_fusion=fit_fusion, progress=progress)
    nested = nested_sets(per_support, spacing, labels, names, budget, fit_fusion, progress,
                         sorted({c.support for c in cases}))
    return cross_validated_pairs(cases, nested, features or DEFAULT_FEATURES, l2, l2_organ), cases
