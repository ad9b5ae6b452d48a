"""The UR-SAM pipeline for one scan (METHOD.md §0): boxes in, per-organ maps out.

Data flows one way: for every axial slice inside any box, the backend embeds
the slice once; every organ's box on that slice, its n augmented copies, and
any further prompt set (the manual baseline) are decoded in batches against
that one embedding. Per-organ maps are kept only over each organ's box region,
padded in-plane so that SAM's spill past the box is still scored, which keeps
memory bounded by the boxes, not by the scan.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import numpy as np

from . import baselines
from .baselines import FnpcOptions
from .errors import URSAMError
from .fusion import DEFAULT_REVIEW_BUDGET, Evidence, expected_errors, fuse
from .progress import STAGE_EMBED, STAGE_RECTIFY, Progress
from .prompt_augmentation import augment_box, organ_rngs, shift_box
from .rectification import RectifyOptions, atlas_rectified, rectify
from .sam.views import EmbedAhead
from .uncertainty import binary_entropy

if TYPE_CHECKING:
    from .atlas_prior import Prior
    from .boxes import OrganBox
    from .fusion import Fused, OrganFusion

#: one SAM pass with the localized box (the paper's auto prompting)
AUTO = "auto"
#: the mean of the n shifted boxes' maps > 0.5 (METHOD.md §3)
ENSEMBLE = "ensemble"
#: UR-SAM's own result: the paper's Algorithm 1
URSAM = "ursam"
#: Algorithm 1 with the atlas prior (URSAMLib.rectification.atlas_rectified); the same mask as URSAM
#: for organs without a warped prior
URSAM_ATLAS = "ursam+atlas"
#: the calibrated atlas–SAM fusion (URSAMLib.fusion), where a calibration gives the organ a model
FUSION = "fusion"
#: every mask the pipeline can produce, in the paper's table order, then the atlas-prior variant and the fusion
METHODS = (AUTO, ENSEMBLE, "unc-fpc", "unc-fnc", "unc-fpnc", URSAM, URSAM_ATLAS, FUSION)


@dataclass
class Params:
    """The method's settings of one pipeline run (METHOD.md §3-§4; the paper's best: n 3, ratio 0.01)."""
    n_aug: int = 3
    ratio: float = 0.01
    seed: int = 0
    rectify: RectifyOptions = field(default_factory=RectifyOptions)
    fnpc: FnpcOptions = field(default_factory=FnpcOptions)
    #: in-plane padding of each organ's stored region, as a fraction of the box side
    region_pad: float = 0.1
    #: boxes decoded per decoder call (bounds the decoder's memory: about 20 MB a box)
    decode_batch: int = 16
    #: flagged voxels of a fused organ are at most this fraction of its segmented volume (the review budget;
    #: a calibrated run takes its calibration's)
    review_budget: float = DEFAULT_REVIEW_BUDGET

    def check(self):
        if int(self.n_aug) != self.n_aug or self.n_aug < 1:
            raise URSAMError(f"n (augmented boxes per organ) must be a whole number of at least 1, got {self.n_aug}")
        if not 0 <= float(self.ratio) < 0.5:
            raise URSAMError(f"the shift ratio must be in [0, 0.5), got {self.ratio}")
        if int(self.seed) != self.seed or self.seed < 0:
            raise URSAMError(f"the seed must be a whole number of at least 0, got {self.seed}")
        if not 0 <= float(self.review_budget) <= 1:
            raise URSAMError(f"the review budget must be a fraction of the organ's volume in [0, 1], got "
                             f"{self.review_budget}")
        self.rectify.check()
        return self

    def to_json(self):
        return asdict(self)


@dataclass(eq=False)
class OrganMaps:
    """One organ of one prompt set, over its region ``sl`` (z, y, x slices of the volume).

    Every map is [z, y, x] of the region's shape: ``p_auto`` the unshifted
    box's probability, ``p_mean`` the ensemble p̄ (eq. 2), ``u`` its entropy
    (eq. 3), ``m_unc`` M_unc (eq. 5), ``intensity`` the backend's normalized
    image, ``masks`` every method's mask by name.
    """
    box: OrganBox
    #: MAIN for the method's own prompts, else the baseline's name (``manual``)
    prompt_set: str
    n_aug: int
    sl: Tuple[slice, slice, slice]
    #: the box inside the region (slices of the region's maps)
    box_in_region: Tuple[slice, slice, slice]
    p_auto: np.ndarray
    p_mean: Optional[np.ndarray] = None
    intensity: Optional[np.ndarray] = None
    masks: Dict[str, np.ndarray] = field(default_factory=dict)
    u: Optional[np.ndarray] = None
    m_unc: Optional[np.ndarray] = None
    #: Algorithm 1's T, I_t, I_b
    info: dict = field(default_factory=dict)
    #: the prompt mode of the method's prompts (None for a baseline's)
    mode: Optional[str] = None
    #: the organ's atlas prior, where the support labels were warped
    prior: Optional[Prior] = None
    #: the organ's calibrated fusion, and its result
    fusion: Optional[OrganFusion] = None
    fused: Optional[Fused] = None
    #: whether SAM segmented the organ: not where its calibrated fusion gives SAM no weight (its SAM
    #: maps are then zeros and its SAM masks empty)
    sam_run: bool = True

    def evidence(self):
        """The organ's fusion sources over its region (URSAMLib.fusion.Evidence); None without a prior."""
        if self.prior is None or self.p_mean is None:
            return None
        sources = {"sam": self.p_mean} if self.sam_run else {}
        sources["atlas"] = self.prior.on(self.sl)
        if self.prior.lw is not None:
            # the graded votes of the blurred masks (atlas_prior.LocalWeighting)
            sources["atlas"] = self.prior.on(self.sl, "soft")
            sources["atlas_lw"] = self.prior.on(self.sl, "lw")
        return Evidence(sources, self.intensity.astype(np.float32))

    def uncertainty(self):
        """``(u, flagged)`` of the organ's result: the fused entropy and flags where it was fused, else SAM's
        entropy and M_unc (eq. 3-5)."""
        if self.fused is not None:
            return self.fused.uncertainty, self.fused.flagged
        return self.u, self.m_unc

    @property
    def label(self):
        return self.box.label

    @property
    def name(self):
        return self.box.name


def _region(box, shape_zyx, pad):
    z0, z1 = box.min_ijk[2], box.max_ijk[2] + 1
    sx = box.max_ijk[0] - box.min_ijk[0] + 1
    sy = box.max_ijk[1] - box.min_ijk[1] + 1
    px, py = max(4, int(np.ceil(pad * sx))), max(4, int(np.ceil(pad * sy)))
    y0, y1 = max(0, box.min_ijk[1] - py), min(shape_zyx[1], box.max_ijk[1] + 1 + py)
    x0, x1 = max(0, box.min_ijk[0] - px), min(shape_zyx[2], box.max_ijk[0] + 1 + px)
    sl = (slice(z0, z1), slice(y0, y1), slice(x0, x1))
    inner = (slice(0, z1 - z0), slice(box.min_ijk[1] - y0, box.max_ijk[1] + 1 - y0),
             slice(box.min_ijk[0] - x0, box.max_ijk[0] + 1 - x0))
    return sl, inner


def distinct_slices(boxes):
    """The slices that any of ``boxes`` prompts on (each is embedded once)."""
    return sorted({z for b in boxes for z in b.prompt_slices})


#: the prompt set of the method's own prompts; the others are baselines decoded beside them (``manual``)
MAIN = "main"


def uses_sam(fusion):
    """Whether an organ's result needs SAM: not where its calibrated fusion gives SAM no weight."""
    return fusion is None or "sam" in fusion.uses


def run(volume, backend, prompts, params=Params(), progress=None, baselines=None, sam_everywhere=False):
    """Segment ``volume`` (float32 [z, y, x], HU) inside the boxes of ``prompts`` with one encoder pass per slice.

    ``prompts``: :class:`URSAMLib.prompt_modes.PromptSet` of one or more
    prompt modes, each augmented and rectified (each with its own seeded
    shifts, so each mode's maps are those of a run of it alone) and decoded
    against the same embeddings: several modes cost one encoder pass. A
    mode with a slice plan (propagate, :mod:`URSAMLib.propagation`) runs
    alone: its plan, called with the organ maps, yields ``(z, organs, keep)``
    steps in the order to run them, choosing boxes from the maps decoded so
    far; an embedding is kept for a later step of the same slice only where
    ``keep`` says so. A box decodes ``box.xyxy_at(z)`` on each of its
    ``prompt_slices``. A set's priors (``{label: atlas_prior.Prior}``) also
    rectify (the ``ursam+atlas`` mask) and its fusions
    (``{label: fusion.OrganFusion}``) fuse.
    ``baselines``: ``{name: boxes}`` decoded once each without augmentation
    against the same embeddings (the manual-prompt baseline).
    An organ whose fusion gives SAM no weight (:func:`uses_sam`) is not
    prompted, and a slice that no other organ needs is not embedded: its
    result is the same either way (``sam_everywhere`` prompts it all the
    same, for an evaluation that scores SAM's own masks).
    Returns ``(organs, timings)``: a list of :class:`OrganMaps` and seconds by stage.
    """
    progress = progress or Progress()
    timings = {}
    prompts = list(prompts)
    plan = prompts[0].plan
    if plan is not None and len(prompts) > 1:
        raise ValueError("a prompt mode with a slice plan runs alone")
    shape = volume.shape
    height, width = shape[1], shape[2]
    backend.set_volume(volume)

    # (augmented?, prompt set, mode, boxes, priors, fusions) of every set to decode
    sets = [(True, MAIN, p.mode, p.boxes, p.priors or {}, p.fusions) for p in prompts]
    sets += [(False, name, None, boxes, {}, {}) for name, boxes in (baselines or {}).items()]
    organs, aug_boxes = [], {}
    for augmented, set_name, mode, set_boxes, priors, fusions in sets:
        n = params.n_aug if augmented else 0
        rngs = organ_rngs(params.seed, [b.label for b in set_boxes]) if augmented else {}
        for b in set_boxes:
            sl, inner = _region(b, shape, params.region_pad)
            rshape = tuple(s.stop - s.start for s in sl)
            o = OrganMaps(b, set_name, n, sl, inner, np.zeros(rshape, np.float32), mode=mode)
            if augmented:
                o.prior = priors.get(b.label)
                o.fusion = fusions.get(b.label)
                # without a prior there is nothing to fuse without SAM
                o.sam_run = sam_everywhere or uses_sam(o.fusion) or o.prior is None
            if n:
                o.p_mean = np.zeros(rshape, np.float32)
                aug_boxes[id(o)] = augment_box(b.xyxy(), n, params.ratio, (width, height), rngs[b.label])
            # float16 is ample for a [0, 1] intensity compared against means, and halves the largest map
            o.intensity = np.zeros(rshape, np.float16)
            organs.append(o)

    zs = distinct_slices(o.box for o in organs if o.sam_run)
    region_zs = sorted({z for o in organs for z in range(o.sl[0].start, o.sl[0].stop)})
    by_slice = {z: [o for o in organs if o.sl[0].start <= z < o.sl[0].stop] for z in region_zs}
    ahead = None
    if plan is None:
        prompted = {id(o): set(o.box.prompt_slices) if o.sam_run else set() for o in organs}
        steps = [(z, [o for o in by_slice[z] if z in prompted[id(o)]], False) for z in zs]
        # The encoder of the next slice may run while this one is decoded (same slices, same order).
        ahead = EmbedAhead.where_it_pays(backend, volume, [z for z, group, _ in steps if group])
    else:
        steps = ((z, [o for o in group if o.sam_run], keep) for z, group, keep in plan(organs))
    total = len(zs) if plan is None else len(region_zs)
    cache, embedded = {}, set()
    t0 = time.perf_counter()
    t_enc = t_dec = 0.0
    progress.stage(STAGE_EMBED, total=total)
    try:
        for z, group, keep in steps:
            if not group:
                cache.pop(z, None)
                continue
            progress.step(len(embedded), total)
            slice2d = volume[z]
            emb = cache.pop(z, None)
            if emb is None:
                emb, seconds = ahead.take(z) if ahead is not None else EmbedAhead.now(backend, slice2d)
                t_enc += seconds
            embedded.add(z)
            norm = backend.intensity(slice2d)
            prompts, owners = [], []
            for o in group:
                box = o.box.xyxy_at(z)
                prompts.append(box); owners.append((o, "auto"))
                members = aug_boxes.get(id(o))
                if o.n_aug and o.box.slice_boxes is not None:
                    # The organ's shifts, applied to this slice's box.
                    members = shift_box(box, members - o.box.xyxy(), (width, height))
                for k in range(o.n_aug):
                    prompts.append(members[k]); owners.append((o, "member"))
            ta = time.perf_counter()
            # Only each organ's region is kept, so only that is decoded at full resolution.
            crops = backend.decode_regions(emb, np.asarray(prompts), [(o.sl[1], o.sl[2]) for o, _ in owners],
                                           batch=params.decode_batch)
            t_dec += time.perf_counter() - ta
            for o in by_slice[z]:
                k = z - o.sl[0].start
                yx = (o.sl[1], o.sl[2])
                o.intensity[k] = norm[yx]
            for crop, (o, kind) in zip(crops, owners):
                k = z - o.sl[0].start
                if kind == "auto":
                    o.p_auto[k] = crop
                else:
                    o.p_mean[k] += crop / o.n_aug
            if keep:
                cache[z] = emb
            del emb
    finally:
        # A cancelled or failed run waits here for the slice being embedded ahead, so that no encoder call
        # outlives it.
        if ahead is not None:
            ahead.close()
    # Slices of a region that got no prompt still need their intensity for rectification.
    for z in region_zs:
        if z not in embedded:
            norm = backend.intensity(volume[z])
            for o in by_slice[z]:
                o.intensity[z - o.sl[0].start] = norm[o.sl[1], o.sl[2]]
    progress.step(total, total)
    timings["sam_seconds"] = time.perf_counter() - t0
    timings["encoder_seconds"] = t_enc
    timings["decoder_seconds"] = t_dec
    timings["distinct_slices"] = len(embedded)
    skipped = [o.name for o in organs if not o.sam_run]
    if skipped:
        timings["sam_not_run"] = skipped

    t0 = time.perf_counter()
    progress.stage(STAGE_RECTIFY)
    for o in organs:
        finish_organ(o, params)
    timings["rectify_seconds"] = time.perf_counter() - t0
    progress.done()
    return organs, timings


def finish_organ(o, params):
    """Ensemble, uncertainty, rectification (with the atlas prior where the organ has one) and the
    baselines of one organ, from its stored maps.

    Also the entry point for re-rectifying with new options: it reads only
    p_auto, p_mean, intensity and the prior, never SAM.
    """
    o.masks = {AUTO: o.p_auto > 0.5}
    if o.p_mean is None:
        return o
    if not o.sam_run:
        return _finish_without_sam(o, params)
    y_hat = o.p_mean > 0.5
    o.masks[ENSEMBLE] = y_hat
    o.u = binary_entropy(o.p_mean)
    inner = o.box_in_region
    yb, ub, ib = y_hat[inner], o.u[inner], o.intensity[inner].astype(np.float32)
    rect_b, munc_b, info = rectify(yb, ub, ib, params.rectify)
    o.m_unc = np.zeros_like(y_hat)
    o.m_unc[inner] = munc_b
    o.info = info
    for name, fn in baselines.METHODS.items():
        m = y_hat.copy()
        m[inner] = fn(yb, ub, ib, params.fnpc)
        o.masks[name] = m
    rect = y_hat.copy()
    rect[inner] = rect_b
    o.masks[URSAM] = rect
    if o.prior is None:
        o.masks[URSAM_ATLAS] = rect
    else:
        opts = params.rectify
        o.masks[URSAM_ATLAS] = atlas_rectified(rect, o.m_unc, o.prior.on(o.sl), opts.atlas_add, opts.atlas_keep)
    o.fused = None
    evidence = o.evidence() if o.fusion is not None else None
    if evidence is not None:
        o.fused = fuse(evidence, o.fusion, params.review_budget)
        o.masks[FUSION] = o.fused.mask
    else:
        # no model or nothing warped onto this organ: the fusion falls back to the atlas-prior result
        o.masks[FUSION] = o.masks[URSAM_ATLAS]
    return o


def _finish_without_sam(o, params):
    """An organ SAM did not segment: its fused result alone; SAM's masks empty, SAM's uncertainty zero."""
    empty = np.zeros(o.p_mean.shape, bool)
    o.u = np.zeros(o.p_mean.shape, np.float32)
    o.m_unc = empty
    o.info = {"sam": "not run: the calibrated fusion gives SAM no weight"}
    for name in (ENSEMBLE, URSAM, URSAM_ATLAS, *baselines.METHODS):
        o.masks[name] = empty
    o.fused = fuse(o.evidence(), o.fusion, params.review_budget)
    o.masks[FUSION] = o.fused.mask
    return o


def _union_frame(organs, shape):
    """The bounding box of all organ regions, and each region's slices inside it.

    Overlap bookkeeping only needs this frame, not the whole scan: on a large CT the
    organs cover a fraction of it.
    """
    if not organs:
        return tuple(slice(0, 0) for _ in shape), {}
    lo = [min(o.sl[a].start for o in organs) for a in range(3)]
    hi = [max(o.sl[a].stop for o in organs) for a in range(3)]
    frame = tuple(slice(a, b) for a, b in zip(lo, hi))
    local = {id(o): tuple(slice(o.sl[a].start - lo[a], o.sl[a].stop - lo[a]) for a in range(3)) for o in organs}
    return frame, local


def label_map(organs, method, shape, prompt_set=MAIN):
    """One label map of ``method``; overlaps go to the organ of the higher probability."""
    labels = np.zeros(shape, np.uint16)
    chosen = [o for o in organs if o.prompt_set == prompt_set and method in o.masks]
    frame, local = _union_frame(chosen, shape)
    best = np.full(tuple(s.stop - s.start for s in frame), -1.0, np.float32)
    for o in chosen:
        if method == FUSION and o.fused is not None:
            p = o.fused.probability
        else:
            p = o.p_auto if method == AUTO or o.p_mean is None else o.p_mean
        m = o.masks[method] & (p > best[local[id(o)]])
        labels[o.sl][m] = o.label
        best[local[id(o)]][m] = p[m]
    return labels


def error_map(organs, shape):
    """Each voxel's probability of being wrong in the fused result (URSAMLib.fusion.expected_errors), the
    highest over the fused organs; None where no organ was fused (SAM's probabilities are not calibrated)."""
    fused = [o for o in organs if o.fused is not None]
    if not fused:
        return None
    out = np.zeros(shape, np.float32)
    for o in fused:
        np.maximum(out[o.sl], expected_errors(o.fused.probability, o.fused.mask), out=out[o.sl])
    return out


def uncertainty_maps(organs, shape):
    """The entropy map (max over organs) and the label map of the flagged voxels (organ of the higher u);
    each organ's own uncertainty: the fused one where it was fused, else SAM's (OrganMaps.uncertainty)."""
    u_full = np.zeros(shape, np.float32)
    unc_labels = np.zeros(shape, np.uint16)
    chosen = [o for o in organs if o.u is not None]
    frame, local = _union_frame(chosen, shape)
    best = np.full(tuple(s.stop - s.start for s in frame), -1.0, np.float32)
    for o in chosen:
        u, flagged = o.uncertainty()
        np.maximum(u_full[o.sl], u, out=u_full[o.sl])
        m = flagged & (u > best[local[id(o)]])
        unc_labels[o.sl][m] = o.label
        best[local[id(o)]][m] = u[m]
    return u_full, unc_labels
