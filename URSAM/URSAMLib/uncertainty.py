"""Ensemble and uncertainty (paper eq. 2 and 3)."""
from __future__ import annotations

import numpy as np

LOG2 = float(np.log(2.0))


def ensemble(probabilities):
    """Mean of the member probability maps (axis 0) and the ensemble mask p̄ > 0.5."""
    p_mean = np.mean(np.asarray(probabilities, dtype=np.float32), axis=0)
    return p_mean, p_mean > 0.5


def binary_entropy(p):
    """Predictive entropy of the ensemble in nats: 0 where p is 0 or 1, log 2 at p = 0.5."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.where(p > 0, p * np.log(p), 0.0) + np.where(p < 1, (1 - p) * np.log1p(-p), 0.0))
    return np.clip(h, 0.0, LOG2).astype(np.float32)
