"""Scores: Dice, HD95 in mm, box IoU and centre error, AUROC of uncertainty."""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def dice(pred, truth):
    """Dice of two boolean masks; 1.0 when both are empty (nothing to find, nothing found)."""
    pred = np.asarray(pred, bool)
    truth = np.asarray(truth, bool)
    s = pred.sum() + truth.sum()
    if s == 0:
        return 1.0
    return float(2.0 * np.logical_and(pred, truth).sum() / s)


def _surface(mask):
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(pred, truth, spacing_zyx):
    """95th percentile symmetric surface distance in mm; inf where one mask is empty."""
    pred = np.asarray(pred, bool)
    truth = np.asarray(truth, bool)
    if not pred.any() and not truth.any():
        return 0.0
    if not pred.any() or not truth.any():
        return float("inf")
    # Crop to the union's bounding box (plus one voxel) to keep the transforms small.
    idx = np.argwhere(pred | truth)
    lo = np.maximum(idx.min(0) - 1, 0)
    hi = idx.max(0) + 2
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    p, t = pred[sl], truth[sl]
    sp, st = _surface(p), _surface(t)
    dt_t = ndimage.distance_transform_edt(~st, sampling=spacing_zyx)
    dt_p = ndimage.distance_transform_edt(~sp, sampling=spacing_zyx)
    d = np.concatenate([dt_t[sp], dt_p[st]])
    return float(np.percentile(d, 95))


def auroc(scores, positives):
    """Area under the ROC curve of ``scores`` for finding ``positives`` (rank formula, ties halved)."""
    scores = np.asarray(scores, np.float64).ravel()
    positives = np.asarray(positives, bool).ravel()
    n_pos = int(positives.sum())
    n_neg = positives.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    r = np.empty(scores.size, np.float64)
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    r[order] = np.repeat(avg, counts)
    return float((r[positives].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def box_centre_error_mm(a, b, spacing_xyz):
    ca = (np.array(a.min_ijk) + a.max_ijk) / 2.0
    cb = (np.array(b.min_ijk) + b.max_ijk) / 2.0
    return float(np.linalg.norm((ca - cb) * np.asarray(spacing_xyz)))


def format_dice_table(table):
    """A Markdown table: one row per method, one column per organ, then the mean."""
    methods = list(table)
    organs = list(table[methods[0]]) if methods else []
    lines = ["| method | " + " | ".join(organs) + " | Avg |", "|---" * (len(organs) + 2) + "|"]
    for m in methods:
        vals = [table[m][o] for o in organs]
        lines.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {np.mean(vals):.3f} |")
    return "\n".join(lines)


#: "the organ's region" of the uncertainty scores: truth or prediction grown by about a centimetre
NEAR_MM = 10.0


def near(mask, spacing_zyx, mm=NEAR_MM):
    """``mask`` grown by ``mm`` millimetres (Euclidean, in physical units), computed on its bounding crop."""
    idx = np.argwhere(mask)
    out = np.zeros(mask.shape, bool)
    if len(idx) == 0:
        return out
    pad = np.ceil(mm / np.asarray(spacing_zyx, float)).astype(int) + 1
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + pad + 1, mask.shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    out[sl] = ndimage.distance_transform_edt(~mask[sl], sampling=spacing_zyx) <= mm
    return out


def uncertainty_scores(pred, truth, u, flagged, spacing_zyx):
    """How well an uncertainty map finds a method's errors on one organ of one case.

    Over the organ's region (truth or prediction grown by :data:`NEAR_MM`):
    the voxel AUROC of ``u`` for the error voxels (prediction != truth), how
    many error voxels the ``flagged`` voxels hold, how many voxels are flagged
    and segmented; and the mean ``u`` over the prediction grown by the same
    margin (what a run without truth can report).
    """
    region = near(pred | truth, spacing_zyx)
    errors = (pred != truth) & region
    near_pred = near(pred, spacing_zyx)
    return {"region_auroc": auroc(u[region], errors[region]),
            "error_voxels": int(np.count_nonzero(errors)),
            "flagged_errors": int(np.count_nonzero(errors & flagged)),
            "flagged_voxels": int(np.count_nonzero(flagged)),
            "segmented_voxels": int(np.count_nonzero(pred)),
            "mean_uncertainty_near": float(u[near_pred].mean()) if near_pred.any() else float("nan")}


def spearman(a, b):
    """Spearman's rank correlation of two sequences (NaN pairs dropped; ties get average ranks)."""

    a, b = np.asarray(a, float), np.asarray(b, float)
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 3:
        return float("nan")
    from scipy.stats import spearmanr  # noqa: PLC0415 (scipy.stats takes a third of a second to import; only an evaluation ranks)
    return float(spearmanr(a[keep], b[keep]).statistic)
