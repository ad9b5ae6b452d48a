"""The quality estimate of one organ as the report gives it.

``organs[i].quality`` of report.json::

    {"predicted_dice": 0.71, "interval": [0.62, 0.80], "review": "check" | "ok",
     "slices": [{"z": 41, "expected_error_voxels": 37.5}, ...]}

``slices`` holds every slice of the organ's box, most expected wrong voxels
first (false positives and false negatives together: each voxel counts its
probability of being wrong); ``z`` is the slice's index along the input file's
own slice axis (its third index, k, for an axial scan).
"""
from __future__ import annotations

import numpy as np

#: the keys of one organ's quality, in this order
QUALITY_KEYS = ("predicted_dice", "interval", "review", "slices")
REVIEW_VALUES = ("check", "ok")


def slice_errors(error):
    """Expected wrong voxels per slice of the region (float64 [z])."""
    return np.asarray(error, np.float64).reshape(error.shape[0], -1).sum(1)


def ranked_slices(error, mask=None, slice_index=None):
    """``[(z, expected wrong voxels)]`` of every slice of the region, most first (ties: lower z first).
    ``slice_index``: each region slice's index in the input file (default 0..z-1)."""
    per = slice_errors(error)
    index = np.arange(len(per)) if slice_index is None else np.asarray(slice_index, int)
    order = np.lexsort((index, -per))
    return [(int(index[i]), float(per[i])) for i in order]


def input_slice_index(orientation, z_start, n_slices):
    """Each canonical slice ``z_start .. z_start + n_slices - 1`` (the grid the organs' maps are on) as an
    index along the input file's own axis of those slices (``orientation``: :class:`URSAMLib.orientation.
    Orientation`, None for a canonical input)."""
    z = np.arange(z_start, z_start + n_slices)
    if orientation is None or orientation.identity:
        return z
    axis = orientation.axes[2]
    return orientation.size[axis] - 1 - z if orientation.flips[2] else z


def quality_dict(predicted_dice, interval, review, slices, digits=4):
    """Exactly ``{"predicted_dice", "interval", "review", "slices"}`` of one organ from plain values:
    ``slices`` as ``[(z, expected wrong voxels)]`` (already ranked)."""
    if review not in REVIEW_VALUES:
        raise ValueError(f"review must be one of {REVIEW_VALUES}, got {review!r}")
    lo, hi = interval
    return {"predicted_dice": round(float(predicted_dice), digits),
            "interval": [round(float(lo), digits), round(float(hi), digits)],
            "review": review,
            "slices": [{"z": int(z), "expected_error_voxels": round(float(v), 2)} for z, v in slices]}


def organ_quality(evidence, model, threshold=None):
    """The report's quality dict of one organ (:class:`URSAMLib.quality.features.OrganEvidence`) under a
    library's :class:`URSAMLib.quality.model.QualityModel`; ``threshold``: the user's review threshold."""
    q = model.assess(evidence, threshold)
    return quality_dict(q.predicted_dice, q.interval, q.review, q.slices)
