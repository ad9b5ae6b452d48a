"""The fitted parts of the quality estimate: a voxel error model and a Dice model, and the two together.

- :class:`VoxelErrorModel`: each voxel's probability of being wrong, a logistic
  model on :data:`~URSAMLib.quality.features.VOXEL_FEATURES` (the calibrated
  probability's own error, and where the voxel lies against the result). It
  only scores: the result's mask is never changed.
- :class:`DiceModel`: an organ's Dice from :data:`~URSAMLib.quality.features.FEATURES`,
  a ridge regression on standardised features, with an interval whose
  half-width is the conformal quantile of cross-validated residuals.
- :class:`QualityModel`: both, with the library's per-organ statistics (typical
  volume and extent, mean Dice, review threshold); JSON-ready so that a
  calibration can store it. Uncalibrated (no fit): the expected Dice of the
  calibrated probability and a default interval.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from ..fusion import fit_logistic
from .features import VOXEL_FEATURES, base_error, expected_dice, organ_features, voxel_features
from .report import ranked_slices

#: the interval's nominal coverage
COVERAGE = 0.8
#: half-width of the interval where nothing was fitted, at a Dice of 0.7 (an uncalibrated estimate says little)
DEFAULT_HALF_WIDTH = 0.2
#: the Dice model's default: the result's pooled Dice with the warped supports and its fit to the image's
#: edges, with shrunk organ offsets; chosen among candidate models by the lowest nested cross-validated MAE
#: on hn-openkbp's library (quality.library.cross_validate)
DEFAULT_FEATURES = ("mask_vote_dice", "ring_contrast")
DEFAULT_L2_ORGAN = 3.0
#: the review threshold of an organ the library has none for (an uncalibrated estimate, an organ the
#: calibration did not see): "check" below this predicted Dice
UNCALIBRATED_THRESHOLD = 0.7
#: default review threshold: "check" an organ predicted this far below the library's own mean Dice for it
REVIEW_MARGIN = 0.0
#: the interval's width grows with the predicted error, 1 - Dice, plus this floor (a near-perfect prediction
#: still has an interval)
SPREAD_FLOOR = 0.1


def spread(predicted):
    """How wide an interval around ``predicted`` is, relative to others: residuals of a Dice near 1 are
    small, those of a poor result large (the library's leave-one-out residuals grow as the Dice falls)."""
    return 1.0 - np.asarray(predicted, float) + SPREAD_FLOOR


@dataclass
class VoxelErrorModel:
    """``P(voxel wrong) = sigmoid(coef · features + bias)``; ``coef`` in :data:`VOXEL_FEATURES` order."""
    coef: tuple = (1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    bias: float = 0.0
    features: tuple = VOXEL_FEATURES

    def error(self, ev):
        """float32 [z, y, x]: each voxel's probability of being wrong in ``ev``'s result."""
        X, _ = voxel_features(ev)
        z = X @ np.asarray(self.coef, np.float64) + self.bias
        return (1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))).astype(np.float32).reshape(ev.mask.shape)

    @classmethod
    def fit(cls, evidences, truths, seed=0, negatives=20000):
        """Maximum likelihood over the cases' regions: every error voxel and a weighted sample of the
        others, each case weighing the same (a large organ would otherwise set the model alone)."""
        rng = np.random.default_rng(seed)
        Xs, ys, ws = [], [], []
        for ev, truth in zip(evidences, truths):
            X, _ = voxel_features(ev)
            y = (ev.mask != np.asarray(truth, bool)).ravel()
            pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
            take_pos = min(len(pos), negatives)
            take_neg = min(len(neg), negatives)
            ip = rng.choice(pos, take_pos, replace=False) if take_pos < len(pos) else pos
            ineg = rng.choice(neg, take_neg, replace=False) if take_neg < len(neg) else neg
            scale = 1.0 / max(y.size, 1)
            Xs.append(X[np.r_[ip, ineg]])
            ys.append(np.r_[np.ones(len(ip)), np.zeros(len(ineg))])
            ws.append(np.r_[np.full(len(ip), len(pos) / max(len(ip), 1) * scale),
                            np.full(len(ineg), len(neg) / max(len(ineg), 1) * scale)])
        w = np.concatenate(ws)
        # a light ridge, in proportion to the weights (which sum to about the number of cases)
        beta = fit_logistic(np.c_[np.concatenate(Xs), np.ones(len(w))], np.concatenate(ys), w,
                            ridge=1e-3 * float(np.sum(w)), iterations=50, tol=1e-8)
        return cls(tuple(float(b) for b in beta[:-1]), float(beta[-1]))

    def to_json(self):
        return {"coef": list(self.coef), "bias": self.bias, "features": list(self.features)}

    @classmethod
    def from_json(cls, data):
        return cls(tuple(data["coef"]), float(data["bias"]), tuple(data.get("features", VOXEL_FEATURES)))


@dataclass
class DiceModel:
    """``Dice ≈ intercept + Σ coef · (x - mean) / scale + organ_offset[organ]`` over ``features``.

    The organ offsets are ridge coefficients of one-hot organ columns (``l2_organ``): an organ the library
    segments better or worse than its features say gets a shrunk correction, none for an organ it never
    saw. The interval is ``predicted ± half_width · spread(predicted)`` (:func:`spread`), clipped to [0, 1]."""
    features: tuple = DEFAULT_FEATURES
    coef: tuple = (1.0,)
    mean: tuple = (0.0,)
    scale: tuple = (1.0,)
    intercept: float = 0.0
    half_width: float = DEFAULT_HALF_WIDTH
    l2: float = 1.0
    organ_offset: dict = field(default_factory=dict)
    l2_organ: Optional[float] = None
    #: the Dice range the fit saw: a linear fit is not followed past its data (a query's features may lie
    #: beyond the library's, e.g. a vote of more supports than any leave-one-out run had)
    y_range: tuple = (0.0, 1.0)

    def predict(self, feats, organ=None):
        x = (np.array([feats[f] for f in self.features]) - self.mean) / self.scale
        value = self.intercept + float(np.dot(self.coef, x)) + self.organ_offset.get(organ, 0.0)
        return float(np.clip(value, *self.y_range))

    def interval(self, predicted):
        h = self.half_width * float(spread(predicted))
        return [float(max(0.0, predicted - h)), float(min(1.0, predicted + h))]

    @classmethod
    def fit(cls, rows, y, features=DEFAULT_FEATURES, l2=1.0, half_width=DEFAULT_HALF_WIDTH, organs=None,
            l2_organ=None):
        """Ridge regression of ``y`` on the ``features`` of ``rows`` (dicts), standardised; ``l2`` in units of
        one case's squared deviation. With ``organs`` (each row's organ) and ``l2_organ``, also a shrunk
        offset per organ (an organ with k cases keeps about k / (k + l2_organ) of its mean residual)."""
        X = np.array([[r[f] for f in features] for r in rows], np.float64).reshape(len(rows), len(features))
        y = np.asarray(y, np.float64)
        mean = X.mean(0)
        scale = X.std(0)
        scale[scale < 1e-9] = 1.0
        Z = (X - mean) / scale
        penalty = [l2] * len(features)
        names = []
        if organs is not None and l2_organ is not None:
            names = sorted(set(organs))
            Z = np.c_[Z, np.array([[o == n for n in names] for o in organs], np.float64)]
            penalty += [l2_organ] * len(names)
        beta = np.linalg.solve(Z.T @ Z + np.diag(penalty), Z.T @ (y - y.mean()))
        k = len(features)
        return cls(tuple(features), tuple(float(c) for c in beta[:k]), tuple(float(v) for v in mean),
                   tuple(float(v) for v in scale), float(y.mean()), half_width, l2,
                   {n: float(b) for n, b in zip(names, beta[k:])}, l2_organ, (float(y.min()), float(y.max())))

    def to_json(self):
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data):
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()
                      if k in cls.__dataclass_fields__})


def conformal_half_width(residuals, coverage=COVERAGE, predicted=None):
    """The split-conformal half-width: the ⌈(n + 1)·coverage⌉-th smallest absolute residual (inf where
    there are too few residuals for that coverage); with the ``predicted`` values, of the residuals over
    their :func:`spread` (normalised conformal prediction: :meth:`DiceModel.interval` scales it back)."""
    r = np.abs(np.asarray(residuals, float))
    if predicted is not None:
        r = r / spread(predicted)
    r = np.sort(r)
    k = int(np.ceil((len(r) + 1) * coverage))
    return float(r[k - 1]) if 0 < k <= len(r) else float("inf")


@dataclass
class OrganStats:
    """One organ in the library's own labels: median volume (ml) and cranio-caudal extent (mm), mean Dice
    of its leave-one-out results, and the predicted Dice below which it is to be checked."""
    volume_ml: Optional[float] = None
    z_extent_mm: Optional[float] = None
    mean_dice: Optional[float] = None
    threshold: Optional[float] = None


@dataclass
class OrganQuality:
    """The quality estimate of one organ: predicted Dice and its interval, the review decision, the
    region's slices by expected wrong voxels (most first, ``(slice index, voxels)``), and the error map
    (float32 [z, y, x] over the region: each voxel's probability of being wrong)."""
    name: str
    predicted_dice: float
    interval: list
    review: str
    slices: list
    error: np.ndarray = None
    calibrated: bool = True
    threshold: Optional[float] = None
    features: dict = field(default_factory=dict)
    #: the organ's region on the canonical grid ((z, y, x) slices), where ``error`` lies
    region: Optional[tuple] = None


@dataclass
class QualityModel:
    """The quality estimate of a library: :class:`VoxelErrorModel`, :class:`DiceModel`, per-organ
    :class:`OrganStats`. ``calibrated`` False: nothing was fitted (too small a library), the prediction is
    the expected Dice of the calibrated probability and the interval :data:`DEFAULT_HALF_WIDTH` wide."""
    voxel: Optional[VoxelErrorModel] = None
    dice: Optional[DiceModel] = None
    organs: dict = field(default_factory=dict)  # name -> OrganStats
    calibrated: bool = False
    coverage: float = COVERAGE
    info: dict = field(default_factory=dict)

    def error_map(self, ev):
        """Each voxel's probability of being wrong: the voxel model's, else the calibrated probability's own."""
        return self.voxel.error(ev) if self.voxel is not None else base_error(ev.probability, ev.mask)

    def features(self, ev, error=None):
        """The Dice model's inputs for one organ: :func:`organ_features`, the expected Dice under the voxel
        model's ``error`` map, and the library's mean Dice for the organ (the organ as a feature)."""
        stats = self.organs.get(ev.name, OrganStats())
        feats = organ_features(ev, stats.volume_ml, stats.z_extent_mm)
        feats["expected_dice_voxel"] = expected_dice(self.error_map(ev) if error is None else error, ev.mask)
        feats["organ_mean_dice"] = stats.mean_dice if stats.mean_dice is not None else feats["expected_dice"]
        return feats

    def assess(self, ev, threshold=None):
        """The :class:`OrganQuality` of one organ. ``threshold``: the user's review threshold (a number),
        else the library's for this organ, else :data:`UNCALIBRATED_THRESHOLD`."""
        error = self.error_map(ev)
        feats = self.features(ev, error)
        if self.calibrated and self.dice is not None:
            predicted = self.dice.predict(feats, ev.name)
            interval = self.dice.interval(predicted)
        else:
            predicted = feats["expected_dice"]
            interval = DiceModel(half_width=DEFAULT_HALF_WIDTH / (1.0 - 0.7 + SPREAD_FLOOR)).interval(predicted)
        if threshold is None:
            threshold = self.organs.get(ev.name, OrganStats()).threshold
        if threshold is None:
            threshold = UNCALIBRATED_THRESHOLD
        review = "check" if predicted < threshold else "ok"
        return OrganQuality(ev.name, predicted, interval, review, ranked_slices(error, ev.mask, ev.slice_index),
                            error, self.calibrated and self.dice is not None, threshold, feats)

    def to_json(self):
        return {"calibrated": self.calibrated, "coverage": self.coverage,
                "voxel": self.voxel.to_json() if self.voxel else None,
                "dice": self.dice.to_json() if self.dice else None,
                "organs": {n: asdict(s) for n, s in self.organs.items()}, "info": self.info}

    @classmethod
    def from_json(cls, data):
        return cls(VoxelErrorModel.from_json(data["voxel"]) if data.get("voxel") else None,
                   DiceModel.from_json(data["dice"]) if data.get("dice") else None,
                   {n: OrganStats(**s) for n, s in data.get("organs", {}).items()},
                   bool(data.get("calibrated", False)), float(data.get("coverage", COVERAGE)),
                   dict(data.get("info", {})))
