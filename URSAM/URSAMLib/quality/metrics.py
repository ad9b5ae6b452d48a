"""How good a quality estimate is, against the truth (the quality section of an evaluation).

- :func:`dice_prediction_scores`: Spearman and mean absolute error of the
  predicted against the true Dice over case × organ pairs (pooled, and the mean
  of the per-organ values), and how often the interval holds the true Dice;
- :func:`slice_share`: the share of an organ's error voxels on the top
  fraction of its ranked slices, and the share a random ranking gives;
- :func:`voxel_auroc`: the voxel AUROC of a per-voxel score for the error
  voxels over the organ's neighbourhood (as ``ursam evaluate`` scores the
  uncertainty);
- :func:`review_scores`: how well "check" finds the organs truly below their
  threshold.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..metrics import auroc, near, spearman


@dataclass
class PairPrediction:
    """One organ of one case: the predicted Dice, its interval, the true Dice."""
    case: str
    organ: str
    predicted: float
    low: float
    high: float
    true_dice: float


@dataclass
class DicePredictionScores:
    """Scores of predicted against true Dice. ``within_*``: the mean over organs of the per-organ value
    (organs with fewer than 3 pairs have no Spearman); ``per_organ``: organ -> {n, spearman, mae,
    coverage}."""
    n: int
    spearman: float
    mae: float
    coverage: float
    within_spearman: float
    within_mae: float
    per_organ: dict = field(default_factory=dict)

    def to_json(self):
        def r(v):
            return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 4)

        return {"n": self.n, "spearman": r(self.spearman), "mae": r(self.mae), "coverage": r(self.coverage),
                "within_organ_spearman": r(self.within_spearman), "within_organ_mae": r(self.within_mae),
                "per_organ": {o: {k: (r(v) if k != "n" else v) for k, v in s.items()}
                              for o, s in self.per_organ.items()}}


def _scores(pairs):
    pred = np.array([p.predicted for p in pairs], float)
    true = np.array([p.true_dice for p in pairs], float)
    held = np.array([p.low <= p.true_dice <= p.high for p in pairs], float)
    return {"n": len(pairs), "spearman": spearman(pred, true) if len(pairs) >= 3 else float("nan"),
            "mae": float(np.mean(np.abs(pred - true))) if len(pairs) else float("nan"),
            "coverage": float(held.mean()) if len(pairs) else float("nan")}


def dice_prediction_scores(pairs):
    """:class:`DicePredictionScores` of a list of :class:`PairPrediction`."""
    pooled = _scores(pairs)
    organs = sorted({p.organ for p in pairs})
    per_organ = {o: _scores([p for p in pairs if p.organ == o]) for o in organs}
    within_s = [s["spearman"] for s in per_organ.values() if np.isfinite(s["spearman"])]
    within_m = [s["mae"] for s in per_organ.values() if np.isfinite(s["mae"])]
    return DicePredictionScores(pooled["n"], pooled["spearman"], pooled["mae"], pooled["coverage"],
                                float(np.mean(within_s)) if within_s else float("nan"),
                                float(np.mean(within_m)) if within_m else float("nan"), per_organ)


def slice_share(expected_per_slice, errors_per_slice, total_errors, fraction):
    """``(share, random share)``: of an organ's ``total_errors`` error voxels (the whole scan's, so errors
    off the ranked slices count against the ranking), the share on the top ``fraction`` of its slices by
    ``expected_per_slice`` (at least one slice), and the share a random ranking of the same slices gives
    on average. NaN where the organ has no error voxel."""
    expected = np.asarray(expected_per_slice, float)
    errors = np.asarray(errors_per_slice, float)
    if total_errors <= 0 or len(expected) == 0:
        return float("nan"), float("nan")
    k = max(1, int(math.ceil(fraction * len(expected))))
    top = np.argsort(-expected, kind="stable")[:k]
    return float(errors[top].sum() / total_errors), float(k / len(expected) * errors.sum() / total_errors)


def voxel_auroc(score, pred, truth, spacing_zyx):
    """AUROC of ``score`` for the error voxels (``pred != truth``) over the organ's neighbourhood: the
    prediction or the truth grown by 1 cm (:func:`URSAMLib.metrics.near`), whole-scan arrays."""
    region = near(np.asarray(pred, bool) | np.asarray(truth, bool), spacing_zyx)
    errors = (pred != truth) & region
    return auroc(np.asarray(score)[region], errors[region])


def review_scores(pairs, thresholds):
    """How "check" (predicted Dice below the organ's threshold) finds the pairs truly below it:
    ``{"flagged", "truly_below", "sensitivity", "precision"}``; ``thresholds``: organ -> threshold."""
    flagged = [p.predicted < thresholds[p.organ] for p in pairs if p.organ in thresholds]
    below = [p.true_dice < thresholds[p.organ] for p in pairs if p.organ in thresholds]
    f, b = np.array(flagged, bool), np.array(below, bool)
    hit = int(np.count_nonzero(f & b))
    return {"pairs": int(len(f)), "flagged": int(f.sum()), "truly_below": int(b.sum()),
            "sensitivity": hit / int(b.sum()) if b.any() else float("nan"),
            "precision": hit / int(f.sum()) if f.any() else float("nan")}


@dataclass
class OrganOutcome(PairPrediction):
    """One organ of one scored case: its quality estimate and the truth, for :func:`quality_scores`.

    ``expected_per_slice`` and ``errors_per_slice``: float [z] over the slices of its box (the estimate's
    expected wrong voxels, the true wrong voxels); ``total_errors``: the organ's wrong voxels in the whole
    scan; ``auroc``: the voxel AUROC of the shipped per-voxel score (:func:`voxel_auroc`), NaN if none.
    """
    expected_per_slice: np.ndarray
    errors_per_slice: np.ndarray
    total_errors: int
    auroc: float = float("nan")
    review: str = "ok"


@dataclass
class QualityScores:
    """Every figure of a quality estimate over case × organ pairs (:func:`quality_scores`)."""
    dice: DicePredictionScores
    slices: dict  # "top10", "random10", "oracle10", "top20", "random20", "oracle20": mean over pairs with errors
    auroc: float
    review: dict

    def to_json(self):
        return {"dice": self.dice.to_json(), "slices": {k: round(float(v), 4) for k, v in self.slices.items()},
                "auroc": round(float(self.auroc), 4), "review": self.review}


def quality_scores(outcomes, thresholds=None):
    """:class:`QualityScores` of a list of :class:`OrganOutcome`: the Dice prediction scores, the mean
    share of each organ's error voxels on its top 10 % and 20 % of ranked slices (with a random ranking's
    and the best possible ranking's, by the true errors), the mean voxel AUROC, and the review decision's
    hits against ``thresholds`` (organ -> threshold; None: against each outcome's own ``review``)."""
    shares = {k: [] for k in ("top10", "random10", "oracle10", "top20", "random20", "oracle20")}
    for o in outcomes:
        for f, tag in ((0.1, "10"), (0.2, "20")):
            s, r = slice_share(o.expected_per_slice, o.errors_per_slice, o.total_errors, f)
            best, _ = slice_share(o.errors_per_slice, o.errors_per_slice, o.total_errors, f)
            shares["top" + tag].append(s)
            shares["random" + tag].append(r)
            shares["oracle" + tag].append(best)
    slices = {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
              for k, v in ((k, np.array(v, float)) for k, v in shares.items())}
    aurocs = np.array([o.auroc for o in outcomes], float)
    if thresholds is not None:
        review = review_scores(outcomes, thresholds)
    else:
        flagged = np.array([o.review == "check" for o in outcomes], bool)
        review = {"pairs": len(outcomes), "flagged": int(flagged.sum())}
    return QualityScores(dice_prediction_scores(outcomes), slices,
                         float(np.nanmean(aurocs)) if np.isfinite(aurocs).any() else float("nan"), review)
