"""Localization (METHOD.md §1): where each organ of a query is, from a few labelled support scans.

Entry point: :func:`localize` ``(image, library, organs, method, progress,
**options) -> Localization``, with a registry :data:`LOCALIZERS` of methods by
name, so that another localizer (MedLAM) plugs in beside the default,
"registration".

The registration localizer (METHOD.md §1, "practical alternative"): every
support scan is registered to the query (:mod:`URSAMLib.registration`), each
organ's 6 extreme points are carried through the transform into the query,
fused across supports by the median, and the box is the extremes of the fused
points plus the METHOD.md §1 margin. Its :class:`URSAMLib.localization.Localization`
keeps the support registrations.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from .boxes import OrganBox, load_boxes
from .errors import URSAMError
from .localization import DEFAULT_MARGIN, NO_MARGIN, Localization, check_margin
from .medlam import localize_medlam
from .orientation import Orientation
from .progress import STAGE_LOCALIZE, Progress
from .registration.affine import RegistrationOptions, as_float_image, cores, register_supports
from .templates import Library

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
    orientation = Orientation.of(reference)  # the margin is on the slices SAM sees
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
        boxes.append(orientation.add_margin(box, int(margin[0]), float(margin[1])))
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
    regs, screening = register_supports(query, templates, carry, opts, progress)
    regs, selection = select_per_organ(regs, opts.per_organ)
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
            "skipped": skipped,
            "selection": {wanted[v]: ids for v, ids in selection.items() if v in wanted}}
    if screening is not None:
        info["screening"] = screening.to_json()
    # The query is kept as it was given: a path is read again where needed, rather than held in memory.
    return Localization(boxes, info, image, library, regs)


def select_per_organ(registrations, k=None):
    """Each organ's supports: of those that label it, the ``k`` whose registrations fit best (the lowest
    final metric; None: all; a dict: per label value, None for a value it lacks). A registration keeps the
    points of the organs it was chosen for (so that it localizes, votes and is warped for those alone); one
    chosen for none is left out.

    Returns ``(registrations, {label: [case ids]})``.
    """
    chosen = {}
    for value in sorted({v for r in registrations for v in r.points}):
        have = sorted((r for r in registrations if value in r.points), key=lambda r: (r.metric, r.case_id))
        n = k.get(value) if isinstance(k, dict) else k
        chosen[value] = [r.case_id for r in (have if n is None else have[:n])]
    out = []
    for r in registrations:
        keep = {v: p for v, p in r.points.items() if r.case_id in chosen[v]}
        if keep:
            out.append(r if len(keep) == len(r.points) else replace(r, points=keep))
    return out, chosen


#: localizers by name: ``fn(image, library, organs=None, progress=None, **options) -> Localization``; the
#: learned one is METHOD.md §1's MedLAM (URSAMLib.medlam; torch is imported on its first use)
LOCALIZERS = {"registration": localize_registration, "medlam": localize_medlam}
DEFAULT_LOCALIZER = "registration"


def check_localizer(method):
    """The one check of a localizer's name."""
    if method not in LOCALIZERS:
        raise URSAMError(f"unknown localizer {method!r}; choose one of {', '.join(sorted(LOCALIZERS))}")
    return method


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

    check_localizer(method)
    if not isinstance(library, Library):
        library = Library(library)
    return LOCALIZERS[method](image, library, organs=organs, progress=progress, **options)


def localize_library(source, scan, settings, progress=None, per_organ=None):
    """The localization step of a run whose organs come from a template library: a :class:`Localization`.

    ``source``: a :class:`URSAMLib.runner.LibrarySource`; ``scan``: the run's
    :class:`URSAMLib.imageio.Scan` (the localizer reads ``scan.source``);
    ``settings``: the run's (a margin of None is METHOD.md §1's);
    ``per_organ``: ``{organ name: k}`` of the calibration (how many
    best-fitting supports each organ takes), for the registration localizer.
    Fails where no organ is localized, unless the source skips what is
    missing (then the localization has no boxes).
    """
    progress = progress or Progress()
    if settings.prompts.mode not in ("auto", "box3d") and settings.localizer != "registration":
        raise URSAMError(f"--prompts {settings.prompts.mode} needs --localizer registration "
                         "(the warped support labels)")
    progress.stage(STAGE_LOCALIZE)
    options = dict(source.localizer_options or {})
    if per_organ and settings.localizer == "registration" and "per_organ" not in options:
        library = source.library
        options["per_organ"] = {library.label_of(name): k for name, k in per_organ.items()
                                if name in library.names.values()}
    localization = localize(scan.source, source.library, organs=source.organs, method=settings.localizer,
                            progress=progress, margin=settings.margin or DEFAULT_MARGIN, missing=source.missing,
                            **options)
    if source.relabel is not None:
        localization = relabeled(localization, source.relabel, source.keep)
    if not localization.boxes and source.missing != "skip":
        raise URSAMError("no organ could be localized from the template library",
                         getattr(localization.library, "path", None))
    return localization


def relabeled(localization, relabel, keep=None):
    """The same localization with the boxes' label values mapped by ``relabel`` (library value -> new
    value); boxes whose new value is not in ``keep`` (if given) are left out."""
    boxes = [OrganBox(relabel[b.label], b.name, list(b.min_ijk), list(b.max_ijk), list(b.notes),
                      slice_boxes=b.slice_boxes)
             for b in localization.boxes if b.label in relabel and (keep is None or relabel[b.label] in keep)]
    return Localization(boxes, localization.info, localization.query, localization.library,
                        localization.registrations, dict(relabel))


def given_boxes(boxes, scan, margin=None, progress=None):
    """The localization step of a run with boxes given: a box file (``boxes`` a path, voxel indices of the
    image as stored) or boxes (ROIs), plus ``margin`` on the canonical slices (None: none). Nothing is
    warped."""
    progress = progress or Progress()
    margin = margin or NO_MARGIN
    path = None
    if isinstance(boxes, (str, Path)):
        path = Path(boxes).absolute()
        boxes = load_boxes(boxes, scan.reference.GetSize(), warn=progress.warn)
    boxes = list(boxes)
    if margin != NO_MARGIN:
        orientation = Orientation.of(scan.reference)  # the margin is on the slices SAM sees
        boxes = [orientation.add_margin(b, margin[0], margin[1]) for b in boxes]
    return Localization.from_boxes(boxes, path, margin)


# ----------------------------------------------------------------------------------------------
# Where a run's organs come from

@dataclass
class LibrarySource:
    """Organs localized from a template library.

    ``organs``: names or label values (None: all of the library);
    ``localizer_options``: the localizer's own options beyond the settings
    (support workers, the MedLAM checkpoint); ``missing``: "error" (an organ
    no support labels fails the run) or "skip" (it is left out, and a scan
    where none is localized gives no segmentation); ``relabel``: library
    value -> the value the boxes get (an evaluation dataset numbers its
    organs its own way), ``keep``: only the organs of these new values.
    ``per_organ``: ``{organ name: k}``, each organ voted by its ``k``
    best-fitting supports where the run has no calibration to say so (a
    calibration's leave-one-out runs, voted as its queries are).
    """
    library: Union[str, Path, Library]
    organs: Optional[Union[str, Sequence]] = None
    localizer_options: dict = field(default_factory=dict)
    missing: str = "error"
    relabel: Optional[Dict[int, int]] = None
    keep: Optional[set] = None
    per_organ: Optional[Dict[str, int]] = None

    def __post_init__(self):
        if not isinstance(self.library, Library):
            self.library = Library(self.library)  # read (and checked) once, where the job is made

    def localize(self, scan, settings, progress, per_organ=None):
        """The organs of ``scan`` (a :class:`URSAMLib.imageio.Scan`) from the library: a
        :class:`URSAMLib.localization.Localization` (:func:`URSAMLib.localizers.localize_library`)."""
        return localize_library(self, scan, settings, progress,
                                per_organ if per_organ is not None else self.per_organ)

    def describe(self, localization):
        """What report.json says of the source."""
        return {"templates": str(Path(localization.library.path).absolute()), "localization": localization.info}


@dataclass
class BoxSource:
    """Organ boxes given: a box file (voxel indices of the image as stored), or boxes (ROIs). They keep their
    own prompts: nothing is warped."""
    boxes: Union[str, Path, List[OrganBox]]

    def localize(self, scan, settings, progress, per_organ=None):
        """The boxes on ``scan`` with the settings' margin: a :class:`URSAMLib.localization.Localization`
        (:func:`URSAMLib.localizers.given_boxes`)."""
        return given_boxes(self.boxes, scan, settings.margin, progress)

    def describe(self, localization):
        """What report.json says of the source."""
        if isinstance(self.boxes, (str, Path)):
            return {"boxes": str(Path(self.boxes).absolute())}
        return {"boxes": [b.to_json() for b in localization.boxes]}
