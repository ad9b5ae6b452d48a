"""The atlas prior: the support labels warped into the query and fused into a vote fraction per organ.

The slice-adaptive prompt modes (:mod:`URSAMLib.prompt_modes`) take each
slice's box from it, and rectification may use it as a prior
(:func:`URSAMLib.rectification.atlas_rectified`). The warping itself is
:mod:`URSAMLib.registration`; :meth:`URSAMLib.localization.Localization.priors`
builds and caches the priors of one query.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Prior:
    """One organ's fused vote fraction over a crop of the query: ``frac[z, y, x]`` at ``origin``."""
    label: int
    name: str
    origin: tuple  # (z, y, x) of frac[0, 0, 0] in the volume
    frac: np.ndarray  # float32 in [0, 1]
    n_supports: int

    def on(self, sl):
        """The vote fraction over the volume region ``sl`` (zeros outside the crop)."""
        out = np.zeros(tuple(s.stop - s.start for s in sl), np.float32)
        src, dst = [], []
        for s, o, n in zip(sl, self.origin, self.frac.shape):
            lo, hi = max(s.start, o), min(s.stop, o + n)
            if hi <= lo:
                return out
            src.append(slice(lo - o, hi - o))
            dst.append(slice(lo - s.start, hi - s.start))
        out[tuple(dst)] = self.frac[tuple(src)]
        return out

    def mask(self, threshold):
        """Voxels where the prior has the organ; the best-voted voxels where none reach the threshold."""
        m = self.frac >= threshold
        if not m.any() and self.frac.max() > 0:
            m = self.frac >= self.frac.max()
        return m


def fuse_priors(reference, registrations, library, values, names=None):
    """``{value: Prior}``: each support's labels warped onto ``reference`` (the query), votes averaged.

    A support votes only for the organs it labels, so an organ missing from
    one support is not voted down by it. ``registrations``: the support
    registrations of :class:`URSAMLib.localization.Localization` (affine, or with
    the deformable stage on top).
    """
    from .registration.warp import warp_labels

    by_id = {t.case_id: t for t in library.templates()}
    values = [int(v) for v in values]
    sums, counts = {}, {v: 0 for v in values}
    for r in registrations:
        warped = warp_labels(reference, r, by_id[r.case_id], values)
        arr = _array(warped)
        present = [v for v in values if v in r.points] if r.points else values
        for v in present:
            counts[v] += 1
            idx = np.argwhere(arr == v)
            if len(idx) == 0:
                continue
            lo, hi = idx.min(0), idx.max(0) + 1
            sums.setdefault(v, []).append((lo, hi, arr[tuple(slice(a, b) for a, b in zip(lo, hi))] == v))
    priors = {}
    names = names or library.names
    for v, parts in sums.items():
        lo = np.min([p[0] for p in parts], axis=0)
        hi = np.max([p[1] for p in parts], axis=0)
        acc = np.zeros(tuple(hi - lo), np.float32)
        for plo, phi, m in parts:
            acc[tuple(slice(a - b, c - b) for a, b, c in zip(plo, lo, phi))] += m
        acc /= max(1, counts[v])
        priors[v] = Prior(v, names.get(v, f"label_{v}"), tuple(int(x) for x in lo), acc, counts[v])
    return priors


def _array(image):
    import SimpleITK as sitk

    return sitk.GetArrayViewFromImage(image)
