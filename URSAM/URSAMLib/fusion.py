"""Calibrated atlas–SAM fusion: one probability per organ and voxel from SAM and the warped support labels.

The evidence of one organ, over its region of the query (:class:`Evidence`):

- ``sam``: the SAM ensemble p̄ (METHOD.md §3) of the organ's prompt mode;
- ``atlas``: the fraction of supports whose warped labels have the organ (the atlas prior);
- ``atlas_lw``: the same vote with each support weighted, voxel by voxel, by how well its warped image
  matches the query there (locally weighted voting, as joint label fusion does).

An organ's :class:`OrganFusion` pools them in logit space,
``logit p = (Σ_s w_s · logit x_s + c) / T`` on inputs clipped away from 0 and 1,
so one source with weight 1 and no bias reproduces that source ("atlas only",
"SAM only"), and a temperature ``T`` makes p a calibrated probability. The
organ's mask is ``p > threshold``, optionally rectified by Algorithm 1 on the
fused probability and its entropy (:mod:`URSAMLib.rectification`); voxels
whose entropy exceeds ``flag_threshold`` are flagged for review. The
calibration (:mod:`URSAMLib.calibration`) fits all of it per organ on the
template library itself.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from .rectification import RectifyOptions, rectify
from .uncertainty import LOG2, binary_entropy

SOURCES = ("sam", "atlas", "atlas_lw")
#: the review budget: a fused organ's flagged voxels are at most this fraction of its segmented volume
DEFAULT_REVIEW_BUDGET = 0.1
#: how far each source is clipped from 0 and 1 before its logit: a vote of 0 of K supports means "unlikely",
#: not "impossible"; SAM's sigmoid saturates, so its clip is tighter
CLIP = {"sam": 1e-3, "atlas": 0.01, "atlas_lw": 0.01}


def logit(p, eps):
    p = np.clip(np.asarray(p, np.float32), eps, 1.0 - eps)
    return np.log(p) - np.log1p(-p)


def sigmoid(z):
    return (1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))).astype(np.float32)


def fit_logistic(X, y, w, ridge, iterations, tol):
    """Weighted logistic regression by Newton's method: the coefficients of ``X``'s columns, whose last is the
    bias (a column of ones). ``ridge``: the penalty on every coefficient but the bias, which keeps them finite
    on separable data; stops after ``iterations`` or where no step exceeds ``tol``."""
    beta = np.zeros(X.shape[1])
    penalty = ridge * np.eye(X.shape[1])
    penalty[-1, -1] = 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(X @ beta, -30, 30)))
        grad = X.T @ (w * (p - y)) + penalty @ beta
        hess = (X * (w * p * (1 - p))[:, None]).T @ X + penalty + 1e-9 * np.eye(X.shape[1])
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.abs(step).max() < tol:
            break
    return beta


@dataclass
class Evidence:
    """One organ's sources over its region (arrays of one shape), and the image there for rectification."""
    sources: dict
    intensity: Optional[np.ndarray] = None

    @property
    def shape(self):
        return next(iter(self.sources.values())).shape

    def logits(self, name):
        return logit(self.sources[name], CLIP[name])


@dataclass
class OrganFusion:
    """One organ's fitted fusion (see the module docstring); ``weights``: source name -> weight."""
    name: str
    weights: dict = field(default_factory=lambda: {"atlas": 1.0})
    bias: float = 0.0
    temperature: float = 1.0
    threshold: float = 0.5
    #: Algorithm 1 on the fused probability: None, or RectifyOptions fields (``lower``, ``alpha_h``)
    rectify: Optional[dict] = None
    #: entropy from which on a voxel is flagged for review (nats)
    flag_threshold: float = 0.5 * LOG2
    #: the prompt mode whose SAM ensemble is this organ's ``sam`` source
    sam_mode: Optional[str] = None

    @property
    def uses(self):
        """The sources with a non-zero weight."""
        return tuple(s for s in SOURCES if self.weights.get(s, 0.0) != 0.0)

    def logits(self, evidence):
        z = np.full(evidence.shape, float(self.bias), np.float32)
        for name in self.uses:
            z += np.float32(self.weights[name]) * evidence.logits(name)
        return z / np.float32(self.temperature)

    def probability(self, evidence):
        return sigmoid(self.logits(evidence))

    def mask(self, p, u=None, intensity=None):
        """The organ's mask from its fused probability (and Algorithm 1, where the fit asks for it)."""
        mask = p > self.threshold
        if self.rectify is None or intensity is None:
            return mask
        u = binary_entropy(p) if u is None else u
        # the fit records only what it chose; every other option keeps RectifyOptions' own default
        opts = RectifyOptions(**{k: v for k, v in self.rectify.items() if k in ("lower", "alpha_h", "scope")})
        return rectify(mask, u, np.asarray(intensity, np.float32), opts)[0]

    def to_json(self):
        return {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data):
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**fields)


@dataclass
class Fused:
    """One organ's fused result over its region: probability, mask, entropy and the flagged voxels."""
    probability: np.ndarray
    mask: np.ndarray
    uncertainty: np.ndarray
    flagged: np.ndarray


def fuse(evidence, model, budget=None):
    """Apply ``model`` to ``evidence``. ``budget``: at most this fraction of the mask's volume is flagged
    (the most uncertain voxels first), whatever the flag threshold lets through."""
    p = model.probability(evidence)
    u = binary_entropy(p)
    mask = model.mask(p, u, evidence.intensity)
    flagged = u >= np.float32(model.flag_threshold)
    if budget is not None:
        flagged = cap_flags(flagged, u, budget * int(np.count_nonzero(mask)))
    return Fused(p, mask, u, flagged)


def cap_flags(flagged, u, limit):
    """``flagged`` cut to its ``limit`` most uncertain voxels."""
    limit = int(max(0, limit))
    n = int(np.count_nonzero(flagged))
    if n <= limit:
        return flagged
    out = np.zeros_like(flagged)
    if limit == 0:
        return out
    idx = np.flatnonzero(flagged)
    keep = idx[np.argsort(-u.ravel()[idx], kind="stable")[:limit]]
    out.ravel()[keep] = True
    return out


def expected_errors(p, mask):
    """Each voxel's probability of being wrong under the calibrated ``p``: p outside the mask, 1 - p inside."""
    return np.where(mask, 1.0 - p, p).astype(np.float32)
