"""The atlas prior: the support labels warped into the query and fused into a vote fraction per organ; the
classic multi-atlas segmentation of the same warped labels.

:func:`warp_supports` is the step after localization: the deformable stage on
top of the localizer's support registrations, then each support's labels
warped onto the query and fused (:class:`WarpedSupports`). The slice-adaptive
prompt modes (:mod:`URSAMLib.prompt_modes`) take each slice's box from the
priors, rectification may use them (:func:`URSAMLib.rectification.atlas_rectified`),
and the calibrated fusion pools them with SAM (:mod:`URSAMLib.fusion`). The
warping itself is :mod:`URSAMLib.registration`.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Dict, List

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import URSAMError
from .progress import STAGE_DEFORM
from .registration.deformable import DeformableOptions, refine_registrations

if TYPE_CHECKING:
    from .localization import Localization
    from .registration.affine import SupportRegistration
    from .templates import Library


@dataclass(frozen=True)
class LocalWeighting:
    """Locally weighted voting: each support's vote at a voxel weighs ``(MSD + eps) ** -power``, where MSD is
    the Gaussian-weighted (``sigma_mm``) mean squared difference between the query and the support's
    warped image around the voxel, both windowed to ``window`` HU and scaled to [0, 1] (Artaechevarria et
    al., IEEE TMI 2009: "inverse" weighting). Each support's warped organ mask is first blurred by
    ``label_sigma_voxels`` of the query's voxels, so that a vote of few supports is graded at the organ's
    edge rather than a staircase of whole voxels.

    The defaults were chosen on the leave-one-out runs of hn-openkbp's supports (cross-validated Dice of
    the locally weighted vote: 0.640 at 5 mm, power 2, 0.7 voxel; 0.617-0.619 for 2-5 mm unblurred;
    0.573 for the plain vote); they are lengths in mm and voxels of the user's own scans, not of that data.
    """
    sigma_mm: float = 5.0
    power: float = 2.0
    window: tuple = (-400.0, 600.0)
    eps: float = 1e-3
    label_sigma_voxels: float = 0.7

    def to_json(self):
        out = asdict(self)
        out["window"] = list(self.window)
        return out

    @classmethod
    def from_json(cls, data):
        """The weighting of a JSON object (a field it lacks keeps its default)."""
        data = dict(data or {})
        if "window" in data:
            data["window"] = tuple(float(v) for v in data["window"])
        return cls(**{k: (v if k == "window" else float(v)) for k, v in data.items()
                      if k in cls.__dataclass_fields__})


@dataclass
class Prior:
    """One organ's fused vote over a crop of the query: ``frac[z, y, x]`` at ``origin``.

    ``frac``: the fraction of the supports that label the organ at each voxel;
    where :class:`LocalWeighting` was asked for, ``soft``: the same vote of the
    blurred masks, and ``lw``: the locally weighted vote of the blurred masks.
    """
    label: int
    name: str
    origin: tuple  # (z, y, x) of frac[0, 0, 0] in the volume
    frac: np.ndarray  # float32 in [0, 1]
    n_supports: int
    lw: np.ndarray = None
    soft: np.ndarray = None

    def on(self, sl, which="frac"):
        """A vote (``frac`` or ``lw``) over the volume region ``sl`` (zeros outside the crop)."""
        values = getattr(self, which)
        out = np.zeros(tuple(s.stop - s.start for s in sl), np.float32)
        if values is None:
            raise ValueError(f"the prior of {self.name} has no {which} vote")
        src, dst = [], []
        for s, o, n in zip(sl, self.origin, values.shape):
            lo, hi = max(s.start, o), min(s.stop, o + n)
            if hi <= lo:
                return out
            src.append(slice(lo - o, hi - o))
            dst.append(slice(lo - s.start, hi - s.start))
        out[tuple(dst)] = values[tuple(src)]
        return out

    def mask(self, threshold):
        """Voxels where the prior has the organ; the best-voted voxels where none reach the threshold."""
        m = self.frac >= threshold
        if not m.any() and self.frac.max() > 0:
            m = self.frac >= self.frac.max()
        return m


def fuse_priors(reference, registrations, library, values, names=None, local=None):
    """``{value: Prior}``: each support's labels warped onto ``reference`` (the query), votes averaged.

    A support votes only for the organs it labels, so an organ missing from
    one support is not voted down by it. ``registrations``: the support
    registrations (affine, or with the deformable stage on top). ``local``: a :class:`LocalWeighting` to also
    give each prior its locally weighted vote ``lw`` (``reference`` must then
    hold the query's voxels, in HU).
    """
    by_id = {t.case_id: t for t in library.templates()}
    values = [int(v) for v in values]
    parts, counts = {}, {v: 0 for v in values}
    for r in registrations:
        warped = warp_labels(reference, r, by_id[r.case_id].read_labels(), values)
        arr = _array(warped)  # a view: ``warped`` holds its voxels while it is used
        present = [v for v in values if v in r.points] if r.points else values
        for v in present:
            counts[v] += 1
            idx = np.argwhere(arr == v)
            if len(idx) == 0:
                continue
            lo, hi = idx.min(0), idx.max(0) + 1
            parts.setdefault(v, []).append((r, lo, hi, arr[tuple(slice(a, b) for a, b in zip(lo, hi))] == v))
    priors = {}
    names = names or library.names
    shape = tuple(reference.GetSize())[::-1]
    grow = int(np.ceil(3 * local.label_sigma_voxels)) if local is not None else 0
    for v, got in parts.items():
        # (grown by the blur's reach, so that the blurred masks fit the crop)
        lo = np.maximum(np.min([p[1] for p in got], axis=0) - grow, 0)
        hi = np.minimum(np.max([p[2] for p in got], axis=0) + grow, shape)
        acc = np.zeros(tuple(hi - lo), np.float32)
        for _, plo, phi, m in got:
            acc[tuple(slice(a - b, c - b) for a, b, c in zip(plo, lo, phi))] += m
        acc /= max(1, counts[v])
        priors[v] = Prior(v, names.get(v, f"label_{v}"), tuple(int(x) for x in lo), acc, counts[v])
    if local is not None and priors:
        _local_votes(reference, registrations, by_id, parts, priors, counts, local)
    return priors


def _local_votes(reference, registrations, by_id, parts, priors, counts, local):
    """Each prior's locally weighted vote, over the same crop as its vote fraction.

    The support images are warped once each onto the union of the priors'
    crops (not the whole scan: a large CT would hold five warped copies).
    """
    lo = np.min([p.origin for p in priors.values()], axis=0)
    hi = np.max([np.array(p.origin) + p.frac.shape for p in priors.values()], axis=0)
    size_xyz = [int(v) for v in (hi - lo)[::-1]]
    crop = sitk.RegionOfInterest(reference, size_xyz, [int(v) for v in lo[::-1]])
    lo_w, hi_w = local.window

    def scaled(image):
        a = sitk.GetArrayFromImage(image).astype(np.float32)
        return (np.clip(a, lo_w, hi_w) - lo_w) / (hi_w - lo_w)

    query = scaled(crop)
    sigma = [local.sigma_mm / s for s in crop.GetSpacing()[::-1]]
    wsum = {v: np.zeros(p.frac.shape, np.float32) for v, p in priors.items()}
    vote = {v: np.zeros(p.frac.shape, np.float32) for v, p in priors.items()}
    soft = {v: np.zeros(p.frac.shape, np.float32) for v, p in priors.items()}
    for r in registrations:
        support = sitk.Resample(by_id[r.case_id].read_image(), crop, r.transform, sitk.sitkLinear, lo_w,
                                sitk.sitkFloat32)
        msd = ndimage.gaussian_filter((scaled(support) - query) ** 2, sigma, mode="nearest")
        weight = (msd + local.eps) ** -local.power
        masks = {v: (plo, phi, m) for v, got in parts.items() for rr, plo, phi, m in got if rr is r}
        present = {u for u in counts if u in r.points} if r.points else set(counts)
        for v, p in priors.items():
            if v not in present:
                continue
            sl = tuple(slice(o - c, o - c + n) for o, c, n in zip(p.origin, lo, p.frac.shape))
            w = weight[sl]
            wsum[v] += w
            if v in masks:
                plo, phi, m = masks[v]
                inner = tuple(slice(a - o, b - o) for a, b, o in zip(plo, phi, p.origin))
                mask = np.zeros(p.frac.shape, np.float32)
                mask[inner] = m
                if local.label_sigma_voxels > 0:
                    mask = ndimage.gaussian_filter(mask, local.label_sigma_voxels, mode="constant")
                vote[v] += w * mask
                soft[v] += mask
    for v, p in priors.items():
        p.lw = np.divide(vote[v], wsum[v], out=np.zeros_like(vote[v]), where=wsum[v] > 0)
        p.soft = soft[v] / max(1, counts[v])


def _array(image):
    return sitk.GetArrayViewFromImage(image)


# ----------------------------------------------------------------------------------------------
# Warped labels and the classic multi-atlas segmentation

def warp_labels(reference, registration, support_labels, values):
    """A support's label map (only ``values``) resampled onto the query grid, nearest neighbour.

    ``support_labels``: ``(image, array)`` of the support's label map, as
    :meth:`URSAMLib.templates.Template.read_labels` gives them.
    """
    label_image, labels = support_labels
    keep = np.where(np.isin(labels, list(values)), labels, 0).astype(np.uint16)
    moving = sitk.GetImageFromArray(keep)
    moving.CopyInformation(label_image)
    return sitk.Resample(moving, reference, registration.transform, sitk.sitkNearestNeighbor, 0,
                         sitk.sitkUInt16)


#: how the warped support labels are combined into one label map
LABEL_FUSIONS = ("vote", "staple")


def atlas_labels(reference, registrations, library, values, fusion="vote"):
    """Multi-atlas segmentation of the query: every support's labels warped, then fused.

    The classic baseline without SAM (``ursam evaluate`` method ``atlas``).
    ``fusion="vote"``: a voxel takes the label most supports give it,
    background included; ties go to background. ``"staple"``: SimpleITK's
    multi-label STAPLE (Warfield et al.), which weighs each support by its
    estimated performance. Returns an int32 array [z, y, x] on ``reference``'s grid.
    """
    by_id = {t.case_id: t for t in library.templates()}
    warped = [warp_labels(reference, r, by_id[r.case_id].read_labels(), values) for r in registrations]
    if not warped:
        raise URSAMError("no registered support scan to build the atlas from", library.meta_path)
    if fusion not in LABEL_FUSIONS:
        raise URSAMError(f"unknown label fusion {fusion!r}; choose one of {', '.join(LABEL_FUSIONS)}")
    if len(warped) == 1:
        voted = warped[0]
    elif fusion == "staple":
        voted = sitk.MultiLabelSTAPLE(warped, 0)
    else:
        voted = sitk.LabelVoting(warped, 0)
    return sitk.GetArrayFromImage(voted).astype(np.int32)


# ----------------------------------------------------------------------------------------------
# The step: the supports warped into one query

@dataclass
class WarpedSupports:
    """The support labels of a template library warped into one query.

    ``registrations``: each support's registration to the query, the
    deformable stage of ``deformable`` on top of the localizer's affine one.
    ``priors``: ``{label: Prior}`` on the query's canonical grid, in the
    boxes' label values. ``seconds``: the deformable stage; ``prior_seconds``:
    warping and fusing the labels.
    """
    registrations: List[SupportRegistration]
    library: Library
    #: the library's label values of the warped organs, and library value -> the boxes' value
    values: List[int]
    relabel: Dict[int, int]
    deformable: DeformableOptions
    priors: Dict[int, Prior] = field(default_factory=dict)
    seconds: float = 0.0
    prior_seconds: float = 0.0

    @classmethod
    def affine(cls, localization):
        """The localizer's own (affine) registrations, nothing warped yet: for the classic atlas baseline."""
        return cls(list(localization.registrations), localization.library, localization.library_values,
                   dict(localization.relabel), DeformableOptions(method="none"))

    def atlas(self, reference, fusion="vote"):
        """The multi-atlas segmentation of these registrations (no SAM) on ``reference``'s grid, in the
        boxes' label values: a majority vote, or STAPLE (``fusion``)."""
        voted = atlas_labels(reference, self.registrations, self.library, self.values, fusion)
        if not self.relabel:
            return voted
        out = np.zeros_like(voted)
        for lib_value, value in self.relabel.items():
            out[voted == lib_value] = value
        return out

    def info(self):
        """What the step did (JSON, for report.json's ``inputs.prompts``)."""
        out = {"prior_seconds": round(self.prior_seconds, 2),
               "prior_supports": {p.name: p.n_supports for p in self.priors.values()}}
        if self.deformable.method != "none":
            out["deformable"] = {"options": self.deformable.to_json(), "seconds": round(self.seconds, 2),
                                 "seconds_per_support": {r.case_id: round(r.stages.get("deformable", 0.0), 2)
                                                         for r in self.registrations}}
        return out


def warp_supports(localization: Localization, query, deformable=None, local=None, progress=None):
    """The step after localization: the deformable stage of ``deformable`` (a
    :class:`DeformableOptions`; None: affine only) on the localizer's support
    registrations, then the support labels warped onto ``query`` and fused
    into each organ's :class:`Prior`; ``local``: a :class:`LocalWeighting`
    for the locally weighted votes too.

    ``query``: the query's voxels in HU as a float32 SimpleITK image on the
    scan's canonical grid (:meth:`URSAMLib.orientation.CanonicalScan.hu_image`):
    the deformable stage registers to it, the priors are on its grid, and the
    locally weighted votes compare the supports' warped images with it.
    Returns a :class:`WarpedSupports`.
    """
    deformable = deformable or DeformableOptions(method="none")
    regs = localization.registrations
    t0 = time.perf_counter()
    if deformable.method != "none":
        if progress is not None:
            progress.stage(f"{STAGE_DEFORM} ({deformable.method}, {len(regs)} support scans)")
        regs = refine_registrations(query, regs, localization.library, deformable, progress)
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    values = localization.library_values
    priors = fuse_priors(query, regs, localization.library, values, local=local)
    priors = {localization.relabel.get(v, v): p for v, p in priors.items()}
    for v, p in priors.items():
        p.label = v
    return WarpedSupports(list(regs), localization.library, values, dict(localization.relabel), deformable,
                          priors, seconds, time.perf_counter() - t0)
