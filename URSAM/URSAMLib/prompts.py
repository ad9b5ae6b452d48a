"""Prompt modes (issue 8): which 2D box each slice of an organ gets.

- ``box3d``: the paper's prompt (METHOD.md §1): the 3D box's in-plane box on
  every slice of the box.
- ``slice``: a box per slice from the support labels warped into the query
  and fused (:class:`Prior`, the fraction of supports that vote for the organ
  at each voxel). Each slice where the prior has the organ gets the prior's
  bounding box there, plus an in-plane margin; ``end_slices`` more slices at
  each end of the prior get the box of the nearest end slice. Other slices get
  no prompt.
- ``propagate``: starts on the slice where the prior's area is largest, then
  moves outward slice by slice: each slice gets the box of the previous
  slice's ensemble mask, grown by a margin; where that mask vanishes or jumps
  (it leaves the prior's box or balloons past it), the prior's box of that
  slice is used instead; the sweep stops where both are empty.

Every mode hands the pipeline :class:`OrganBox` objects: the 3D box is the
bounding region (maps are stored over it), and ``slice_boxes`` says which
slices get which prompt. Augmentation, ensemble, uncertainty and
rectification then run unchanged. ``propagate`` decides each box from the
masks so far, so it also gives the pipeline a slice plan
(:class:`Propagation`) that visits the slices in an order where each
organ's previous slice is finished first, while the encoder still runs once
per distinct slice: an embedding needed again later (a slice below an
organ's start, met on the way up) waits in a bounded cache.
"""
from dataclasses import dataclass, asdict

import numpy as np

from .boxes import OrganBox, grid_px_to_slice_px
from .errors import URSAMError

MODES = ("box3d", "slice", "propagate")
#: the mode ``ursam segment``, ``ursam evaluate`` and the Slicer panel use unless told otherwise, where
#: the support labels can be warped into the scan (see :func:`default_mode`); it won on hn-openkbp
#: (README, "Prompt modes"). box3d is the paper's prompt.
DEFAULT_MODE = "slice"


@dataclass
class PromptOptions:
    mode: str = DEFAULT_MODE
    #: fraction of the supports that must label a voxel for the prior to have the organ there
    prior_threshold: float = 0.2
    #: in-plane margin of each slice's box, px of SAM's 1024 grid (METHOD.md §1 uses 10)
    margin_px: float = 10.0
    #: k: slices past each end of the prior that still get the end slice's box (``slice``)
    end_slices: int = 2
    #: margin around the previous slice's ensemble mask, px of the 1024 grid (``propagate``)
    grow_px: float = 10.0
    #: a previous mask smaller than this (pixels) has vanished
    min_mask_px: int = 2
    #: the mask's box has jumped where its area exceeds this multiple of the prior's box ...
    jump_area: float = 2.0
    #: ... or where it overlaps the prior's box by less than this IoU
    jump_iou: float = 0.1
    #: slices past each end of the prior that ``propagate`` may still follow the mask into
    reach: int = 4
    #: embeddings ``propagate`` keeps for later at once, MiB (past it, a slice is encoded again)
    cache_mib: float = 2048.0
    #: SAM sees a crop around the organs (URSAMLib.zoom): "auto" (slice and propagate, not the
    #: paper's box3d), "on" or "off"
    zoom: str = "auto"
    #: the atlas vote as a prior in rectification (:func:`prior_rectified`), and its two levels; on
    #: where the support labels are warped anyway (it won on hn-openkbp: README, "Prompt modes")
    prior_rectify: bool = True
    prior_add: float = 0.5
    prior_keep: float = 0.2

    def zoomed(self, mode=None):
        """Whether SAM sees the zoomed crop in ``mode`` (default: this options' mode)."""
        if self.zoom not in ("auto", "on", "off"):
            raise URSAMError(f"zoom must be auto, on or off, got {self.zoom!r}")
        return self.zoom == "on" or (self.zoom == "auto" and (mode or self.mode) != "box3d")

    def to_json(self):
        return asdict(self)


def check_mode(mode):
    if mode not in MODES:
        raise URSAMError(f"unknown prompt mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode


def default_mode(localizer="registration", boxes=None):
    """The prompt mode when none is asked for.

    With a box file (``boxes``): its own prompts, ``slice`` where it has
    per-slice boxes (``ursam localize`` writes them), else the paper's box3d.
    With a template library: :data:`DEFAULT_MODE` for the registration
    localizer, whose registrations warp the support labels; box3d for the
    others (MedLAM gives boxes only).
    """
    if boxes is not None:
        return "slice" if any(getattr(b, "slice_boxes", None) for b in boxes) else "box3d"
    return DEFAULT_MODE if localizer in (None, "registration") else "box3d"


def parse_modes(text):
    """A comma-separated list of modes (``ursam evaluate --prompts``), in the order given, no repeats."""
    modes = [m.strip().lower() for m in str(text).split(",") if m.strip()]
    if not modes:
        raise URSAMError("--prompts needs at least one of " + ", ".join(MODES))
    for m in modes:
        check_mode(m)
    return list(dict.fromkeys(modes))


# ----------------------------------------------------------------------------------------------
# The fused prior: support labels warped into the query

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
    one support is not voted down by it. ``registrations`` are those of
    ``localize(..., keep_transforms=True)`` (or refined by ``deformable``).
    """
    from .localize import warp_labels

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


# ----------------------------------------------------------------------------------------------
# Boxes per slice

def _bbox2d(mask2d):
    ys = np.flatnonzero(mask2d.any(1))
    if len(ys) == 0:
        return None
    xs = np.flatnonzero(mask2d.any(0))
    return np.array([xs[0], ys[0], xs[-1], ys[-1]], np.float64)


def _grow(box, d, size_xyz):
    out = np.array([np.floor(box[0] - d), np.floor(box[1] - d), np.ceil(box[2] + d), np.ceil(box[3] + d)])
    out[[0, 2]] = np.clip(out[[0, 2]], 0, size_xyz[0] - 1)
    out[[1, 3]] = np.clip(out[[1, 3]], 0, size_xyz[1] - 1)
    return out


def _area(b):
    return float((b[2] - b[0] + 1) * (b[3] - b[1] + 1))


def _iou(a, b):
    w = min(a[2], b[2]) - max(a[0], b[0]) + 1
    h = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return float(inter / (_area(a) + _area(b) - inter))


def prior_slice_boxes(prior, options, size_xyz):
    """``({z: box}, areas {z: prior pixels})`` of the prior's slices, margin included, no end slices."""
    m = prior.mask(options.prior_threshold)
    d = grid_px_to_slice_px(options.margin_px, size_xyz)
    z0, y0, x0 = prior.origin
    boxes, areas = {}, {}
    for k in range(m.shape[0]):
        b = _bbox2d(m[k])
        if b is None:
            continue
        b[[0, 2]] += x0
        b[[1, 3]] += y0
        boxes[z0 + k] = _grow(b, d, size_xyz)
        areas[z0 + k] = int(np.count_nonzero(m[k]))
    return boxes, areas


def _with_ends(boxes, k, n_slices):
    """The boxes plus ``k`` slices past each end carrying the end slice's box."""
    if not boxes:
        return {}
    out = dict(boxes)
    lo, hi = min(boxes), max(boxes)
    for j in range(1, k + 1):
        if lo - j >= 0:
            out[lo - j] = boxes[lo].copy()
        if hi + j < n_slices:
            out[hi + j] = boxes[hi].copy()
    return out


def _bounding(label, name, slice_boxes, notes):
    zs = sorted(slice_boxes)
    arr = np.array([slice_boxes[z] for z in zs])
    lo = [int(arr[:, 0].min()), int(arr[:, 1].min()), zs[0]]
    hi = [int(arr[:, 2].max()), int(arr[:, 3].max()), zs[-1]]
    sb = {int(z): [int(v) for v in slice_boxes[z]] for z in zs}
    return OrganBox(int(label), name, lo, hi, list(notes), slice_boxes=sb)


def _propagation_region(box, prior_boxes, options, size_xyz, notes):
    """propagate's bounding region: the prior's slices plus ``reach`` slices at each end, in-plane
    the prior's boxes grown by four times the mask margin (the sweep may follow the organ out of them)."""
    region = _bounding(box.label, box.name, _with_ends(prior_boxes, options.reach, size_xyz[2]), notes)
    d = grid_px_to_slice_px(4 * options.grow_px, size_xyz)
    lo = _grow(np.array(region.min_ijk[:2] + region.max_ijk[:2], np.float64), d, size_xyz)
    region.min_ijk[:2], region.max_ijk[:2] = [int(lo[0]), int(lo[1])], [int(lo[2]), int(lo[3])]
    region.slice_boxes = {}
    return region


#: noted on a box that a slice-adaptive mode prompted with its 3D box (no warped prior reached it)
FALLBACK_NOTE = "fell back to the 3D box"


def fallback_warnings(boxes, mode):
    """One warning per organ that ``mode`` prompted with its 3D box after all: the user asked for
    another prompt and should know this organ got the paper's."""
    if mode == "box3d":
        return []
    return [f"{b.name}: no support labels were warped onto it, so the {mode} prompt used its 3D box (box3d)"
            for b in boxes if any(FALLBACK_NOTE in n for n in b.notes)]


def make_prompts(boxes, priors, options, size_xyz):
    """The boxes of ``options.mode`` and the pipeline's slice plan (None but for ``propagate``).

    ``boxes``: the localizer's 3D boxes (used as they are by ``box3d``, and for
    an organ that has no prior); ``priors``: ``{label: Prior}`` with the
    boxes' label values; ``size_xyz``: the query's size.
    """
    mode = check_mode(options.mode)
    if mode == "box3d":
        return list(boxes), None
    out, starts, fallbacks = [], {}, {}
    for b in boxes:
        prior = priors.get(b.label)
        pboxes, areas = prior_slice_boxes(prior, options, size_xyz) if prior is not None else ({}, {})
        if not pboxes:
            out.append(OrganBox(b.label, b.name, list(b.min_ijk), list(b.max_ijk),
                                b.notes + [f"no warped prior; {mode} {FALLBACK_NOTE}"]))
            continue
        note = f"{mode} prompts from the prior of {prior.n_supports} support(s)"
        if mode == "slice":
            out.append(_bounding(b.label, b.name, _with_ends(pboxes, options.end_slices, size_xyz[2]), [note]))
            continue
        # propagate: the region is the prior's reach; the boxes are chosen as the sweep goes.
        out.append(_propagation_region(b, pboxes, options, size_xyz, [note]))
        starts[b.label] = max(areas, key=lambda z: (areas[z], -z))
        fallbacks[b.label] = pboxes
    plan = Propagation(starts, fallbacks, options, size_xyz) if mode == "propagate" else None
    return out, plan


def prompts_from_box_file(boxes, options, size_xyz):
    """``(boxes, plan)`` of ``options.mode`` for boxes read from a box file.

    ``slice`` uses the file's per-slice boxes as they are; ``propagate`` takes
    them as the prior's boxes (its fallback) and starts on the slice whose box
    is largest. Boxes without per-slice boxes keep the paper's prompt.
    """
    mode = check_mode(options.mode)
    if mode == "box3d":
        return [OrganBox(b.label, b.name, list(b.min_ijk), list(b.max_ijk), list(b.notes)) for b in boxes], None
    if not any(b.slice_boxes for b in boxes):
        raise URSAMError(f"prompt mode {mode} needs per-slice boxes: give --templates, or a box file with "
                         '"slice_boxes" (ursam localize --prompts slice writes one)')
    if mode == "slice":
        return list(boxes), None
    out, starts, fallbacks = [], {}, {}
    for b in boxes:
        if not b.slice_boxes:
            out.append(b)
            continue
        pboxes = {z: np.asarray(v, np.float64) for z, v in b.slice_boxes.items()}
        out.append(_propagation_region(b, pboxes, options, size_xyz, b.notes))
        starts[b.label] = max(pboxes, key=lambda z: (_area(pboxes[z]), -z))
        fallbacks[b.label] = pboxes
    return out, Propagation(starts, fallbacks, options, size_xyz)


# ----------------------------------------------------------------------------------------------
# propagate: the slice plan

class Propagation:
    """The slice plan of ``propagate`` for :func:`URSAMLib.pipeline.run`.

    Called with the pipeline's organ maps, it yields steps ``(z, organs, keep)``:
    embed slice z (or take it from the cache), decode ``organs`` there with
    ``o.box.xyxy_at(z)``, then keep the embedding for later only if ``keep``.
    A step with no organs drops a cached embedding. Organs of the main prompt
    set whose label has a start propagate; all others (the manual baseline)
    are decoded on their own slices as usual.

    Order: one ascending sweep. An organ's slices above its start follow on
    the way up; its slices below the start are swept downward as soon as the
    start is done, reusing embeddings met on the way up (kept in the cache
    only while an organ still to sweep down may need them) or computing
    them then. So every slice is embedded once.
    """

    def __init__(self, starts, fallbacks, options, size_xyz):
        self.starts = dict(starts)
        self.fallbacks = fallbacks
        self.options = options
        self.size_xyz = size_xyz
        self.stops = {}

    # -- the box of one slice -----------------------------------------------------------------
    def _mask(self, o, z):
        k = z - o.sl[0].start
        p = o.p_mean if o.p_mean is not None else o.p_auto
        return p[k] > 0.5

    def next_box(self, o, z, prev):
        """The box of organ ``o`` on slice ``z`` from its finished slice ``prev``; None: stop here."""
        prior_box = self.fallbacks[o.label].get(z)
        m = self._mask(o, prev)
        if np.count_nonzero(m) >= self.options.min_mask_px:
            b = _bbox2d(m)
            b[[0, 2]] += o.sl[2].start
            b[[1, 3]] += o.sl[1].start
            b = _grow(b, grid_px_to_slice_px(self.options.grow_px, self.size_xyz), self.size_xyz)
            b = _clip_to(b, o.box)
            ref = prior_box if prior_box is not None else o.box.xyxy_at(prev)
            if ref is None or (_area(b) <= self.options.jump_area * _area(ref)
                               and _iou(b, ref) >= self.options.jump_iou):
                return b
        return prior_box

    # -- the plan ------------------------------------------------------------------------------
    def __call__(self, organs):
        prop = [o for o in organs if o.prompt_set == "main" and o.label in self.starts]
        static = [o for o in organs if all(o is not p for p in prop)]
        for o in prop:
            o.box.slice_boxes = {}
        z_lo = min([o.sl[0].start for o in organs], default=0)
        z_hi = max([o.sl[0].stop for o in organs], default=0)
        going_up = {id(o) for o in prop}
        down_pending = {id(o) for o in prop}
        cached = set()
        # LiteMedSAM and SAM embeddings are 256 x 64 x 64 float32: 4 MiB each.
        max_cached = max(1, int(self.options.cache_mib // 4))

        def wanted_later(z, exclude=None):
            return any(id(o) in down_pending and o is not exclude and o.sl[0].start <= z < self.starts[o.label]
                       for o in prop)

        def keep(z, exclude=None):
            k = wanted_later(z, exclude) and (z in cached or len(cached) < max_cached)
            (cached.add if k else cached.discard)(z)
            return k

        for z in range(z_lo, z_hi):
            group = [o for o in static if o.sl[0].start <= z < o.sl[0].stop and o.box.xyxy_at(z) is not None]
            for o in prop:
                s = self.starts[o.label]
                if z < s or id(o) not in going_up:
                    continue
                box = None
                if z < o.sl[0].stop:
                    box = self.fallbacks[o.label].get(z) if z == s else self.next_box(o, z, z - 1)
                if box is None:
                    going_up.discard(id(o))
                    self.stops[(o.label, "up")] = z - 1
                    continue
                o.box.slice_boxes[z] = [float(v) for v in box]
                group.append(o)
            if group:
                yield z, group, keep(z)
            for o in [o for o in prop if self.starts[o.label] == z]:
                # The start slice is done: sweep this organ down now.
                z2 = z - 1
                while z2 >= o.sl[0].start:
                    box = self.next_box(o, z2, z2 + 1)
                    if box is None:
                        break
                    o.box.slice_boxes[z2] = [float(v) for v in box]
                    yield z2, [o], keep(z2, exclude=o)
                    z2 -= 1
                self.stops[(o.label, "down")] = z2 + 1
                down_pending.discard(id(o))
                for zc in sorted(z for z in cached if not wanted_later(z)):
                    cached.discard(zc)
                    yield zc, [], False
        for o in prop:
            if id(o) in going_up:
                self.stops[(o.label, "up")] = o.sl[0].stop - 1
        for zc in sorted(cached):
            yield zc, [], False

    def describe(self):
        """Start and stop slices per organ label (for the report)."""
        return {int(label): {"start": int(s), "down_to": self.stops.get((label, "down")),
                             "up_to": self.stops.get((label, "up"))} for label, s in self.starts.items()}


def _clip_to(box, organ_box):
    """``box`` inside the organ's bounding region (which lies inside the image)."""
    out = box.copy()
    out[[0, 2]] = np.clip(out[[0, 2]], organ_box.min_ijk[0], organ_box.max_ijk[0])
    out[[1, 3]] = np.clip(out[[1, 3]], organ_box.min_ijk[1], organ_box.max_ijk[1])
    return out


# ----------------------------------------------------------------------------------------------
# From the localizer's registrations to a mode's boxes

def prompts_from_registrations(reference, boxes, registrations, library, options, deformable_options=None,
                               query=None, relabel=None, progress=None):
    """``(boxes, plan, info)`` of ``options.mode`` for a query localized by registration.

    ``boxes``: the localizer's boxes; ``registrations``: ``info["registrations"]``
    of ``localize(..., keep_transforms=True)``; ``deformable_options`` (a
    :class:`URSAMLib.deformable.DeformableOptions`) refines them first
    (``query``: the query CT in HU, needed then); ``relabel`` maps the
    library's label values to the boxes' values where they differ.
    ``info`` is JSON-ready: the mode, its options, the deformable stage's seconds.
    Returns ``(boxes, plan, info, priors)``; ``priors`` (``{label: Prior}``) is
    None in box3d mode unless ``options.prior_rectify`` asks for them.
    """
    mode = check_mode(options.mode)
    info = {"mode": mode, "options": options.to_json()}
    if mode == "box3d" and not options.prior_rectify:
        return list(boxes), None, info, None
    priors, prior_info, _ = warped_priors(reference, boxes, registrations, library, deformable_options,
                                          query, relabel, progress)
    info.update(prior_info)
    out, plan = make_prompts(boxes, priors, options, reference.GetSize())
    return out, plan, info, priors


def warped_priors(reference, boxes, registrations, library, deformable_options=None, query=None, relabel=None,
                  progress=None):
    """``({label: Prior}, info, registrations)`` of the boxes' organs (see :func:`prompts_from_registrations`);
    ``registrations`` are those the labels were warped with (refined where a deformable stage ran)."""
    import time

    info = {}
    if not registrations:
        raise URSAMError("prompt modes slice and propagate need the support registrations of the "
                         "registration localizer")
    relabel = dict(relabel or {})
    back = {v: k for k, v in relabel.items()}
    values = [back.get(b.label, b.label) for b in boxes]
    if deformable_options is not None and deformable_options.method != "none":
        from .deformable import refine_registrations

        if progress:
            progress.stage(f"deformable registration of {len(registrations)} support scans "
                           f"({deformable_options.method})")
        t0 = time.perf_counter()
        registrations = refine_registrations(query if query is not None else reference, registrations, library,
                                             deformable_options, progress)
        info["deformable"] = {"options": deformable_options.to_json(),
                              "seconds": round(time.perf_counter() - t0, 2),
                              "seconds_per_support": {r.case_id: round(r.stages.get("deformable", 0.0), 2)
                                                      for r in registrations}}
    t0 = time.perf_counter()
    priors = fuse_priors(reference, registrations, library, values)
    priors = {relabel.get(v, v): p for v, p in priors.items()}
    for v, p in priors.items():
        p.label = v
    info["prior_seconds"] = round(time.perf_counter() - t0, 2)
    info["prior_supports"] = {p.name: p.n_supports for p in priors.values()}
    return priors, info, registrations


# ----------------------------------------------------------------------------------------------
# Several modes on one scan

class SharedEmbeddings:
    """A backend that embeds each slice of a volume once across several pipeline runs.

    ``ursam evaluate --prompts box3d,slice,propagate`` runs the pipeline once
    per mode on the same scan; the image embedding depends only on the slice,
    so the modes share it. Holds the embeddings of one volume at a time
    (cleared by ``set_volume`` with another array); ``encoder_calls`` counts
    the real encoder calls.
    """

    def __init__(self, backend):
        self.backend = backend
        self._volume = None
        self._cache = {}
        self.encoder_seconds = {}

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def set_volume(self, volume):
        if volume is not self._volume:
            self._volume = volume
            self._cache = {}
            self.encoder_seconds = {}
        self.backend.set_volume(volume)

    def _key(self, slice2d):
        base = self._volume.__array_interface__["data"][0] if self._volume is not None else None
        ptr = slice2d.__array_interface__["data"][0]
        if base is None or slice2d.base is None:
            return None
        return (ptr - base) // max(1, slice2d.nbytes)

    def embed(self, slice2d):
        import time

        key = self._key(slice2d)
        if key is not None and key in self._cache:
            return self._cache[key]
        t0 = time.perf_counter()
        emb = self.backend.embed(slice2d)
        if key is not None:
            self._cache[key] = emb
            self.encoder_seconds[key] = time.perf_counter() - t0
        return emb

    def clear(self):
        self._volume = None
        self._cache = {}


# ----------------------------------------------------------------------------------------------
# The atlas vote as a prior in rectification (PromptOptions.prior_rectify)

def prior_rectified(o, prior, add=0.5, keep=0.2):
    """UR-SAM's rectified mask of organ maps ``o`` with the fused atlas vote ``v`` as a prior.

    Algorithm 1 decides the uncertain voxels (M_unc) by their intensity; here
    the supports have a say as well: an uncertain voxel where at least
    ``add`` of the supports put the organ is added, and no voxel is kept
    where fewer than ``keep`` of them do (the atlas strongly disagrees).
    Certain voxels inside the supports' reach stay as SAM has them. Returns
    the mask over ``o.sl``; ``o.masks`` is left as it is.
    """
    rect = o.masks["ursam"]
    if o.m_unc is None or prior is None:
        return rect
    v = prior.on(o.sl)
    return (rect & (v >= keep)) | (o.m_unc & (v >= add))


def apply_prior_rectification(organs, priors, options, into="ursam"):
    """Each main organ's :func:`prior_rectified` mask, as ``o.masks[into]``.

    ``into="ursam"`` replaces UR-SAM's mask (what ``ursam segment`` writes);
    evaluate scores it beside UR-SAM under another name. Organs without a
    prior keep UR-SAM's mask. Run it after the rectification
    (``pipeline.finish_organ``, which starts every organ's masks anew).
    """
    for o in organs:
        if o.prompt_set == "main" and "ursam" in o.masks:
            prior = priors.get(o.label)
            o.masks[into] = o.masks["ursam"] if prior is None else \
                prior_rectified(o, prior, options.prior_add, options.prior_keep)
    return organs
