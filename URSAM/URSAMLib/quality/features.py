"""What the quality estimate reads of one segmented organ, and the numbers it derives from it.

An organ's :class:`OrganEvidence` holds arrays over its region (the slices of
its box, the box padded in-plane: ``pipeline.OrganMaps.sl``): the calibrated
fused probability, the mask of the result, and the fusion's sources (SAM's
ensemble and the warped support labels' votes). From it:

- :func:`organ_features`: one number per feature (``FEATURES``) for the Dice
  model, among them the expected Dice of the calibrated probability over the
  mask, the agreement among the supports and between SAM and the atlas, the
  organ's volume against the library's;
- :func:`voxel_features`: per voxel, the inputs of the error-probability model
  (``VOXEL_FEATURES``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from scipy import ndimage

#: how far the base error probability is kept from 0 and 1 before its logit
EPS = 1e-4
#: distances (mm) beyond this tell nothing more about an error
DIST_CAP_MM = 20.0

FEATURES = ("expected_dice", "support_agreement", "sam_atlas_dice", "mask_sam_dice", "mask_atlas_dice",
            "mask_vote_dice", "log_volume_ratio", "abs_log_volume_ratio", "log_expected_volume_ratio",
            "boundary_fraction", "log_z_extent_ratio", "mean_error_in_mask", "mean_vote_in_mask",
            "mask_off_tissue", "ring_contrast")
VOXEL_FEATURES = ("logit_error", "dist_out_cm", "dist_in_cm", "intensity_dev_in", "intensity_dev_out",
                  "intensity_llr_in", "intensity_llr_out")
#: the intensity histograms of the organ and its surroundings: bins over the backend's [0, 1] intensity
HIST_BINS = 32


@dataclass
class OrganEvidence:
    """One segmented organ over its region; every array is [z, y, x] of the region's shape.

    ``probability``: float32 in [0, 1], the calibrated fused probability;
    ``mask``: bool, the organ's result; ``sources``: name -> float32 in [0, 1],
    the fusion's evidence (``sam``: SAM's ensemble, ``atlas``: the supports'
    graded vote, ``atlas_lw``: their locally weighted vote; any may be
    absent); ``spacing_zyx``: voxel size in mm; ``n_supports``: how many
    supports' warped labels vote; ``slice_index``: int [z], each region
    slice's index along the input file's slice axis (None: the region's own
    0..z-1, for callers that map them later); ``intensity``: the image as SAM
    saw it (``OrganMaps.intensity``, in [0, 1]; None: the voxel model reads
    no intensity).
    """
    name: str
    probability: np.ndarray
    mask: np.ndarray
    sources: dict = field(default_factory=dict)
    spacing_zyx: tuple = (1.0, 1.0, 1.0)
    n_supports: int = 1
    slice_index: Optional[np.ndarray] = None
    intensity: Optional[np.ndarray] = None

    def __post_init__(self):
        self.probability = np.asarray(self.probability, np.float32)
        self.mask = np.asarray(self.mask, bool)
        if self.mask.shape != self.probability.shape:
            raise ValueError(f"{self.name}: mask {self.mask.shape} and probability {self.probability.shape} differ")
        for s, a in self.sources.items():
            if np.shape(a) != self.probability.shape:
                raise ValueError(f"{self.name}: source {s} has shape {np.shape(a)}, not {self.probability.shape}")
        if self.slice_index is None:
            self.slice_index = np.arange(self.probability.shape[0])
        self.slice_index = np.asarray(self.slice_index, int)
        if self.slice_index.shape != (self.probability.shape[0],):
            raise ValueError(f"{self.name}: slice_index needs one index per slice of the region")
        if self.intensity is not None and np.shape(self.intensity) != self.probability.shape:
            raise ValueError(f"{self.name}: intensity has shape {np.shape(self.intensity)}, "
                             f"not {self.probability.shape}")

    @property
    def voxel_ml(self):
        return float(np.prod(self.spacing_zyx)) / 1000.0

    def vote(self):
        """The supports' vote: the graded one where the fusion had it, else SAM's ensemble, else p."""
        for s in ("atlas", "atlas_lw", "sam"):
            if s in self.sources:
                return np.asarray(self.sources[s], np.float32)
        return self.probability


def base_error(p, mask):
    """Each voxel's probability of being wrong under the calibrated ``p``: p outside the mask, 1 - p in it."""
    p = np.asarray(p, np.float32)
    return np.where(mask, 1.0 - p, p).astype(np.float32)


def expected_dice(error, mask):
    """The Dice the result is expected to have if ``error`` (each voxel's probability of being wrong) is
    calibrated: 2 E[TP] / (|mask| + E[|truth|]), the ratio of expectations. 0 for an empty result."""
    m = np.asarray(mask, bool)
    inside = float(np.sum(error[m], dtype=np.float64))
    outside = float(np.sum(error[~m], dtype=np.float64))
    n = float(np.count_nonzero(m))
    tp = n - inside
    denom = n + tp + outside
    return 0.0 if denom <= 0 else 2.0 * tp / denom


def _soft_dice(a, b):
    s = float(np.sum(a, dtype=np.float64) + np.sum(b, dtype=np.float64))
    return 1.0 if s == 0 else 2.0 * float(np.sum(np.asarray(a, np.float64) * b)) / s


def support_agreement(vote):
    """How much the supports agree, from their vote alone: the vote-weighted mean vote Σ f² / Σ f. 1 where
    every support labels the same voxels, 1/k for k supports that never overlap; for a graded vote
    (blurred masks) it stays below 1, so it compares libraries of one kind, not across kinds."""
    f = np.asarray(vote, np.float64)
    total = float(f.sum())
    return 0.0 if total <= 0 else float(np.sum(f * f)) / total


def _z_extent_mm(mask, dz):
    zs = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(1))
    return 0.0 if len(zs) == 0 else float((zs[-1] - zs[0] + 1) * dz)


def organ_features(ev, library_volume_ml=None, library_z_extent_mm=None):
    """``{feature: value}`` for :data:`FEATURES` of one organ.

    ``library_volume_ml`` and ``library_z_extent_mm``: the organ's typical volume and cranio-caudal
    extent in the library's own labels (their median); without them the ratios are 0.
    """
    p, m = ev.probability, ev.mask
    err = base_error(p, m)
    vote = ev.vote()
    sam = ev.sources.get("sam")
    n = int(np.count_nonzero(m))
    vol = n * ev.voxel_ml
    surface = m & ~ndimage.binary_erosion(m, border_value=0) if n else m
    out = {
        "expected_dice": expected_dice(err, m),
        "support_agreement": support_agreement(vote),
        "sam_atlas_dice": _soft_dice(sam, vote) if sam is not None else 1.0,
        "mask_sam_dice": _soft_dice(m, sam > 0.5) if sam is not None else 1.0,
        "mask_atlas_dice": _soft_dice(m, vote >= 0.5),
        # Σ_i |m ∩ m_i| and Σ_i |m_i| over the supports' masks m_i are sums of the vote: the pooled Dice of
        # the result with each warped support, reverse classification accuracy's figure read in the scan
        "mask_vote_dice": _soft_dice(m, vote),
        "log_volume_ratio": float(np.log(max(vol, 1e-3) / library_volume_ml)) if library_volume_ml else 0.0,
        "log_expected_volume_ratio": float(np.log(max(float(p.sum()), 1.0) / max(n, 1))),
        "boundary_fraction": float(np.count_nonzero(surface)) / max(n, 1),
        "log_z_extent_ratio": (float(np.log(max(_z_extent_mm(m, ev.spacing_zyx[0]), ev.spacing_zyx[0])
                                             / library_z_extent_mm)) if library_z_extent_mm else 0.0),
        "mean_error_in_mask": float(err[m].mean()) if n else 1.0,
        "mean_vote_in_mask": float(vote[m].mean()) if n else 0.0,
    }
    out["abs_log_volume_ratio"] = abs(out["log_volume_ratio"])
    # how well the result fits the image: the share of its voxels whose intensity is likelier the
    # surroundings' than the organ's, and how much more the voxels just outside it differ from the organ
    # than those inside (a result that follows the organ's edge has a high contrast)
    deviation, llr = intensity_evidence(ev)
    ring = ndimage.binary_dilation(m) & ~m if n else m
    out["mask_off_tissue"] = float(np.mean(llr[m] < 0)) if n and ev.intensity is not None else 0.0
    out["ring_contrast"] = (float(deviation[ring].mean() - deviation[m].mean())
                            if n and ring.any() and ev.intensity is not None else 0.0)
    return {k: float(out[k]) for k in FEATURES}


def intensity_evidence(ev):
    """``(deviation, log likelihood ratio)`` per voxel: how far its intensity lies from the organ's (in
    interquartile ranges of the result's confident core, at most 5), and the log ratio of the core's
    intensity histogram to that of the region's confident background. Zeros without an intensity.
    The probability does not see the image this way: a voxel of the mask with the wrong tissue, or one
    outside it with the organ's, is likelier wrong."""
    m = ev.mask
    if ev.intensity is None:
        return np.zeros(m.shape), np.zeros(m.shape)
    image = np.asarray(ev.intensity, np.float32)
    core = m & (ev.probability > 0.5)
    if np.count_nonzero(core) < 5:
        core = m
    background = ~m & (ev.probability < 0.1)
    if np.count_nonzero(core) < 5 or np.count_nonzero(background) < 5:
        return np.zeros(m.shape), np.zeros(m.shape)
    q1, median, q3 = np.percentile(image[core], [25, 50, 75])
    deviation = np.minimum(np.abs(image - median) / max(q3 - q1, 0.02), 5.0)
    bins = np.linspace(0.0, 1.0, HIST_BINS + 1)
    h_in = ndimage.gaussian_filter1d(np.histogram(image[core], bins)[0] + 1.0, 1.0)
    h_out = ndimage.gaussian_filter1d(np.histogram(image[background], bins)[0] + 1.0, 1.0)
    table = np.log(h_in / h_in.sum()) - np.log(h_out / h_out.sum())
    llr = np.clip(table[np.clip(np.digitize(image, bins) - 1, 0, HIST_BINS - 1)], -5.0, 5.0)
    return deviation.astype(np.float64), llr.astype(np.float64)


def voxel_features(ev):
    """``(X, err)``: per voxel of the region (C order) the :data:`VOXEL_FEATURES` as float64 [n, k], and the
    base error probability. Beyond the calibrated probability's own error: where the voxel lies against
    the result (distances in and out), and whether its intensity fits the organ, split by inside and
    outside the mask (the same misfit means a false positive inside, a true negative outside)."""
    p, m = ev.probability, ev.mask
    err = base_error(p, m)
    sp = np.asarray(ev.spacing_zyx, float)
    if m.any():
        d_out = ndimage.distance_transform_edt(~m, sampling=sp)
        d_in = ndimage.distance_transform_edt(m, sampling=sp)
    else:
        d_out = np.full(m.shape, DIST_CAP_MM)
        d_in = np.zeros(m.shape)
    deviation, llr = intensity_evidence(ev)
    e = np.clip(err.astype(np.float64), EPS, 1 - EPS)
    cols = [np.log(e) - np.log1p(-e),
            np.minimum(d_out, DIST_CAP_MM) / 10.0,
            np.minimum(d_in, DIST_CAP_MM) / 10.0,
            np.where(m, deviation, 0.0), np.where(m, 0.0, deviation),
            np.where(m, llr, 0.0), np.where(m, 0.0, llr)]
    X = np.stack([np.ravel(c) for c in cols], 1)
    return X, err
