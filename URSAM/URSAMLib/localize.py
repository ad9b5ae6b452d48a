"""Localization (METHOD.md §1): where each organ of a query is, from a few labelled support scans.

Entry point: :func:`localize` ``(image, library, organs, method, progress,
**options) -> Localization``, with a registry :data:`LOCALIZERS` of methods by
name, so that another localizer (MedLAM) plugs in beside the default,
"registration".

The registration localizer (METHOD.md §1, "practical alternative"): every
support scan is registered to the query (:mod:`URSAMLib.registration`), each
organ's 6 extreme points are carried through the transform into the query,
fused across supports by the median, and the box is the extremes of the fused
points plus the METHOD.md §1 margin. Its :class:`Localization` keeps the
support registrations, which warp the support labels into the query for the
slice-adaptive prompts, the atlas prior and the atlas baseline.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .boxes import OrganBox, add_margin
from .errors import URSAMError
from .progress import STAGE_DEFORM, Progress

#: METHOD.md §1: 2 slices in z, 10 px of SAM's 1024 grid in-plane
DEFAULT_MARGIN = (2, 10.0)


def check_margin(margin):
    """A margin ``(z_slices, grid_px)``, both at least 0."""
    try:
        z, xy = margin
        z, xy = int(round(float(z))), float(xy)
    except (TypeError, ValueError):
        raise URSAMError(f"the box margin must be two numbers Z,XY, got {margin!r}") from None
    if z < 0 or xy < 0:
        raise URSAMError(f"the box margin must not be negative, got {z},{xy:g}")
    return z, xy


def parse_margin(text):
    """``"Z,XY"`` (slices, px of SAM's 1024 grid) as a checked margin."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 2:
        raise URSAMError(f"the box margin must be Z,XY (two numbers), got {text!r}")
    return check_margin(parts)


@dataclass
class Localization:
    """One query's organ boxes and what found them.

    ``boxes``: :class:`OrganBox` in the query's voxel indices, margin
    included. ``info``: JSON-ready (for report.json). ``query``: the query CT
    (a path, or a SimpleITK image in HU). ``library``: the template library.
    ``registrations``: the support registrations (registration localizer;
    None for MedLAM and for box files). ``relabel``: the library's label
    values to the values of ``boxes`` where they differ (an evaluation dataset
    numbers its organs its own way).
    """
    boxes: list
    info: dict = field(default_factory=dict)
    query: object = None
    library: object = None
    registrations: list = None
    relabel: dict = field(default_factory=dict)
    _refined: dict = field(default_factory=dict, repr=False, compare=False)
    _priors: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_boxes(cls, boxes, source=None):
        """Boxes from a box file or drawn by the user: nothing to warp."""
        return cls(list(boxes), {"method": "boxes", **({"source": str(source)} if source else {})})

    @property
    def warps_labels(self):
        """Whether the support labels can be warped into the query (the registration localizer)."""
        return bool(self.registrations) and self.library is not None

    def relabeled(self, relabel, keep=None):
        """The same localization with the boxes' label values mapped by ``relabel`` (library value ->
        new value); boxes whose new value is not in ``keep`` (if given) are left out."""
        boxes = [OrganBox(relabel[b.label], b.name, list(b.min_ijk), list(b.max_ijk), list(b.notes),
                          slice_boxes=b.slice_boxes)
                 for b in self.boxes if b.label in relabel and (keep is None or relabel[b.label] in keep)]
        return Localization(boxes, self.info, self.query, self.library, self.registrations, dict(relabel),
                            self._refined, self._priors)

    def library_values(self):
        """The library's label values of the boxes."""
        back = {v: k for k, v in self.relabel.items()}
        return [back.get(b.label, b.label) for b in self.boxes]

    def refined(self, deformable_options=None, progress=None):
        """The support registrations with the deformable stage on top (computed once per options)."""
        from .registration.deformable import refine_registrations

        if not self.warps_labels:
            raise URSAMError("warping the support labels needs the support registrations of the registration "
                             "localizer (a template library)")
        if deformable_options is None or deformable_options.method == "none":
            return self.registrations
        key = repr(deformable_options.to_json())
        if key not in self._refined:
            if progress:
                progress.stage(f"{STAGE_DEFORM} ({deformable_options.method}, {len(self.registrations)} support scans)")
            t0 = time.perf_counter()
            regs = refine_registrations(self.query, self.registrations, self.library, deformable_options, progress)
            info = {"options": deformable_options.to_json(), "seconds": round(time.perf_counter() - t0, 2),
                    "seconds_per_support": {r.case_id: round(r.stages.get("deformable", 0.0), 2) for r in regs}}
            self._refined[key] = (regs, info)
        return self._refined[key][0]

    def deformable_info(self, deformable_options):
        """What the deformable stage of these options did (JSON), None if it did not run."""
        if deformable_options is None:
            return None
        entry = self._refined.get(repr(deformable_options.to_json()))
        return entry[1] if entry else None

    def priors(self, reference, deformable_options=None, progress=None):
        """``({label: atlas_prior.Prior}, info)``: the support labels warped onto ``reference`` and fused
        (computed once per deformable options); labels as the boxes'."""
        from .atlas_prior import fuse_priors

        key = repr(deformable_options.to_json() if deformable_options is not None else None)
        if key not in self._priors:
            regs = self.refined(deformable_options, progress)
            t0 = time.perf_counter()
            priors = fuse_priors(reference, regs, self.library, self.library_values())
            priors = {self.relabel.get(v, v): p for v, p in priors.items()}
            for v, p in priors.items():
                p.label = v
            info = {"prior_seconds": round(time.perf_counter() - t0, 2),
                    "prior_supports": {p.name: p.n_supports for p in priors.values()}}
            deformable = self.deformable_info(deformable_options)
            if deformable:
                info["deformable"] = deformable
            self._priors[key] = (priors, info)
        return self._priors[key]

    def atlas(self, reference, deformable_options=None, progress=None):
        """The majority-vote atlas of the supports (no SAM) on ``reference``, in the boxes' label values;
        with the deformable stage of ``deformable_options`` on top of the affine registrations."""
        from .registration.warp import atlas_labels

        voted = atlas_labels(reference, self.refined(deformable_options, progress), self.library,
                             self.library_values())
        if not self.relabel:
            return voted
        out = np.zeros_like(voted)
        for lib_value, value in self.relabel.items():
            out[voted == lib_value] = value
        return out


# ----------------------------------------------------------------------------------------------
# Extreme points of the organs of a support

def extreme_points(labels_zyx, value):
    """The 6 extreme points of an organ (METHOD.md §1) as voxel indices [x, y, z].

    Min and max along z, y and x; on each extreme plane, the foreground voxel
    nearest the median of that plane's foreground.
    """
    idx = np.argwhere(labels_zyx == value)  # (n, 3) as z, y, x
    if len(idx) == 0:
        return None
    points = []
    for axis in (2, 1, 0):  # x, y, z
        for fn in (np.min, np.max):
            plane = idx[idx[:, axis] == fn(idx[:, axis])]
            med = np.median(plane, axis=0)
            points.append(plane[np.argmin(((plane - med) ** 2).sum(1))][::-1])
    return np.array(points, np.float64)


def support_points(image, labels_zyx, values):
    """{value: 6x3 physical points} of each organ present in a support scan."""
    out = {}
    for v in values:
        pts = extreme_points(labels_zyx, v)
        if pts is not None:
            out[int(v)] = np.array([image.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in pts])
    return out


# ----------------------------------------------------------------------------------------------
# Fusion across supports, boxes

def fuse_boxes(reference, registrations, organs, margin=DEFAULT_MARGIN, warn=None):
    """Boxes of the query from the supports' mapped extreme points (median), plus the margin.

    ``reference`` gives the query grid; ``organs`` is ``{value: name}``.
    Returns ``(boxes, raw_boxes, skipped, spread)``: boxes with the margin,
    the boxes without it, ``{name: reason}`` of organs that could not be
    placed, and the spread of the supports' points per organ (mm, median
    distance to the fused point): a large spread means the supports disagree.
    """
    size = reference.GetSize()
    boxes, raw, skipped, spread = [], [], {}, {}
    for value, name in organs.items():
        sets = [r.points[value] for r in registrations if value in r.points]
        if not sets:
            skipped[name] = "no support scan labels it"
            continue
        stack = np.stack(sets)  # (supports, 6, 3), query physical points
        fused = np.median(stack, axis=0)
        spread[name] = round(float(np.median(np.linalg.norm(stack - fused, axis=2))), 2)
        idx = np.array([reference.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in fused])
        lo = np.floor(idx.min(0) + 0.5).astype(int)
        hi = np.floor(idx.max(0) + 0.5).astype(int)
        if np.any(hi < 0) or np.any(lo > np.array(size) - 1):
            skipped[name] = "its box lies outside the image"
            continue
        notes = [f"localized from {len(sets)} support scan(s)"]
        clo = np.maximum(lo, 0)
        chi = np.minimum(hi, np.array(size) - 1)
        if np.any(clo != lo) or np.any(chi != hi):
            notes.append("box reaches past the image and was clipped")
        box = OrganBox(int(value), name, clo.tolist(), chi.tolist(), notes)
        raw.append(box)
        boxes.append(add_margin(box, int(margin[0]), float(margin[1]), size))
    for name, reason in skipped.items():
        if warn:
            warn(f"{name} was not localized: {reason}; it is skipped")
    return boxes, raw, skipped, spread


def _require_organs(library, templates, wanted):
    """Fail before any registration when a requested organ is labelled in no support."""
    found = set()
    for t in templates:
        found.update(int(v) for v in np.unique(t.read_labels()[1]))
        if all(v in found for v in wanted):
            return
    absent = [name for v, name in wanted.items() if v not in found]
    raise URSAMError(f"no support scan of the library labels {', '.join(absent)}", library.meta_path)


def localize_registration(image, library, organs=None, progress=None, margin=DEFAULT_MARGIN, missing="error",
                          **options):
    """The registration localizer; see :func:`localize`. ``options`` set
    :class:`URSAMLib.registration.affine.RegistrationOptions`."""
    from .registration.affine import RegistrationOptions, as_float_image, cores, register_supports

    progress = progress or Progress()
    try:
        opts = RegistrationOptions(**options).check()
    except TypeError as err:
        raise URSAMError(f"unknown registration localizer option: {err}") from None
    margin = check_margin(margin)
    wanted = library.resolve_organs(organs)
    templates = library.templates()
    if organs is not None and missing == "error":
        _require_organs(library, templates, wanted)
    query = as_float_image(image)
    values = list(wanted)

    def carry(template, support_image):
        label_image, labels = template.read_labels(reference=support_image)
        return support_points(label_image, labels, values)

    t0, cpu0 = time.perf_counter(), time.process_time()
    regs = register_supports(query, templates, carry, opts, progress)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    present = set().union(*(r.points for r in regs)) if regs else set()
    absent = [name for v, name in wanted.items() if v not in present]
    if organs is not None and absent and missing == "error":
        raise URSAMError(f"no support scan of the library labels {', '.join(absent)}", library.meta_path)
    boxes, raw, skipped, spread = fuse_boxes(query, regs, wanted, margin, progress.warn)
    info = {"method": "registration", "library": str(Path(library.path).absolute()),
            "supports": [r.case_id for r in regs], "margin_z_xy": [int(margin[0]), float(margin[1])],
            "options": opts.to_json(), "seconds": round(seconds, 2),
            "registration_seconds": {r.case_id: round(r.seconds, 2) for r in regs},
            # CPU time of all registrations, which other processes on the machine do not inflate:
            # cpu_seconds / cores is the time per support on that many free cores.
            "registration_cpu_seconds": round(cpu, 2), "cores": cores(),
            "supports_detail": [r.to_json() for r in regs],
            "raw_boxes": [b.to_json() for b in raw], "point_spread_mm": spread,
            "skipped": skipped}
    # The query is kept as it was given: a path is read again where needed, rather than held in memory.
    return Localization(boxes, info, image, library, regs)


#: localizers by name: ``fn(image, library, organs=None, progress=None, **options) -> Localization``
LOCALIZERS = {"registration": localize_registration}
# METHOD.md §1's learned localizer (URSAMLib.medlam; torch is imported on its first use)
from .medlam import localize_medlam  # noqa: E402
LOCALIZERS["medlam"] = localize_medlam
DEFAULT_LOCALIZER = "registration"


def localize(image, library, organs=None, method=DEFAULT_LOCALIZER, progress=None, **options):
    """Localize organs in a CT from a template library: a :class:`Localization`.

    ``image``: a path (NIfTI, NRRD, MHA, DICOM folder) or a SimpleITK image in HU.
    ``library``: a :class:`URSAMLib.templates.Library` or its folder.
    ``organs``: names or label values (None: every organ of the library).
    ``method``: a key of :data:`LOCALIZERS`. ``progress``: a :class:`Progress`
    (its cancel callback is honoured between supports).
    Options of the registration localizer: ``margin=(z_slices, grid_px)``
    (METHOD.md §1, default (2, 10)); ``missing``: "error" (default) raises
    URSAMError when a requested organ is labelled in no support, "skip" warns
    and records it in ``info["skipped"]``; and the fields of
    :class:`URSAMLib.registration.affine.RegistrationOptions`.

    The boxes are :class:`OrganBox` in the query's voxel indices (margin
    included); ``info`` is JSON-ready: per-support registration seconds,
    the boxes before the margin, organs skipped (with the reason).
    """
    from .templates import Library

    if method not in LOCALIZERS:
        raise URSAMError(f"unknown localizer {method!r}; choose one of {', '.join(sorted(LOCALIZERS))}")
    if not isinstance(library, Library):
        library = Library(library)
    return LOCALIZERS[method](image, library, organs=organs, progress=progress, **options)
