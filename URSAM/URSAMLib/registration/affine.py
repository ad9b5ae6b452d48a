"""Rigid and affine registration of support scans to a query CT (SimpleITK).

Every support is registered to the query at about 3 mm (METHOD.md §1, the
registration localizer): a translation search for a robust start, then rigid,
then affine, on Mattes mutual information over the body. The transform maps
query points to support points, so ``sitk.Resample(support, query, transform)``
brings a support's labels into the query; :func:`invert_points` carries
support points the other way.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Union

import numpy as np
import SimpleITK as sitk

from ..errors import URSAMError
from ..imageio import check_volume, read_image
from ..orientation import canonical
from ..progress import STAGE_REGISTER, STAGE_SCREEN, Progress

#: CT intensities outside this range (air, metal) carry no anatomy for registration
HU_CLIP = (-1000.0, 1500.0)


def itk_seed(seed):
    """The random seed handed to ITK for a run's ``seed``: ITK reads 0 as "seed from the wall clock"
    (``sitk.sitkWallClock``), which would make every registration, and so every run, differ."""
    return int(seed) + 1


@dataclass
class RegistrationOptions:
    """Options of the registration localizer (all have working defaults)."""
    #: isotropic grid of the registration, mm (METHOD: "at about 3 mm")
    spacing_mm: float = 3.0
    #: supports registered at once (None: one per core, at most the number of supports)
    workers: Optional[int] = None
    #: ITK threads of each registration (None: one, so that runs repeat; the supports run in parallel)
    threads: Optional[int] = None
    #: voxels of the query's body sampled by the mutual information metric, per level
    samples: int = 20000
    iterations: int = 40
    #: pyramid (shrink factors) of the rigid and of the affine stage
    rigid_shrink: tuple = (4, 2, 1)
    affine_shrink: tuple = (2, 1)
    #: the metric's support-image gradient from a smoothed gradient image made per pyramid level (True),
    #: or by central differences at the sampled points only (False: the same fit, without filtering the
    #: whole support at every level)
    gradient_image: bool = True
    seed: int = 0
    #: supports registered in full: the best of a coarse screen of every support (the mutual information at
    #: the initial search's best offset); None: every support
    screen: Optional[int] = 10
    #: per organ, the supports whose registrations fit best (the lowest final metric) among those that label
    #: it; their points and labels alone localize and warp it (None: every support that labels it)
    per_organ: Optional[Union[int, Dict[int, Optional[int]]]] = None

    def check(self):
        if self.spacing_mm <= 0:
            raise URSAMError(f"registration spacing must be positive, got {self.spacing_mm}")
        if self.workers is not None and self.workers < 1:
            raise URSAMError(f"workers must be at least 1, got {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise URSAMError(f"threads must be at least 1, got {self.threads}")
        per_organ = self.per_organ.values() if isinstance(self.per_organ, dict) else [self.per_organ]
        for name, value in [("screen", self.screen)] + [("per_organ", v) for v in per_organ]:
            if value is not None and (int(value) != value or value < 1):
                raise URSAMError(f"{name} must be a whole number of at least 1 (or none), got {value}")
        for name in ("rigid_shrink", "affine_shrink"):
            levels = getattr(self, name)
            if not levels or any(int(v) != v or v < 1 for v in levels):
                raise URSAMError(f"{name} must be whole numbers of at least 1, got {levels}")
        return self

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

def as_float_image(image_or_path, what="image"):
    if isinstance(image_or_path, sitk.Image):
        image = image_or_path
        check_volume(image, "<in-memory image>")
    else:
        image = read_image(image_or_path, what)
        check_volume(image, image_or_path)
    return sitk.Cast(image, sitk.sitkFloat32)


#: the fewest voxels along an axis of a registration grid
MIN_GRID_VOXELS = 8


def smooth(image, sigma_mm):
    """Gaussian smoothing of ``image`` by ``sigma_mm`` (physical, per axis). The recursive filter needs four
    voxels along every axis; a thinner scan (a few slices) is smoothed by the discrete kernel instead."""
    if min(image.GetSize()) >= 4:
        return sitk.SmoothingRecursiveGaussian(image, sigma_mm)
    return sitk.DiscreteGaussian(image, [float(v) ** 2 for v in sigma_mm], 32, 0.01, True)


def resample_iso(image, spacing_mm, interpolator=sitk.sitkLinear, default=HU_CLIP[0]):
    """``image`` on an isotropic grid of ``spacing_mm`` covering the same space, clipped to HU_CLIP."""
    size = np.array(image.GetSize())
    spacing = np.array(image.GetSpacing())
    new_size = np.array([max(2, int(round(n))) for n in size * spacing / spacing_mm])
    # A thin scan (a few slices) gets a grid of MIN_GRID_VOXELS along that axis, centred on it and air
    # beyond it: ITK's pyramid smooths each level with a filter that needs four voxels per axis.
    pad = np.maximum(MIN_GRID_VOXELS - new_size, 0)
    origin = image.TransformContinuousIndexToPhysicalPoint(
        [float(v) for v in -(pad / 2.0) * spacing_mm / spacing]) if pad.any() else image.GetOrigin()
    # The image is smoothed first where it is downsampled, so the new grid does not alias.
    sigma = [max(0.01, (spacing_mm - s) / 2.0) for s in spacing]
    if max(sigma) > 0.1:
        image = smooth(image, sigma)
    out = sitk.Resample(image, [int(v) for v in new_size + pad], sitk.Transform(), interpolator, origin,
                        [spacing_mm] * 3, image.GetDirection(), default, sitk.sitkFloat32)
    return sitk.Clamp(out, sitk.sitkFloat32, HU_CLIP[0], HU_CLIP[1])


def physical_extent(image):
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
        [float(min(1.0, options.samples * s ** 3 / n)) for s in shrink], itk_seed(options.seed))
    if mask is not None:
        reg.SetMetricFixedMask(mask)
    reg.SetInterpolator(sitk.sitkLinear)
    if not options.gradient_image:
        reg.MetricUseMovingImageGradientFilterOff()
    if options.threads:
        reg.SetNumberOfThreads(int(options.threads))
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel([s / 2.0 if s > 1 else 0.0 for s in shrink])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return reg


def _count(mask):
    return max(1, int(np.count_nonzero(sitk.GetArrayViewFromImage(mask))))


@dataclass
class PreparedQuery:
    """The query on the registration grids, made once and shared by every support's registration."""
    #: the query at ``spacing_mm`` (float32, HU clipped), its body mask and the mask's voxel count
    grid: sitk.Image
    mask: sitk.Image
    n_body: int
    #: the query on the coarse grid of the initial translation search, its body mask and voxel count
    coarse: sitk.Image
    coarse_mask: sitk.Image
    coarse_n_body: int
    coarse_centroid: np.ndarray


def coarse_spacing(options):
    return 4.0 * options.spacing_mm


def prepare_query(fixed, options):
    """The query's registration grids (:class:`PreparedQuery`), made once for all supports."""
    grid = resample_iso(fixed, options.spacing_mm)
    coarse = resample_iso(fixed, coarse_spacing(options))
    mask, coarse_mask = body_mask(grid), body_mask(coarse)
    return PreparedQuery(grid, mask, _count(mask), coarse, coarse_mask, _count(coarse_mask),
                         _body_centroid(coarse))


def initial_translation(fixed, moving, options, prepared=None):
    """A robust start: body centroids matched in-plane, then a search over all z offsets.

    Scans differ in their field of view (head only, or down to the chest; a
    slab of the abdomen against the whole abdomen), so matching centres is not
    enough along z: every z offset that keeps half the shorter scan in overlap
    is tried on a coarse grid, with small in-plane shifts, and the best
    mutual information wins.
    """
    prepared = prepared or prepare_query(fixed, options)
    coarse = coarse_spacing(options)
    f = prepared.coarse
    m = resample_iso(moving, coarse)
    shift = _body_centroid(m) - prepared.coarse_centroid
    flo, fhi = physical_extent(f)
    mlo, mhi = physical_extent(m)
    # Along z: every offset with at least half of the shorter extent overlapping.
    half = 0.5 * min(fhi[2] - flo[2], mhi[2] - mlo[2])
    tz_lo, tz_hi = mlo[2] - fhi[2] + half, mhi[2] - flo[2] - half
    centre_z = 0.5 * (tz_lo + tz_hi)
    n_z = max(1, int(np.ceil((tz_hi - tz_lo) / 2.0 / coarse)))
    n_xy = 2
    tx = sitk.TranslationTransform(3, (float(shift[0]), float(shift[1]), float(centre_z)))
    reg = _method(options, prepared.coarse_mask, n_voxels=prepared.coarse_n_body)
    reg.SetInitialTransform(tx, inPlace=True)
    reg.SetOptimizerAsExhaustive([n_xy, n_xy, n_z])
    reg.SetOptimizerScales([coarse, coarse, coarse])
    try:
        reg.Execute(f, m)
    except RuntimeError:
        # A support that covers a small part of the query (a slab against a whole head) leaves some offsets
        # of the search without one sample inside it, and ITK's search then stops; such offsets are skipped.
        return _search_offsets(reg, f, m, tx.GetOffset(), (n_xy, n_xy, n_z), coarse)
    return np.array(tx.GetOffset())


def _search_offsets(reg, f, m, start, steps, step_mm):
    """The exhaustive search, one offset at a time: the best Mattes MI among those that can be measured."""
    best, best_value = np.asarray(start, float), np.inf
    grids = [np.arange(-n, n + 1) * step_mm for n in steps]
    for dz in grids[2]:
        for dy in grids[1]:
            for dx in grids[0]:
                offset = np.asarray(start, float) + (dx, dy, dz)
                reg.SetInitialTransform(sitk.TranslationTransform(3, offset.tolist()))
                try:
                    value = reg.MetricEvaluate(f, m)
                except RuntimeError:
                    continue
                if value < best_value:
                    best, best_value = offset, value
    return best


def screen_score(fixed, moving, options, prepared=None):
    """How well a support matches the query at a glance: Mattes mutual information (lower is better) on the
    coarse grid at the best offset of :func:`initial_translation`; a few percent of a registration's time."""
    prepared = prepared or prepare_query(fixed, options)
    offset = initial_translation(fixed, moving, options, prepared)
    reg = _method(options, prepared.coarse_mask, n_voxels=prepared.coarse_n_body)
    reg.SetInitialTransform(sitk.TranslationTransform(3, offset.tolist()))
    try:
        return float(reg.MetricEvaluate(prepared.coarse, resample_iso(moving, coarse_spacing(options))))
    except RuntimeError:  # no sample of the query falls in the support
        return float("inf")


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


def register(fixed, moving, options=RegistrationOptions(), prepared=None):
    """Register ``moving`` (support) to ``fixed`` (query): returns (transform, metric, stage seconds).

    Both are float images in HU. The transform maps query points to support points. ``prepared``:
    the query's grids (:func:`prepare_query`), when several supports share them.
    """
    stages = {}
    t0 = time.perf_counter()
    prepared = prepared or prepare_query(fixed, options)
    f, mask, n_body = prepared.grid, prepared.mask, prepared.n_body
    m = resample_iso(moving, options.spacing_mm)
    offset = initial_translation(fixed, moving, options, prepared)
    stages["initialize"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    flo, fhi = physical_extent(f)
    rigid = sitk.Euler3DTransform()
    rigid.SetCenter(((flo + fhi) / 2).tolist())
    rigid.SetTranslation(offset.tolist())
    _linear_stage(f, m, rigid, options, mask, n_body, options.rigid_shrink, learning_rate=2.0, min_step=0.01)
    stages["rigid"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    metric = _linear_stage(f, m, affine, options, mask, n_body, options.affine_shrink, learning_rate=1.0,
                           min_step=0.005)
    stages["affine"] = time.perf_counter() - t0
    return affine, float(metric), stages


def invert_points(transform, points, tol=0.05, max_iter=50):
    """Query points q with ``transform(q) = p`` for each support point p (mm).

    Affine transforms are inverted exactly; with a deformable stage on top
    (``CompositeTransform([affine, local])``), the affine inverse starts a
    fixed-point iteration, which converges for smooth, small deformations.
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
# One support per worker thread (SimpleITK releases the GIL while it computes)

def _register_support(template, fixed, carry, options, prepared=None):
    """Read one support, register it to the query, carry its points across."""
    t0 = time.perf_counter()
    moving = template.read_image()
    transform, metric, stages = register(fixed, moving, options, prepared)
    mapped = {v: invert_points(transform, p) for v, p in carry(template, moving).items()}
    return SupportRegistration(template.case_id, transform, time.perf_counter() - t0, metric, mapped, stages)


#: at most this many cores for this process (None: all it may run on); a batch worker's share of the machine
_CORES_LIMIT = [None]


def cores():
    """The cores this process may use: its CPU affinity, at most :func:`limit_cores`'s number."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(n, _CORES_LIMIT[0]) if _CORES_LIMIT[0] else n


def limit_cores(n):
    """Let :func:`cores` (the default number of supports registered at once) give at most ``n``
    (None: no limit), so that several worker processes on one machine do not each take every core."""
    _CORES_LIMIT[0] = None if n is None else max(1, int(n))


_ITK_LOCK = threading.Lock()
_itk_single = [0, None]  # nesting depth, the thread count to restore


@contextmanager
def repeatable_itk():
    """ITK at one thread per filter for the duration.

    ITK's multi-threaded reductions (the registration metric, the demons
    update) add their parts in an order that changes from run to run, so a
    registration on several threads is not repeatable to the last bit, and a
    last-bit difference can move a box edge by a voxel. The supports run in
    parallel instead, one thread each (:func:`map_supports`): as fast where
    there are at least as many supports as cores, and the same every time.
    """
    with _ITK_LOCK:
        if _itk_single[0] == 0:
            _itk_single[1] = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
        _itk_single[0] += 1
    try:
        yield
    finally:
        with _ITK_LOCK:
            _itk_single[0] -= 1
            if _itk_single[0] == 0:
                sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(_itk_single[1])


def map_supports(fn, items, workers=None, progress=None, stage=None):
    """``[fn(item) for item in items]``, the items in parallel threads (one ITK thread each), in order.

    Threads, not processes: SimpleITK releases the GIL while it computes, and
    threads need no re-import of the caller's main module. ``progress``: its
    cancel callback is polled while the items run, and a cancel returns at
    once (items already running finish in the background, their results unused).
    """
    progress = progress or Progress()
    items = list(items)
    workers = max(1, min(workers or cores(), len(items) or 1))
    if stage:
        progress.stage(stage, total=len(items))
    results = []
    with repeatable_itk():
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ursam-support")
        futures = [pool.submit(fn, item) for item in items]
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
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
    if stage:
        progress.done()
    return results


@dataclass
class Screening:
    """The coarse screen of a library's supports against one query: each support's score (lower is better)
    and the supports kept for the full registration, best first."""
    scores: dict
    kept: list
    seconds: float

    def to_json(self):
        return {"scores": {k: round(v, 4) for k, v in self.scores.items()}, "kept": list(self.kept),
                "seconds": round(self.seconds, 2)}


def register_supports(query, templates, carry, options=RegistrationOptions(), progress=None):
    """Register the supports to the query, the supports in parallel (:func:`map_supports`): every support,
    or where the library holds more than ``options.screen``, the best of a coarse screen of every support.

    ``carry(template, image) -> {key: (n, 3) physical points of the support}``
    names the points to bring into the query (the localizer's extreme points);
    each registration's ``points`` holds them in query coordinates.
    Returns ``(registrations, screening)`` (:class:`Screening`; None where every support was registered).
    """
    # Registered on the canonical grid: the transforms are physical, and the random metric samples
    # then fall on the same voxels whatever the query's axis order.
    fixed = canonical(as_float_image(query))
    with repeatable_itk():
        prepared = prepare_query(fixed, options)
    templates, screening = list(templates), None
    if options.screen is not None and len(templates) > options.screen:
        t0 = time.perf_counter()
        scores = map_supports(lambda t: screen_score(fixed, t.read_image(), options, prepared), templates,
                              options.workers, progress, f"{STAGE_SCREEN} ({len(templates)})")
        order = sorted(range(len(templates)), key=lambda i: (scores[i], templates[i].case_id))[:options.screen]
        screening = Screening({t.case_id: s for t, s in zip(templates, scores)},
                              [templates[i].case_id for i in order], time.perf_counter() - t0)
        templates = [templates[i] for i in order]
    regs = map_supports(lambda t: _register_support(t, fixed, carry, options, prepared), templates,
                        options.workers, progress, f"{STAGE_REGISTER} ({len(templates)})")
    return regs, screening
