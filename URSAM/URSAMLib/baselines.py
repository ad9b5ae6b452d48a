"""The uncertainty-correction baselines of the paper's tables (Yao et al., FNPC).

A fixed threshold on u, min + frac (max - min), selects the uncertain voxels;
μ is the mean intensity inside the ensemble mask. FNC adds uncertain voxels
outside ŷ with a·μ < x < b·μ; FPC removes uncertain voxels inside ŷ with
x < a·μ or x > b·μ; FPNC does FNC, then FPC. Defaults follow their code.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class FnpcOptions:
    frac: float = 0.2
    a: float = 0.5
    b: float = 0.7


def fnpc_uncertain(u, frac):
    if u.size == 0:
        return np.zeros(u.shape, bool)
    lo, hi = float(u.min()), float(u.max())
    return u > lo + frac * (hi - lo)


def _mu(mask, intensity):
    return float(intensity[mask].mean()) if mask.any() else float("nan")


def fnc(mask, u, intensity, options=FnpcOptions()):
    mask = np.asarray(mask, bool)
    unc = fnpc_uncertain(u, options.frac)
    mu = _mu(mask, intensity)
    if not np.isfinite(mu):
        return mask.copy()
    add = unc & ~mask & (intensity > options.a * mu) & (intensity < options.b * mu)
    return mask | add


def fpc(mask, u, intensity, options=FnpcOptions(), mu=None):
    mask = np.asarray(mask, bool)
    unc = fnpc_uncertain(u, options.frac)
    mu = _mu(mask, intensity) if mu is None else mu
    if not np.isfinite(mu):
        return mask.copy()
    remove = unc & mask & ((intensity < options.a * mu) | (intensity > options.b * mu))
    return mask & ~remove


def fpnc(mask, u, intensity, options=FnpcOptions()):
    # μ is taken once from ŷ, so the FPC step judges added voxels by the same yardstick.
    mu = _mu(np.asarray(mask, bool), intensity)
    return fpc(fnc(mask, u, intensity, options), u, intensity, options, mu=mu)


METHODS = {"unc-fpc": fpc, "unc-fnc": fnc, "unc-fpnc": fpnc}
