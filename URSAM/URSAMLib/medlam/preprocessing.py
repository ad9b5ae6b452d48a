"""MedLAM preprocessing (METHOD.md §1): LPS orientation, 3 mm voxels, HU mapping, padding.

A ``Prepared`` volume keeps the mapping back to the input image, so points
found on the 3 mm grid land on the input's voxels whatever its spacing or
orientation. Arrays are [z, y, x]; intensities are stored as uint8 (the
mapped [0, 1] range times 255), which is exact enough for the network and
lets a cache of hundreds of training scans fit in memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..errors import URSAMError
from ..imageio import check_volume, read_image


def map_hu(hu, points=(-1000.0, -200.0, 200.0, 1500.0), values=(0.0, 0.2, 0.8, 1.0)):
    """Piecewise-linear HU mapping, constant beyond the end points."""
    return np.interp(np.asarray(hu, np.float32), points, values).astype(np.float32)


@dataclass
class Prepared:
    """A CT on the MedLAM grid: ``volume`` uint8 [z, y, x], padded by ``pad`` voxels on every side."""
    volume: np.ndarray
    pad: int
    #: the resampled (unpadded) grid, as an empty SimpleITK image (origin, spacing, direction)
    grid: sitk.Image
    #: the input image's geometry, to map points back
    source: sitk.Image
    #: the input image's size (x, y, z)
    source_size: tuple

    @property
    def inner_shape(self):
        return tuple(s - 2 * self.pad for s in self.volume.shape)

    def resample_labels(self, labels):
        """A label image (SimpleITK) on this grid, padded like ``volume``, nearest neighbour."""
        ref = sitk.Image([int(v) for v in self.inner_shape[::-1]], sitk.sitkUInt8)
        ref.SetOrigin(self.grid.GetOrigin())
        ref.SetSpacing(self.grid.GetSpacing())
        ref.SetDirection(self.grid.GetDirection())
        res = sitk.Resample(labels, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
        arr = sitk.GetArrayFromImage(res)
        return np.pad(arr, self.pad, mode="constant", constant_values=0) if self.pad else arr

    def zyx_to_source_index(self, points_zyx):
        """Padded-grid voxel coordinates (z, y, x), float -> continuous source index (x, y, z)."""
        out = []
        for p in np.atleast_2d(points_zyx):
            idx = [float(p[2] - self.pad), float(p[1] - self.pad), float(p[0] - self.pad)]
            phys = self.grid.TransformContinuousIndexToPhysicalPoint(idx)
            out.append(self.source.TransformPhysicalPointToContinuousIndex(phys))
        return np.array(out, np.float64)

    def source_index_to_zyx(self, index_xyz):
        """Source voxel indices (x, y, z) -> padded-grid coordinates (z, y, x), float."""
        out = []
        for p in np.atleast_2d(index_xyz):
            phys = self.source.TransformContinuousIndexToPhysicalPoint([float(v) for v in p])
            i = self.grid.TransformPhysicalPointToContinuousIndex(phys)
            out.append([i[2] + self.pad, i[1] + self.pad, i[0] + self.pad])
        return np.array(out, np.float64)


def _geometry(image):
    """A one-voxel image that holds only a geometry (cheap to keep around)."""
    g = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    g.SetOrigin(image.GetOrigin())
    g.SetSpacing(image.GetSpacing())
    g.SetDirection(image.GetDirection())
    return g


def prepare(image, spacing_mm=3.0, pad=32, hu_points=(-1000.0, -200.0, 200.0, 1500.0),
            hu_values=(0.0, 0.2, 0.8, 1.0), path=None):
    """Resample a CT (SimpleITK image in HU) to ``spacing_mm`` isotropic, LPS-aligned, and map it.

    The grid covers the whole input; voxels outside it read as air (-1000 HU).
    ``pad`` voxels of 0 (air after mapping) are added on every side so that a
    patch centred on any voxel of the scan lies inside the array.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise URSAMError("MedLAM needs a scalar 3D CT", path)
    image = sitk.Cast(image, sitk.sitkFloat32)
    # Orient to LPS so that the learned coordinates mean the same direction in every scan.
    oriented = sitk.DICOMOrient(image, "LPS")
    size = np.array(oriented.GetSize())
    extent = size * np.array(oriented.GetSpacing())
    new_size = [max(int(round(e / spacing_mm)), 1) for e in extent]
    ref = sitk.Image(new_size, sitk.sitkFloat32)
    ref.SetDirection(oriented.GetDirection())
    ref.SetSpacing([spacing_mm] * 3)
    # Align the new grid's outer edge with the input's, so both cover the same box.
    corner = np.array(oriented.TransformContinuousIndexToPhysicalPoint([-0.5, -0.5, -0.5]))
    direction = np.array(oriented.GetDirection()).reshape(3, 3)
    origin = corner + direction @ (np.full(3, spacing_mm / 2.0))
    ref.SetOrigin(tuple(origin))
    # Antialias before shrinking: smooth where the new voxels are larger.
    sigma = [max(0.0, (spacing_mm ** 2 - s ** 2)) ** 0.5 / 2.355 for s in oriented.GetSpacing()]
    src = oriented
    if max(sigma) > 0.3:
        src = sitk.SmoothingRecursiveGaussian(oriented, [max(s, 1e-3) for s in sigma])
    res = sitk.Resample(src, ref, sitk.Transform(), sitk.sitkLinear, -1000.0, sitk.sitkFloat32)
    hu = sitk.GetArrayViewFromImage(res)
    mapped = map_hu(hu, hu_points, hu_values)
    vol = np.rint(mapped * 255.0).astype(np.uint8)
    if pad:
        vol = np.pad(vol, pad, mode="constant", constant_values=0)
    return Prepared(vol, int(pad), _geometry(ref), _geometry(image), tuple(image.GetSize()))


def prepare_path(path, **kw):
    image = read_image(path, "image")
    check_volume(image, path)
    return prepare(image, path=path, **kw)


def extreme_points(mask_zyx):
    """METHOD.md §1: the 6 extreme points of a mask, [z, y, x] voxel indices, shape (6, 3).

    Rows: min z, min y, min x, max z, max y, max x. The other two coordinates of
    each point are those of the middle foreground voxel (in scan order) of
    the extreme slice, as in MedLSAM.
    """
    idx = np.argwhere(mask_zyx)
    if idx.size == 0:
        raise ValueError("empty mask")
    pts = np.zeros((6, 3), np.int64)
    lo, hi = idx.min(0), idx.max(0)
    for k, bound in enumerate((lo, hi)):
        for axis in range(3):
            on_slice = idx[idx[:, axis] == bound[axis]]
            pts[3 * k + axis] = on_slice[len(on_slice) // 2]
    return pts


def crop(volume, centre_zyx, size):
    """A ``size``^3 crop whose voxel ``size // 2`` is ``centre``; outside the array reads 0."""
    c = np.asarray(np.rint(centre_zyx), np.int64)
    lo = c - size // 2
    hi = lo + size
    shape = np.array(volume.shape)
    if (lo >= 0).all() and (hi <= shape).all():
        return volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    out = np.zeros((size,) * 3, volume.dtype)
    a = np.maximum(lo, 0)
    b = np.minimum(hi, shape)
    if (b > a).all():
        out[a[0] - lo[0]:b[0] - lo[0], a[1] - lo[1]:b[1] - lo[1], a[2] - lo[2]:b[2] - lo[2]] = \
            volume[a[0]:b[0], a[1]:b[1], a[2]:b[2]]
    return out
