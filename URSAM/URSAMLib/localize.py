"""Auto-localization of organs from support templates (METHOD.md §1).

Entry point: :func:`localize` ``(image, library, organs, method, progress, **options)
-> (boxes, info)``, with a registry :data:`LOCALIZERS` of methods by name so
that another localizer (MedLAM) plugs in beside the default, "registration".

The registration localizer (METHOD.md §1, "practical alternative"): every
support scan is registered to the query with SimpleITK at about 3 mm (a
translation search for a robust start, then rigid, then affine, optionally a
B-spline), each organ's 6 extreme points are carried through the transform
into the query, fused across supports by the median, and the box is the
extremes of the fused points plus the METHOD.md §1 margin.

Everything here is headless (no Slicer, no Qt, no torch). ``info`` is plain
JSON (for report.json); the transforms themselves are in
``info["registrations"]`` only when ``keep_transforms=True`` (the atlas
baseline of ``ursam evaluate`` warps the support labels with them).
"""
import os
import time
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
from dataclasses import dataclass, field, asdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .boxes import OrganBox, add_margin
from .errors import URSAMError
from .imageio import check_volume, read_image
from .progress import Progress

#: METHOD.md §1: 2 slices in z, 10 px of SAM's 1024 grid in-plane
DEFAULT_MARGIN = (2, 10.0)
#: CT intensities outside this range (air, metal) carry no anatomy for registration
HU_CLIP = (-1000.0, 1500.0)


@dataclass
class RegistrationOptions:
    """Options of the registration localizer (all have working defaults)."""
    #: isotropic grid of the registration, mm (METHOD: "at about 3 mm")
    spacing_mm: float = 3.0
    #: add a B-spline stage after the affine one (slower; points go through its inverse)
    deformable: bool = False
    #: B-spline control grid spacing, mm
    bspline_mm: float = 60.0
    #: supports registered at once (None: one per core, at most the number of supports)
    workers: int | None = None
    #: ITK threads of each registration (None: the cores shared out among the workers)
    threads: int | None = None
    #: voxels of the query's body sampled by the mutual information metric, per level
    samples: int = 20000
    iterations: int = 40
    seed: int = 0

    def to_json(self):
        return asdict(self)


@dataclass
class SupportRegistration:
    """One support scan registered to the query."""
    case_id: str
    #: maps query physical points to support physical points (fixed = query, moving = support)
    transform: sitk.Transform
    seconds: float
    metric: float
    #: {label: 6x3 array of query physical points} of the organs this support has
    points: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)

    def to_json(self):
        return {"case": self.case_id, "seconds": round(self.seconds, 2), "final_metric": round(self.metric, 4),
                "stage_seconds": {k: round(v, 2) for k, v in self.stages.items()},
                "organs": sorted(int(k) for k in self.points)}


# ----------------------------------------------------------------------------------------------
# Images on the registration grid

def _as_float_image(image_or_path, what="image"):
    if isinstance(image_or_path, sitk.Image):
        image = image_or_path
        check_volume(image, "<in-memory image>")
    else:
        image = read_image(image_or_path, what)
        check_volume(image, image_or_path)
    return sitk.Cast(image, sitk.sitkFloat32)


def resample_iso(image, spacing_mm, interpolator=sitk.sitkLinear, default=HU_CLIP[0]):
    """``image`` on an isotropic grid of ``spacing_mm`` covering the same space, clipped to HU_CLIP."""
    size = np.array(image.GetSize())
    spacing = np.array(image.GetSpacing())
    new_size = [max(2, int(round(n))) for n in size * spacing / spacing_mm]
    # The image is smoothed first where it is downsampled, so the new grid does not alias.
    sigma = [max(0.01, (spacing_mm - s) / 2.0) for s in spacing]
    if max(sigma) > 0.1:
        image = sitk.SmoothingRecursiveGaussian(image, sigma)
    out = sitk.Resample(image, new_size, sitk.Transform(), interpolator, image.GetOrigin(),
                        [spacing_mm] * 3, image.GetDirection(), default, sitk.sitkFloat32)
    return sitk.Clamp(out, sitk.sitkFloat32, HU_CLIP[0], HU_CLIP[1])


def _physical_extent(image):
    """Corners' bounding box (physical), as (lo, hi) 3-vectors."""
    size = image.GetSize()
    corners = [image.TransformContinuousIndexToPhysicalPoint([c * (s - 1) for c, s in zip(bits, size)])
               for bits in np.ndindex(2, 2, 2)]
    corners = np.array(corners)
    return corners.min(0), corners.max(0)


def _body_centroid(image):
    """Physical centroid of the body (voxels above -500 HU)."""
    a = sitk.GetArrayViewFromImage(image)
    idx = np.argwhere(a > -500)
    if len(idx) == 0:
        idx = np.argwhere(np.ones_like(a, bool))
    c = idx.mean(0)[::-1]
    return np.array(image.TransformContinuousIndexToPhysicalPoint(c.tolist()))


# ----------------------------------------------------------------------------------------------
# The registration itself

def body_mask(image):
    """The body (above -500 HU) as a UInt8 mask: where the metric samples."""
    return sitk.Cast(image > -500, sitk.sitkUInt8)


def _method(options, mask=None, shrink=(1,), n_voxels=None):
    """Mattes MI sampling about ``options.samples`` voxels of the body at each pyramid level."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    n = n_voxels or 1
    reg.SetMetricSamplingPercentagePerLevel(
        [float(min(1.0, options.samples * s ** 3 / n)) for s in shrink], options.seed)
    if mask is not None:
        reg.SetMetricFixedMask(mask)
    reg.SetInterpolator(sitk.sitkLinear)
    if options.threads:
        reg.SetNumberOfThreads(int(options.threads))
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel([s / 2.0 if s > 1 else 0.0 for s in shrink])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return reg


def _count(mask):
    return max(1, int(np.count_nonzero(sitk.GetArrayViewFromImage(mask))))


def initial_translation(fixed, moving, options):
    """A robust start: body centroids matched in-plane, then a search over all z offsets.

    Scans differ in their field of view (head only, or down to the chest; a
    slab of the abdomen against the whole abdomen), so matching centres is not
    enough along z: every z offset that keeps half the shorter scan in overlap
    is tried on a coarse grid, with small in-plane shifts, and the best
    mutual information wins.
    """
    coarse = 4.0 * options.spacing_mm
    f = resample_iso(fixed, coarse)
    m = resample_iso(moving, coarse)
    shift = _body_centroid(m) - _body_centroid(f)
    flo, fhi = _physical_extent(f)
    mlo, mhi = _physical_extent(m)
    # Along z: every offset with at least half of the shorter extent overlapping.
    half = 0.5 * min(fhi[2] - flo[2], mhi[2] - mlo[2])
    tz_lo, tz_hi = mlo[2] - fhi[2] + half, mhi[2] - flo[2] - half
    centre_z = 0.5 * (tz_lo + tz_hi)
    n_z = max(1, int(np.ceil((tz_hi - tz_lo) / 2.0 / coarse)))
    n_xy = 2
    tx = sitk.TranslationTransform(3, (float(shift[0]), float(shift[1]), float(centre_z)))
    mask = body_mask(f)
    reg = _method(options, mask, n_voxels=_count(mask))
    reg.SetInitialTransform(tx, inPlace=True)
    reg.SetOptimizerAsExhaustive([n_xy, n_xy, n_z])
    reg.SetOptimizerScales([coarse, coarse, coarse])
    reg.Execute(f, m)
    return np.array(tx.GetOffset())


def _linear_stage(f, m, transform, options, mask, n_body, shrink, learning_rate, min_step):
    """One rigid or affine stage (in place on ``transform``): step gradient descent on Mattes MI."""
    reg = _method(options, mask, shrink, n_body)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=learning_rate, minStep=min_step,
                                                 numberOfIterations=options.iterations,
                                                 relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(transform, inPlace=True)
    reg.Execute(f, m)
    return reg.GetMetricValue()


def register(fixed, moving, options=RegistrationOptions(), fixed_prepared=None):
    """Register ``moving`` (support) to ``fixed`` (query): returns (transform, metric, stage seconds).

    Both are float images in HU. The transform maps query points to support points.
    """
    stages = {}
    t0 = time.perf_counter()
    f = fixed_prepared if fixed_prepared is not None else resample_iso(fixed, options.spacing_mm)
    m = resample_iso(moving, options.spacing_mm)
    offset = initial_translation(fixed, moving, options)
    stages["initialize"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    mask = body_mask(f)
    n_body = _count(mask)
    flo, fhi = _physical_extent(f)
    rigid = sitk.Euler3DTransform()
    rigid.SetCenter(((flo + fhi) / 2).tolist())
    rigid.SetTranslation(offset.tolist())
    _linear_stage(f, m, rigid, options, mask, n_body, (4, 2, 1), learning_rate=2.0, min_step=0.01)
    stages["rigid"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    metric = _linear_stage(f, m, affine, options, mask, n_body, (2, 1), learning_rate=1.0, min_step=0.005)
    stages["affine"] = time.perf_counter() - t0
    transform = affine

    if options.deformable:
        t0 = time.perf_counter()
        mesh = [max(1, int(round((hi - lo) / options.bspline_mm))) for lo, hi in zip(flo, fhi)]
        bspline = sitk.BSplineTransformInitializer(f, mesh, order=3)
        reg = _method(options, mask, (2, 1), n_body)
        reg.SetMovingInitialTransform(affine)
        reg.SetInitialTransform(bspline, inPlace=True)
        reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=options.iterations,
                                 maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=500)
        reg.Execute(f, m)
        metric = reg.GetMetricValue()
        transform = sitk.CompositeTransform([affine, bspline])
        stages["deformable"] = time.perf_counter() - t0
    return transform, float(metric), stages


def invert_points(transform, points, tol=0.05, max_iter=50):
    """Query points q with ``transform(q) = p`` for each support point p (mm).

    Affine transforms are inverted exactly; with a B-spline stage, the affine
    inverse starts a fixed-point iteration, which converges for the smooth,
    small deformations the B-spline stage finds.
    """
    points = np.asarray(points, np.float64).reshape(-1, 3)
    affine = transform
    if isinstance(transform, sitk.CompositeTransform) or transform.GetName() == "CompositeTransform":
        affine = sitk.CompositeTransform(transform).GetNthTransform(0)
        affine = sitk.AffineTransform(affine)
    inverse = affine.GetInverse()
    out = np.array([inverse.TransformPoint(p.tolist()) for p in points])
    if affine is transform:
        return out
    for i, p in enumerate(points):
        q = out[i]
        for _ in range(max_iter):
            r = np.array(transform.TransformPoint(q.tolist())) - p
            if np.linalg.norm(r) < tol:
                break
            q = q - r
        out[i] = q
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
# One support per worker thread (SimpleITK releases the GIL while it computes)

def _register_support(template, fixed, values, options):
    """Read one support, register it to the query, carry its organs' points across."""
    t0 = time.perf_counter()
    moving = template.read_image()
    label_image, labels = template.read_labels(reference=moving)
    transform, metric, stages = register(fixed, moving, options)
    pts = support_points(label_image, labels, values)
    mapped = {v: invert_points(transform, p) for v, p in pts.items()}
    return SupportRegistration(template.case_id, transform, time.perf_counter() - t0, metric, mapped, stages)


def _cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def register_supports(query, templates, values, options=RegistrationOptions(), progress=None):
    """Register every support to the query; supports run in parallel threads where there are cores.

    Threads, not processes: SimpleITK releases the GIL while it computes, and
    threads need no re-import of the caller's main module (a Slicer session
    cannot spawn Python workers of itself).
    """
    progress = progress or Progress()
    fixed = _as_float_image(query)
    cores = _cores()
    workers = max(1, min(options.workers or cores, len(templates)))
    if options.threads is None:
        options = RegistrationOptions(**{**options.to_json(), "threads": max(1, cores // workers)})
    progress.stage(f"registering {len(templates)} support scans", total=len(templates))
    results = []
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ursam-register")
    futures = [pool.submit(_register_support, t, fixed, list(values), options) for t in templates]
    try:
        for i, fut in enumerate(futures):
            while True:
                progress.check_cancel()
                try:
                    results.append(fut.result(timeout=0.2))
                    break
                except FutureTimeout:
                    continue
            progress.step(i + 1, len(futures))
    except BaseException:
        # A cancel returns at once; registrations already running finish in the background.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    progress.done()
    return results


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


def localize_registration(image, library, organs=None, progress=None, margin=DEFAULT_MARGIN,
                          keep_transforms=False, missing="error", **options):
    """The registration localizer; see :func:`localize`. ``options`` set :class:`RegistrationOptions`."""
    progress = progress or Progress()
    try:
        opts = RegistrationOptions(**options)
    except TypeError as err:
        raise URSAMError(f"unknown registration localizer option: {err}") from None
    wanted = library.resolve_organs(organs)
    templates = library.templates()
    if organs is not None and missing == "error":
        _require_organs(library, templates, wanted)
    query = _as_float_image(image)
    t0, cpu0 = time.perf_counter(), time.process_time()
    regs = register_supports(query, templates, wanted, opts, progress)
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
            "registration_cpu_seconds": round(cpu, 2), "cores": _cores(),
            "supports_detail": [r.to_json() for r in regs],
            "raw_boxes": [b.to_json() for b in raw], "point_spread_mm": spread,
            "skipped": skipped}
    if keep_transforms:
        info["registrations"] = regs
    return boxes, info


#: localizers by name: ``fn(image, library, organs=None, progress=None, **options) -> (boxes, info)``
LOCALIZERS = {"registration": localize_registration}
# METHOD.md §1's learned localizer (URSAMLib.medlam; torch is imported on its first use)
from .medlam import localize_medlam  # noqa: E402
LOCALIZERS["medlam"] = localize_medlam


def localize(image, library, organs=None, method="registration", progress=None, **options):
    """Localize organs in a CT from a template library: ``(boxes, info)``.

    ``image``: a path (NIfTI, NRRD, MHA, DICOM folder) or a SimpleITK image in HU.
    ``library``: a :class:`URSAMLib.templates.Library` or its folder.
    ``organs``: names or label values (None: every organ of the library).
    ``method``: a key of :data:`LOCALIZERS`. ``progress``: a :class:`Progress`
    (its cancel callback is honoured between supports).
    Options of the registration localizer: ``margin=(z_slices, grid_px)``
    (METHOD.md §1, default (2, 10)); ``missing``: "error" (default) raises
    URSAMError when a requested organ is labelled in no support, "skip" warns
    and records it in ``info["skipped"]``; ``keep_transforms``; and the fields
    of :class:`RegistrationOptions`.

    ``boxes`` are :class:`OrganBox` in the query's voxel indices (margin
    included); ``info`` is JSON-ready: per-support registration seconds,
    the boxes before the margin, organs skipped (with the reason).
    """
    from .templates import Library

    if method not in LOCALIZERS:
        raise URSAMError(f"unknown localizer {method!r}; choose one of {', '.join(sorted(LOCALIZERS))}")
    if not isinstance(library, Library):
        library = Library(library)
    return LOCALIZERS[method](image, library, organs=organs, progress=progress, **options)


# ----------------------------------------------------------------------------------------------
# The atlas baseline: support labels warped by the same registrations, majority vote

def warp_labels(reference, registration, template, values):
    """A support's label map (only ``values``) resampled onto the query grid, nearest neighbour."""
    label_image, labels = template.read_labels()
    keep = np.where(np.isin(labels, list(values)), labels, 0).astype(np.uint16)
    moving = sitk.GetImageFromArray(keep)
    moving.CopyInformation(label_image)
    return sitk.Resample(moving, reference, registration.transform, sitk.sitkNearestNeighbor, 0,
                         sitk.sitkUInt16)


def atlas_labels(reference, registrations, library, values):
    """Multi-atlas segmentation of the query: every support's labels warped, then a majority vote.

    The classic baseline without SAM (``ursam evaluate`` method ``atlas``).
    A voxel takes the label most supports give it, background included; ties
    go to background. Returns an int32 array [z, y, x] on ``reference``'s grid.
    """
    by_id = {t.case_id: t for t in library.templates()}
    warped = [warp_labels(reference, r, by_id[r.case_id], values) for r in registrations]
    if not warped:
        raise URSAMError("no registered support scan to build the atlas from", library.meta_path)
    if len(warped) == 1:
        voted = warped[0]
    else:
        voted = sitk.LabelVoting(warped, 0)
    return sitk.GetArrayFromImage(voted).astype(np.int32)
