"""The statistical fit of one organ's fusion from its leave-one-out cases (:func:`fit_organ`).

Per organ, the evidence of the leave-one-out runs decides, by
leave-one-case-out cross-validation among the calibration cases:

- the fusion's sources and weights (:class:`URSAMLib.fusion.OrganFusion`;
  "atlas only" and "SAM only" are candidates, so the fit can never do worse
  on the calibration data than either source alone), and the organ's prompt
  mode;
- a temperature that makes the fused probability calibrated (maximum
  likelihood), and the threshold of its mask (the best Dice);
- whether Algorithm 1 rectifies the fused result, and with which bound;
- the flagging threshold that puts the most error voxels into the flagged
  regions for the review budget (flagged voxels at most ``budget`` of the
  organ's segmented volume).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Tuple

import numpy as np

from ..fusion import SOURCES, Evidence, OrganFusion, fit_logistic
from ..pipeline import ENSEMBLE, URSAM, URSAM_ATLAS
from ..uncertainty import LOG2, binary_entropy

#: the source sets a fit tries, single sources first (they win ties)
SOURCE_SETS = (("atlas",), ("atlas_lw",), ("sam",), ("sam", "atlas"), ("sam", "atlas_lw"), ("atlas", "atlas_lw"),
               ("sam", "atlas", "atlas_lw"))
THRESHOLDS = tuple(np.round(np.linspace(0.2, 0.8, 25), 3))
RECTIFY_CANDIDATES = (None, {"lower": "written", "alpha_h": 1.0}, {"lower": "written", "alpha_h": 1.2},
                      {"lower": "midpoint", "alpha_h": 1.0}, {"lower": "midpoint", "alpha_h": 1.2})
#: a rectification (or a richer model) must beat the simpler one by this much mean Dice to be chosen
MIN_GAIN = 0.002


@dataclass
class Case:
    """One organ of one calibration run: its sources over its region, the truth there, and the truth's
    voxels outside the region (they count against every model's Dice)."""
    evidence: Evidence
    #: the truth over the organ's region (bool, the evidence's shape)
    truth: np.ndarray
    outside: int
    #: masks of the existing methods over the region, by name
    reference: Dict[str, np.ndarray] = field(default_factory=dict)

    def dice(self, pred):
        """Dice of ``pred`` (a mask over the region) against the truth, the truth outside counted too."""
        inter = int(np.count_nonzero(pred & self.truth))
        total = int(np.count_nonzero(pred)) + int(np.count_nonzero(self.truth)) + self.outside
        return 1.0 if total == 0 else 2.0 * inter / total


@dataclass
class Candidate:
    """One model a fit tries: its sources in one prompt mode's cases, and their cross-validated Dice."""
    cv_dice: float
    #: the source set's place in SOURCE_SETS: lower is simpler
    rank: int
    mode: str
    sources: Tuple[str, ...]


@dataclass
class OrganFit:
    """What :func:`fit_organ` chose for one organ: the model, the best model without SAM (the ablation),
    and the mean leave-one-out Dice of each source alone, of the methods the cases carry and of the fused
    result (in-sample and cross-validated)."""
    model: OrganFusion
    no_sam: OrganFusion
    loo_dice: dict


def _design(case, sources):
    cols = [case.evidence.logits(s).ravel() for s in sources]
    return np.stack(cols + [np.ones(case.truth.size, np.float32)], 1).astype(np.float64)


def _sample(case, rng, negatives=20000):
    """All positive voxels and a weighted sample of the others (the region is mostly background)."""
    y = case.truth.ravel()
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    take = min(len(neg), negatives)
    idx = np.r_[pos, rng.choice(neg, take, replace=False)] if take else pos
    weights = np.r_[np.ones(len(pos)), np.full(take, len(neg) / max(take, 1))]
    return idx, weights


def _fit_weights(cases, sources, rng):
    """Logit-pooling weights and bias of ``sources`` by maximum likelihood over the cases' regions."""
    Xs, ys, ws = [], [], []
    for c in cases:
        idx, weights = _sample(c, rng)
        Xs.append(_design(c, sources)[idx])
        ys.append(c.truth.ravel()[idx].astype(np.float64))
        ws.append(weights)
    beta = fit_logistic(np.concatenate(Xs), np.concatenate(ys), np.concatenate(ws), ridge=1e-2, iterations=30,
                        tol=1e-7)
    return dict(zip(sources, (float(b) for b in beta[:-1]))), float(beta[-1])


def _temperature(cases, model, rng):
    """The temperature that makes the model's probability calibrated over the cases (maximum likelihood)."""
    z, y, w = [], [], []
    base = replace(model, temperature=1.0)
    for c in cases:
        idx, weights = _sample(c, rng)
        z.append(base.logits(c.evidence).ravel()[idx])
        y.append(c.truth.ravel()[idx])
        w.append(weights)
    z, y, w = np.concatenate(z).astype(np.float64), np.concatenate(y).astype(np.float64), np.concatenate(w)
    grid = np.exp(np.linspace(np.log(0.2), np.log(5.0), 61))

    def nll(t):
        zt = np.clip(z / t, -30, 30)
        return float(np.sum(w * (np.logaddexp(0, zt) - y * zt)))

    return float(min(grid, key=nll))


def _best_threshold(cases, model):
    probs = [model.probability(c.evidence) for c in cases]
    scores = [np.mean([c.dice(p > t) for p, c in zip(probs, cases)]) for t in THRESHOLDS]
    i = int(np.argmax(scores))
    return float(THRESHOLDS[i]), float(scores[i])


def _fitted(cases, sources, mode, name, rng):
    """A model of these sources fitted to ``cases``: weights (single sources: the source itself), the
    temperature, then the threshold."""
    if len(sources) == 1:
        model = OrganFusion(name, {sources[0]: 1.0}, 0.0, sam_mode=mode)
    else:
        weights, bias = _fit_weights(cases, sources, rng)
        model = OrganFusion(name, weights, bias, sam_mode=mode)
    model = replace(model, temperature=_temperature(cases, model, rng))
    threshold, score = _best_threshold(cases, model)
    return replace(model, threshold=threshold), score


def _cross_validated(cases, sources, mode, name, seed):
    """Mean held-out Dice of fitting on all cases but one, for each case in turn."""
    scores = []
    for i in range(len(cases)):
        rng = np.random.default_rng(seed + i)
        model, _ = _fitted(cases[:i] + cases[i + 1:], sources, mode, name, rng)
        held_out = cases[i]
        scores.append(held_out.dice(model.mask(model.probability(held_out.evidence), None,
                                               held_out.evidence.intensity)))
    return float(np.mean(scores))


def _with_rectification(cases, model):
    """The model with the rectification that does best on the cases (none unless it gains)."""
    def score(m):
        return float(np.mean([c.dice(m.mask(m.probability(c.evidence), None, c.evidence.intensity))
                              for c in cases]))

    best, best_score = model, score(model)
    for option in RECTIFY_CANDIDATES[1:]:
        m = replace(model, rectify=dict(option))
        s = score(m)
        if s > best_score + MIN_GAIN:
            best, best_score = m, s
    return best, best_score


def _flag_threshold(cases, model, budget):
    """The entropy from which on voxels are flagged: the most error voxels flagged while the flagged
    voxels stay within ``budget`` of the segmented volume, over all the cases together (ties at the
    threshold are cut to the budget when a query is fused: fusion.cap_flags)."""
    us, segmented = [], 0
    for c in cases:
        p = model.probability(c.evidence)
        mask = model.mask(p, None, c.evidence.intensity)
        us.append(binary_entropy(p).ravel())
        segmented += int(np.count_nonzero(mask))
    u = np.sort(np.concatenate(us))[::-1]
    allowed = int(budget * segmented)
    if allowed <= 0 or len(u) == 0:
        return LOG2
    # the entropy of the allowed-th most uncertain voxel: flagging from it on fills the budget
    return float(u[min(allowed, len(u)) - 1])


def fit_organ(name, by_mode, budget, seed=0):
    """Choose and fit one organ's fusion from its calibration cases (``{mode: [Case]}``).

    Returns an :class:`OrganFit`.
    """
    rng = np.random.default_rng(seed)
    candidates = [Candidate(_cross_validated(cases, sources, mode, name, seed), k, mode, sources)
                  for mode, cases in by_mode.items() for k, sources in enumerate(SOURCE_SETS)
                  if all(s in cases[0].evidence.sources for s in sources)]
    best_cv = max(c.cv_dice for c in candidates)
    # a richer model must beat the simplest one within reach of the best by MIN_GAIN (the first such wins)
    best = min((c for c in candidates if c.cv_dice >= best_cv - MIN_GAIN), key=lambda c: c.rank)
    cv, mode, sources = best.cv_dice, best.mode, best.sources
    cases = by_mode[mode]
    model, in_sample = _fitted(cases, sources, mode, name, rng)
    raw = _raw_sources(cases)
    best_raw = max(raw.values())
    if in_sample < best_raw:
        # never worse on the calibration data than a source alone
        src = max(raw, key=raw.get)
        model, in_sample = _fitted(cases, (src,), mode, name, rng)
    model, in_sample = _with_rectification(cases, model)
    model = replace(model, flag_threshold=_flag_threshold(cases, model, budget))
    no_sam_best = max((c for c in candidates if "sam" not in c.sources), key=lambda c: (c.cv_dice, -c.rank))
    no_sam, _ = _fitted(by_mode[no_sam_best.mode], no_sam_best.sources, None, name, rng)
    no_sam = replace(no_sam, flag_threshold=_flag_threshold(by_mode[no_sam_best.mode], no_sam, budget))
    loo = {f"{k} (0.5)": round(v, 4) for k, v in raw.items()}
    for ref in ("atlas vote", ENSEMBLE, URSAM, URSAM_ATLAS):
        if ref in cases[0].reference:
            loo[ref] = round(float(np.mean([c.dice(c.reference[ref]) for c in cases])), 4)
    loo["fusion"] = round(in_sample, 4)
    loo["fusion (cross-validated)"] = round(cv, 4)
    loo["cases"] = len(cases)
    return OrganFit(model, no_sam, loo)


def _raw_sources(cases):
    """Mean Dice of each source alone, thresholded at one half."""
    out = {}
    for s in SOURCES:
        if s in cases[0].evidence.sources:
            out[s] = float(np.mean([c.dice(c.evidence.sources[s] > 0.5) for c in cases]))
    return out
