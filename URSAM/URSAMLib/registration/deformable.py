"""A deformable stage after the affine registration of each support.

The localizer registers every support scan to the query with an affine
transform (:func:`URSAMLib.registration.affine.register`). The slice-adaptive
prompts (:mod:`URSAMLib.prompt_modes`)
and the atlas baseline warp the supports' label maps with those transforms;
a deformable stage on top makes the warped labels follow the query's anatomy
(curved spinal cord, jaw opening, neck flexion) where an affine map cannot.

Three stages, chosen by :attr:`DeformableOptions.method`, all on the same
isotropic grid (about 3 mm) and all returning a transform that maps query
points to support points, so ``sitk.Resample(support, query, transform)``
works unchanged:

- ``demons``: SimpleITK's fast symmetric-forces demons on a displacement
  field, coarse to fine (default: the fastest, see benchmarks/deformable_options.py);
- ``bspline``: a coarse B-spline (control points about every 80 mm), one
  L-BFGS-B level on Mattes mutual information;
- ``elastix``: itk-elastix (optional dependency, extra ``elastix``) with its
  standard B-spline parameter map; without it the call raises URSAMError
  naming the extra to install.

The affine part is applied first by resampling the support onto the query's
grid, so each stage registers two images that already overlap; the result is
``CompositeTransform([affine, displacement])`` (the displacement acts first).
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

import numpy as np
import SimpleITK as sitk

from ..errors import URSAMError
from .affine import itk_seed, map_supports, repeatable_itk, resample_iso, smooth

METHODS = ("none", "demons", "bspline", "elastix")
CROPS = ("none", "tissue", "organs")


@dataclass
class DeformableOptions:
    method: str = "demons"
    #: isotropic grid of the deformable stage, mm
    spacing_mm: float = 3.0
    #: CT window (HU) of the images the stage compares: soft tissue, fat, air and bone all keep contrast
    window: tuple = (-400.0, 600.0)
    # demons: iterations per level (coarse to fine), shrink factors, field smoothing (mm)
    demons_iterations: tuple = (40, 30, 15)
    demons_shrink: tuple = (4, 2, 1)
    demons_sigma_mm: float = 3.0
    #: largest update per iteration, mm (keeps a level from tearing the field)
    demons_max_step_mm: float = 3.0
    #: the part of the query's grid the stage runs on: "tissue", the bounding box of what is above the
    #: window's low end (most of a head and neck grid is air); "organs", that of the organs' points the
    #: registrations carried into the query (the warped labels need the deformation there only); "none"
    crop: str = "tissue"
    #: the crop's box grown by this margin (mm) on every side
    crop_margin_mm: float = 30.0
    # coarse B-spline: control grid spacing (mm), L-BFGS-B iterations, metric samples
    bspline_mm: float = 80.0
    bspline_iterations: int = 30
    bspline_samples: int = 10000
    # elastix: the standard "bspline" map with this final grid spacing (mm) and iterations per level
    elastix_grid_mm: float = 30.0
    elastix_iterations: int = 200
    elastix_resolutions: int = 3
    #: ITK threads of one stage (None: one, so that runs repeat; the supports run in parallel)
    threads: Optional[int] = None
    #: supports refined at once (None: one per core)
    workers: Optional[int] = None
    seed: int = 0

    def check(self):
        check_method(self.method)
        if self.spacing_mm <= 0:
            raise URSAMError(f"deformable grid spacing must be positive, got {self.spacing_mm}")
        if self.crop not in CROPS:
            raise URSAMError(f"unknown crop {self.crop!r} of the deformable stage; choose one of {', '.join(CROPS)}")
        if self.crop_margin_mm < 0:
            raise URSAMError(f"the deformable stage's crop margin must not be negative, got {self.crop_margin_mm}")
        return self

    def to_json(self):
        return asdict(self)


def check_method(method):
    if method not in METHODS:
        raise URSAMError(f"unknown deformable method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "elastix" and not elastix_available():
        raise URSAMError("the elastix deformable stage needs itk-elastix: pip install 'ursam[elastix]' "
                         "(or choose --deformable demons)")
    return method


def elastix_available():
    try:
        import itk  # noqa: F401, PLC0415 (optional: itk-elastix)

        return hasattr(itk, "elastix_registration_method")
    except ImportError:
        return False


def _grid(image, spacing_mm, window):
    """``image`` (float, HU) on an isotropic grid, windowed and scaled to [0, 1]."""
    iso = resample_iso(image, spacing_mm)
    lo, hi = window
    iso = sitk.Clamp(iso, sitk.sitkFloat32, lo, hi)
    return sitk.Cast((iso - lo) / (hi - lo), sitk.sitkFloat32)


def _affine_on_grid(moving, fixed_grid, affine, options):
    """The support, moved by the affine transform, on the query's isotropic grid (windowed)."""
    lo, hi = options.window
    m = sitk.Cast(moving, sitk.sitkFloat32)
    sigma = [max(0.01, (options.spacing_mm - s) / 2.0) for s in m.GetSpacing()]
    if max(sigma) > 0.1:
        m = smooth(m, sigma)
    m = sitk.Resample(m, fixed_grid, affine, sitk.sitkLinear, lo, sitk.sitkFloat32)
    m = sitk.Clamp(m, sitk.sitkFloat32, lo, hi)
    return sitk.Cast((m - lo) / (hi - lo), sitk.sitkFloat32)


#: the fewest voxels along an axis that a coarse demons level keeps
MIN_LEVEL_VOXELS = 8


def _demons(fixed, moving, options):
    """Displacement field (on ``fixed``'s grid) of symmetric-forces demons, coarse to fine."""
    field = None
    for shrink, iters in zip(options.demons_shrink, options.demons_iterations):
        # Per axis, never below MIN_LEVEL_VOXELS: on a thin query (a slab of a few slices) a
        # 4x shrink in z leaves one or two slices, and demons then tears the field apart.
        factors = [max(1, min(int(shrink), n // MIN_LEVEL_VOXELS)) for n in fixed.GetSize()]
        if shrink > 1 and factors == [1, 1, 1]:
            continue
        f = sitk.Shrink(fixed, factors) if max(factors) > 1 else fixed
        m = sitk.Shrink(moving, factors) if max(factors) > 1 else moving
        demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
        demons.SetNumberOfIterations(int(iters))
        demons.SetStandardDeviations(options.demons_sigma_mm)
        demons.SetUseImageSpacing(True)
        demons.SetMaximumUpdateStepLength(options.demons_max_step_mm)
        demons.SetSmoothDisplacementField(True)
        demons.SetSmoothUpdateField(False)
        if options.threads:
            demons.SetNumberOfThreads(int(options.threads))
        if field is None:
            field = demons.Execute(f, m)
        else:
            # The coarser level's field, resampled onto this level's grid, starts this level.
            init = sitk.Resample(field, f, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())
            field = demons.Execute(f, m, init)
    if field.GetSize() != fixed.GetSize():
        field = sitk.Resample(field, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())
    return field


def _bspline(fixed, moving, options):
    """A coarse B-spline transform (query grid points to affinely moved support points)."""
    size = np.array(fixed.GetSize()) * np.array(fixed.GetSpacing())
    mesh = [max(1, int(round(s / options.bspline_mm))) for s in size]
    bspline = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    n = int(np.prod(fixed.GetSize()))
    reg.SetMetricSamplingPercentage(float(min(1.0, options.bspline_samples * 8 / n)), itk_seed(options.seed))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel([2])
    reg.SetSmoothingSigmasPerLevel([1.0])
    if options.threads:
        reg.SetNumberOfThreads(int(options.threads))
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=options.bspline_iterations,
                             maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=200)
    reg.SetInitialTransform(bspline, inPlace=True)
    reg.Execute(fixed, moving)
    return bspline


def _elastix(fixed, moving, options):
    """Displacement field of itk-elastix's standard B-spline map (query grid)."""
    import itk  # noqa: PLC0415 (optional: itk-elastix)

    f = itk.image_from_array(sitk.GetArrayFromImage(fixed).astype(np.float32))
    m = itk.image_from_array(sitk.GetArrayFromImage(moving).astype(np.float32))
    for img in (f, m):
        img.SetSpacing(fixed.GetSpacing())
        img.SetOrigin(fixed.GetOrigin())
        img.SetDirection(itk.matrix_from_array(np.array(fixed.GetDirection()).reshape(3, 3)))
    params = itk.ParameterObject.New()
    pmap = params.GetDefaultParameterMap("bspline", int(options.elastix_resolutions),
                                         float(options.elastix_grid_mm))
    pmap["MaximumNumberOfIterations"] = [str(int(options.elastix_iterations))]
    pmap["RandomSeed"] = [str(itk_seed(options.seed))]
    if options.threads:
        # (the number_of_threads keyword of itk-elastix 0.25 crashes; the map entry does the same)
        pmap["MaximumNumberOfThreads"] = [str(int(options.threads))]
    params.AddParameterMap(pmap)

    # transformix writes its field to a file as well: into a folder of our own, never the caller's cwd.
    with tempfile.TemporaryDirectory(prefix="ursam-elastix-") as tmp:
        _, result = itk.elastix_registration_method(f, m, parameter_object=params, log_to_console=False,
                                                    output_directory=tmp)
        field = itk.transformix_deformation_field(m, result, output_directory=tmp, log_to_console=False)
        arr = itk.array_from_image(field).astype(np.float64)
    out = sitk.GetImageFromArray(arr, isVector=True)
    out.CopyInformation(fixed)
    return out


def _index_box(grid, lo, hi, margin_mm):
    """Voxel box [lo, hi) of ``grid`` (z, y, x) grown by ``margin_mm`` and clipped to the grid."""
    size = np.array(grid.GetSize())[::-1]
    pad = np.ceil(margin_mm / np.array(grid.GetSpacing())[::-1]).astype(int)
    return np.maximum(np.asarray(lo) - pad, 0), np.minimum(np.asarray(hi) + pad, size)


def _crop(grid, lo, hi):
    size = np.array(grid.GetSize())[::-1]
    if np.all(lo <= 0) and np.all(hi >= size):
        return grid
    return sitk.RegionOfInterest(grid, [int(v) for v in (hi - lo)[::-1]], [int(v) for v in lo[::-1]])


def tissue_box(grid, margin_mm):
    """The bounding box (z, y, x voxels, [lo, hi)) of ``grid``'s tissue (above 0 after windowing), grown.

    Where both scans are air the demons forces are zero, yet every voxel costs the same: on a head and
    neck CT, two thirds of the grid. The displacement is zero outside the box (a displacement field
    transform moves no point outside its field), and the margin keeps the box's edge in air.
    """
    idx = np.argwhere(sitk.GetArrayViewFromImage(grid) > 0)
    if len(idx) == 0:
        return np.zeros(3, int), np.array(grid.GetSize())[::-1]
    return _index_box(grid, idx.min(0), idx.max(0) + 1, margin_mm)


def organs_box(grid, registrations, margin_mm):
    """The bounding box (z, y, x voxels) of every organ point the registrations carried into the query,
    grown; None without points."""
    points = [p for r in registrations for p in r.points.values()]
    if not points:
        return None
    idx = np.array([grid.TransformPhysicalPointToContinuousIndex([float(c) for c in q])
                    for p in points for q in np.asarray(p).reshape(-1, 3)])[:, ::-1]
    return _index_box(grid, np.floor(idx.min(0)).astype(int), np.ceil(idx.max(0)).astype(int) + 1, margin_mm)


def query_grid(fixed, options, registrations=()):
    """The query on the deformable stage's grid (windowed to [0, 1]) and cropped as the options say,
    made once for all supports."""
    grid = _grid(fixed, options.spacing_mm, options.window)
    if options.crop == "none":
        return grid
    lo, hi = tissue_box(grid, options.crop_margin_mm)
    box = organs_box(grid, registrations, options.crop_margin_mm) if options.crop == "organs" else None
    if box is not None:
        lo, hi = np.maximum(lo, box[0]), np.minimum(hi, box[1])
        if np.any(hi <= lo):
            lo, hi = tissue_box(grid, options.crop_margin_mm)
    return _crop(grid, lo, hi)


def refine(fixed, moving, affine, options=DeformableOptions(), fixed_grid=None):
    """The deformable stage of one support: ``(transform, stage seconds)``.

    ``fixed`` (query) and ``moving`` (support) are float images in HU,
    ``affine`` maps query points to support points (:func:`.affine.register`).
    The returned transform does the same, with the deformation. ``fixed_grid``:
    :func:`query_grid` of ``fixed``, when several supports share it.
    """
    method = check_method(options.method)
    t0 = time.perf_counter()
    if method == "none":
        return affine, 0.0
    f = fixed_grid if fixed_grid is not None else query_grid(fixed, options)
    m = _affine_on_grid(moving, f, affine, options)
    if method == "bspline":
        local = _bspline(f, m, options)
    else:
        field = _demons(f, m, options) if method == "demons" else _elastix(f, m, options)
        local = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    return sitk.CompositeTransform([affine, local]), time.perf_counter() - t0


def refine_registrations(fixed, registrations, library, options=DeformableOptions(), progress=None):
    """Every support registration of ``localize`` with the deformable stage on top.

    ``fixed``: the query CT in HU as a float32 SimpleITK image on its
    canonical grid (:func:`URSAMLib.orientation.canonical`: as the affine
    stage, so that the field is the same whatever the axis order);
    ``registrations``: the affine :class:`.affine.SupportRegistration` of
    each support. Returns new registrations (the originals are left as they
    are), each with ``stages["deformable"]`` seconds.
    """
    if options.method == "none" or not registrations:
        return list(registrations)
    by_id = {t.case_id: t for t in library.templates()}
    with repeatable_itk():
        grid = query_grid(fixed, options, registrations)

    def one(r):
        transform, seconds = refine(fixed, by_id[r.case_id].read_image(), r.transform, options, grid)
        return replace(r, transform=transform, seconds=r.seconds + seconds, stages={**r.stages, "deformable": seconds})

    # The supports in parallel, one ITK thread each: the same field every run (affine.repeatable_itk).
    return map_supports(one, registrations, options.workers, progress)
